"""Cross-validation: speaker-grouped and stratified folds, fold data sets, `flaxcnn cv` end to end
on generated speech clips, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flaxcnn.cli import main
from flaxcnn.errors import ConfigError, DataError
from flaxcnn.train import crossval
from flaxcnn.train.config import TrainConfig


def write_speech_folder(root: Path, n: int = 36, speakers: int = 9, k: int = 3, *, files_csv: bool = True) -> Path:
    """npy layout: class-dependent random features, ``speakers`` speakers of uneven clip counts."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    labels = np.arange(n) % k
    feats = (rng.normal(-5, 2, (n, 99, 26)) + 3 * labels[:, None, None]).astype(np.float32)
    np.save(root / "melspec_feats.npy", feats)
    np.save(root / "labels.npy", labels)
    (root / "classes.txt").write_text("".join(f"w{i}\n" for i in range(k)))
    if files_csv:
        who = [f"spk{(i * i) % speakers}" for i in range(n)]  # uneven: some speakers have many clips
        (root / "files.csv").write_text("index,label,speaker\n" + "".join(
            f"{i},{y},{s}\n" for i, (y, s) in enumerate(zip(labels, who))))
    return root


def test_grouped_folds_partition_rows_and_keep_each_group_in_one_fold():
    rng = np.random.default_rng(1)
    groups = np.array([f"s{v}" for v in rng.integers(0, 40, 500)])
    folds = crossval.grouped_folds(groups, 5)
    rows = np.concatenate(folds)
    assert sorted(rows.tolist()) == list(range(500))  # every row held out exactly once
    fold_of_group = {}
    for f, held in enumerate(folds):
        for g in set(groups[held]):
            assert fold_of_group.setdefault(g, f) == f
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= max(np.unique(groups, return_counts=True)[1])  # balanced greedily
    again = crossval.grouped_folds(groups, 5)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))
    other = crossval.grouped_folds(groups, 5, seed=7)
    assert not all(np.array_equal(a, b) for a, b in zip(folds, other))


def test_grouped_folds_need_enough_speakers():
    with pytest.raises(DataError, match="at least 5 speakers, the data has 3"):
        crossval.grouped_folds(np.array(["a", "b", "c", "a"]), 5)


def test_stratified_folds_partition_rows_and_balance_classes():
    labels = np.repeat([0, 1, 2], [50, 31, 19])
    folds = crossval.stratified_folds(labels, 4)
    assert sorted(np.concatenate(folds).tolist()) == list(range(100))
    for c, total in ((0, 50), (1, 31), (2, 19)):
        counts = [int(np.sum(labels[f] == c)) for f in folds]
        assert max(counts) - min(counts) <= 1 and sum(counts) == total
    with pytest.raises(DataError, match="class 2 has 3"):
        crossval.stratified_folds(np.repeat([0, 1, 2], [10, 10, 3]), 4)


def test_fold_dataset_holds_out_one_fold(tmp_path):
    root = write_speech_folder(tmp_path / "speech")
    pool = crossval.load_pool(TrainConfig(model="speechnet", dataset="speech", data_dir=str(root)))
    folds = crossval.make_folds(pool, 3)
    data = crossval.fold_dataset(pool, folds, 1)
    assert len(data.train) + len(data.test) == 36 and len(data.test) == len(folds[1])
    np.testing.assert_array_equal(data.test.x, pool.x[folds[1]])  # speech stays raw
    held_speakers, train_speakers = set(pool.groups[folds[1]]), set(pool.groups[np.concatenate([folds[0], folds[2]])])
    assert not held_speakers & train_speakers
    assert data.info["speakers"] == {"train": len(train_speakers), "test": len(held_speakers)}


def test_cifar_folds_are_standardised_with_their_own_training_images():
    pool = crossval.load_pool(TrainConfig(model="net", dataset="cifar2"))  # the shipped sample
    assert pool.groups is None and pool.standardize
    folds = crossval.make_folds(pool, 3)
    data = crossval.fold_dataset(pool, folds, 0)
    np.testing.assert_allclose(data.train.x.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(data.train.x.std(axis=(0, 2, 3), ddof=1), 1, atol=1e-4)
    assert abs(float(data.test.x.mean())) > 1e-6  # the held-out fold is not re-centred on itself
    assert len(data.info["mean"]) == 3


def test_cv_command_end_to_end(tmp_path, capsys):
    root = write_speech_folder(tmp_path / "speech")
    out = tmp_path / "cv"
    args = ["cv", "--model", "speechnet", "--dataset", "speech", "--data-dir", str(root), "--epochs", "1",
            "--batch-size", "8", "--lr", "0.01", "--folds", "2", "--seeds", "0,1", "--time-shift", "3",
            "--out", str(out), "--quiet"]
    assert main(args + ["--only-folds", "2"]) == 0  # one fold first, as a second process would
    assert sorted(p.parent.name + "/" + p.name for p in out.glob("seed*/fold*")) == ["seed0/fold2", "seed1/fold2"]
    before = (out / "seed0" / "fold2" / "summary.json").stat().st_mtime_ns
    assert main(args + ["--final"]) == 0
    assert (out / "seed0" / "fold2" / "summary.json").stat().st_mtime_ns == before  # reused, not retrained
    result = json.loads((out / "cv.json").read_text())
    assert result["grouping"] == "speaker" and result["folds"] == 2 and result["seeds"] == [0, 1]
    assert sum(result["fold_sizes"]) == 36
    assert [(r["seed"], r["fold"]) for r in result["runs"]] == [(s, f) for s in (0, 1) for f in (1, 2)]
    accs = np.array([r["held_out_accuracy"] for r in result["runs"]])
    assert result["mean"] == pytest.approx(accs.mean()) and result["std"] == pytest.approx(accs.std(ddof=1))
    for r in result["runs"]:
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert summary["test_accuracy"] == r["held_out_accuracy"] and summary["seed"] == r["seed"]
        assert summary["test_size"] == r["held_out"] and summary["train_size"] == 36 - r["held_out"]
    config = json.loads((out / "seed1" / "fold2" / "config.json").read_text())
    assert config["config"]["time_shift"] == 3 and config["dataset"]["info"]["cv_fold"] == 1
    assert "Held-out accuracy" in (out / "cv.md").read_text()
    final = json.loads((out / "final" / "summary.json").read_text())
    assert final["train_size"] == 36 and final["seed"] == 0 and "none held out" in final["test_split"]
    with pytest.raises(SystemExit):
        main(args + ["--only-folds", "x"])
    assert main(args + ["--only-folds", "3"]) == 2
    assert "--only-folds must name folds in 1..2" in capsys.readouterr().err


def test_cv_refuses_speech_without_speakers_and_bad_fold_counts(tmp_path):
    root = write_speech_folder(tmp_path / "nospk", files_csv=False)
    config = TrainConfig(model="speechnet", dataset="speech", data_dir=str(root))
    with pytest.raises(DataError, match="files.csv"):
        crossval.run_cv(config, tmp_path / "cv", folds=3, quiet=True)
    with_speakers = TrainConfig(model="speechnet", dataset="speech", data_dir=str(write_speech_folder(tmp_path / "s")))
    with pytest.raises(ConfigError, match="--folds must be an integer >= 2"):
        crossval.run_cv(with_speakers, tmp_path / "cv", folds=1, quiet=True)
    assert not (tmp_path / "cv").exists()


def _cv_result(seeds: list[int], accuracies: dict[tuple[int, int], float], **config) -> dict:
    runs = [{"seed": s, "fold": f, "run_dir": f"r/seed{s}/fold{f}", "held_out": 10, "held_out_accuracy": a,
             "train_accuracy": 1.0, "seconds": 1.0} for (s, f), a in sorted(accuracies.items())]
    return {"config": {"model": "speechresnet", "lr": 0.02, "seed": seeds[0], "out": "x", **config},
            "data": "speech lab arrays in /abs/d: 20 clips, 3 classes", "folds": 2, "fold_seed": 42, "grouping": "speaker", "fold_sizes": [10, 10],
            "seeds": seeds, "runs": runs, **crossval.aggregate(runs)}


def test_merge_joins_seeds_of_one_protocol_and_refuses_another():
    a = _cv_result([0, 1], {(0, 1): 0.9, (0, 2): 0.8, (1, 1): 0.7, (1, 2): 0.6})
    b = _cv_result([2], {(2, 1): 1.0, (2, 2): 0.5}, out="elsewhere", data_dir="../d")
    b["data"] = "speech lab arrays in ../d: 20 clips, 3 classes"  # the same clips, named by another path
    merged = crossval.merge([b, a])
    assert merged["seeds"] == [0, 1, 2] and len(merged["runs"]) == 6
    assert [(r["seed"], r["fold"]) for r in merged["runs"]] == [(s, f) for s in (0, 1, 2) for f in (1, 2)]
    accs = np.array([0.9, 0.8, 0.7, 0.6, 1.0, 0.5])
    assert merged["mean"] == pytest.approx(accs.mean()) and merged["std"] == pytest.approx(accs.std(ddof=1))
    assert crossval.merge([a, a])["runs"] == a["runs"]  # the same run twice is one run
    with pytest.raises(ConfigError, match=r"other settings than the first \(lr\)"):
        crossval.merge([a, _cv_result([2], {(2, 1): 1.0}, lr=0.1)])
    with pytest.raises(ConfigError, match="differs from the first in 'fold_seed'"):
        crossval.merge([a, {**b, "fold_seed": 7}])
    with pytest.raises(ConfigError, match="differs from the first in 'data'"):
        crossval.merge([a, {**b, "data": "speech lab arrays in /abs/d: 21 clips, 3 classes"}])
    with pytest.raises(ConfigError, match="seed 0 fold 1 appears twice with different held-out accuracies"):
        crossval.merge([a, _cv_result([0], {(0, 1): 0.1})])


def test_cv_merge_command_writes_one_result(tmp_path, capsys):
    a = _cv_result([0], {(0, 1): 0.9, (0, 2): 0.8})
    b = _cv_result([1], {(1, 1): 0.7, (1, 2): 0.6})
    for name, result in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cv.json").write_text(json.dumps(result))
    out = tmp_path / "merged"
    assert main(["cv", "--merge", str(tmp_path / "a"), str(tmp_path / "b" / "cv.json"), "--out", str(out), "--quiet"]) == 0
    merged = json.loads((out / "cv.json").read_text())
    assert merged["seeds"] == [0, 1] and merged["mean"] == pytest.approx(0.75)
    assert "Held-out accuracy 0.7500" in (out / "cv.md").read_text()
    assert main(["cv", "--merge", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "--merge: no cv.json at" in capsys.readouterr().err
