"""The flaxcnn command end to end on the shipped CIFAR-2 sample (no data download, no ../shared)."""

import json
import shutil

import numpy as np
import pytest
import torch

from flaxcnn.cli import main
from flaxcnn.data import load_dataset
from flaxcnn.models.registry import get_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "net"
    assert main(["train", "--epochs", "2", "--out", str(out), "--quiet"]) == 0
    return out


def test_train_writes_the_run_directory(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("model", "dataset", "epochs", "train_accuracy", "test_accuracy", "seconds", "samples_per_second"):
        assert key in summary
    assert summary["model"] == "net" and summary["dataset"] == "cifar2" and summary["epochs"] == 2
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert (run_dir / "curves.png").stat().st_size > 1000
    assert (run_dir / "checkpoints" / "latest").is_dir() and (run_dir / "checkpoints" / "best.json").exists()
    assert "shipped sample" in json.loads((run_dir / "config.json").read_text())["dataset"]["source"]


def test_evaluate_json_matches_summary(run_dir, capsys):
    assert main(["evaluate", "--run", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert result["epoch"] == 2


def test_export_loads_into_the_labs_torch_class_with_same_logits(run_dir, tmp_path, capsys):
    path = tmp_path / "model.pt"
    assert main(["export", "--run", str(run_dir), "--out", str(path)]) == 0
    tmodel = get_model("net").build_torch()
    tmodel.load_state_dict(torch.load(path, weights_only=True), strict=True)
    tmodel.eval()
    from flaxcnn.train.loop import load_run
    from flaxcnn.train.state import to_model

    session, state, _ = load_run(run_dir)
    x = load_dataset("cifar2").test.x[:64]
    with torch.no_grad():
        expected = tmodel(torch.from_numpy(x)).numpy()
    got = np.asarray(to_model(session.graphs, state)(x))
    assert np.max(np.abs(got - expected)) <= 1e-5


def test_resume_of_a_finished_run_extends_it(run_dir, tmp_path):
    run = shutil.copytree(run_dir, tmp_path / "net")  # the module's run stays as the other tests read it
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--quiet"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_lr_find_writes_plot(tmp_path, capsys):
    plot = tmp_path / "lr.png"
    assert main(["lr-find", "--num-iter", "8", "--start-lr", "1e-5", "--end-lr", "1", "--plot", str(plot),
                 "--quiet"]) == 0
    assert plot.stat().st_size > 1000
    assert "suggested learning rate" in capsys.readouterr().out


def test_presets_and_models_list(capsys):
    assert main(["presets"]) == 0
    assert "lab8-wd" in capsys.readouterr().out
    assert main(["models"]) == 0
    assert "net-batchnorm" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet"], "net-batchnorm"),
    (["--dataset", "mnist"], "cifar2"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
    (["--model", "convnet"], "speech model and cannot train on 'cifar2'"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    assert main(["train", *args, "--out", str(out), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
