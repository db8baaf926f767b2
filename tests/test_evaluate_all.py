"""`flaxcnn evaluate --split all` on generated speech clips and the shipped CIFAR-2 sample:
every example scored with the run's own input handling, per-class accuracy, confusion PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flaxcnn.cli import main
from flaxcnn.errors import DataError
from flaxcnn.train.evaluation import confusion_matrix, evaluate_all
from tests.test_crossval import write_speech_folder


def _correct_over_splits(run, capsys) -> tuple[float, int]:
    """Correct predictions summed over the run's own train/val/test splits (they partition the folder)."""
    assert main(["evaluate", "--run", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    sizes = json.loads((run / "config.json").read_text())["dataset"]["info"]
    if "split_sizes" in sizes:
        counts = sizes["split_sizes"]
    else:  # CIFAR: train and test sizes from the summary
        summary = json.loads((run / "summary.json").read_text())
        counts = {"train": summary["train_size"], "test": summary["test_size"]}
    return sum(result[f"{s}_accuracy"] * n for s, n in counts.items() if f"{s}_accuracy" in result), sum(counts.values())


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    m = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    np.testing.assert_array_equal(m, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def test_speech_run_scores_every_clip_of_a_folder(tmp_path, capsys):
    root = write_speech_folder(tmp_path / "speech", n=60, speakers=12)
    run = tmp_path / "run"
    assert main(["train", "--model", "speechnet", "--dataset", "speech", "--data-dir", str(root), "--epochs", "2",
                 "--batch-size", "16", "--lr", "0.02", "--out", str(run), "--quiet"]) == 0
    correct, total = _correct_over_splits(run, capsys)
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(run), "--split", "all", "--data-dir", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "eval_all.json").read_text())
    assert result["count"] == total == 60
    assert [row["count"] for row in result["per_class"]] == [20, 20, 20]
    assert round(result["accuracy"] * 60) == round(correct)  # same predictions as the split-wise evaluation
    assert sum(row["correct"] for row in result["per_class"]) == round(correct)
    assert np.array(result["confusion_matrix"]).sum() == 60
    assert (out / "confusion.png").stat().st_size > 2000 and "w0" in printed

    # A folder with a subset of the run's words, in another label order: matched by name.
    subset = tmp_path / "subset"
    write_speech_folder(subset, n=20, speakers=4, k=2)
    (subset / "classes.txt").write_text("w2\nw0\n")
    sub = evaluate_all(run, subset, out=tmp_path / "eval-subset")
    assert sub["count"] == 20 and [r["count"] for r in sub["per_class"]] == [10, 0, 10]
    assert sub["per_class"][1]["accuracy"] is None

    stranger = tmp_path / "stranger"
    write_speech_folder(stranger, n=12, speakers=4, k=2)
    (stranger / "classes.txt").write_text("w0\nmaybe\n")
    with pytest.raises(DataError, match=r"classes \['maybe'\] that the run was not trained on"):
        evaluate_all(run, stranger)


def test_cifar_run_scores_every_image_with_its_own_normalisation(tmp_path, capsys):
    run = tmp_path / "net"
    assert main(["train", "--epochs", "1", "--out", str(run), "--quiet"]) == 0  # the shipped sample
    correct, total = _correct_over_splits(run, capsys)
    result = evaluate_all(run)
    assert result["count"] == total == 800
    assert round(result["accuracy"] * total) == round(correct)
    assert [r["class"] for r in result["per_class"]] == ["airplane", "bird"]
    assert (run / "eval-all-data" / "confusion.png").exists()
