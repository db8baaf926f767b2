"""Nonsense on the command line: exit status 2, one line naming what is accepted, before any work.

"Before any work" is proven, not timed: the engine (``fit``), the data loader and the model
builder are replaced by functions that fail the test if they are reached, and ``--out`` must
not exist afterwards. One test runs the real ``flaxcnn`` console script in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flaxcnn import cli
from flaxcnn.data import DATASETS
from flaxcnn.models.registry import MODELS
from flaxcnn.train.config import PRESETS

CONSOLE_SCRIPT = Path(sys.executable).with_name("flaxcnn")


@pytest.fixture()
def no_work(monkeypatch):
    """Make every piece of real work a test failure."""
    import flaxcnn.data
    import flaxcnn.train.loop
    from flaxcnn.models.registry import ModelSpec

    def reached(*args, **kwargs):
        raise AssertionError("a refused command reached real work")

    monkeypatch.setattr(flaxcnn.train.loop, "fit", reached)
    monkeypatch.setattr(flaxcnn.train.loop, "load_dataset", reached)
    monkeypatch.setattr(flaxcnn.data, "load_dataset", reached)
    monkeypatch.setattr(ModelSpec, "build", reached)


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse refuses malformed values itself
        code = exit_.code
    return code, capsys.readouterr().err


CONFIG_ERRORS = {
    "negative lr": (["--lr", "-0.1"], "--lr must be a positive number, got -0.1"),
    "zero lr": (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    "nan lr": (["--lr", "nan"], "--lr must be a positive number, got nan"),
    "infinite lr": (["--lr", "inf"], "--lr must be a positive number, got inf"),
    "zero batch": (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    "negative batch": (["--batch-size", "-8"], "--batch-size must be an integer >= 1, got -8"),
    "zero epochs": (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    "momentum 1": (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    "negative momentum": (["--momentum", "-0.5"], "--momentum must be in [0, 1), got -0.5"),
    "negative weight decay": (["--weight-decay=-1e-3"], "--weight-decay must be >= 0, got -0.001"),
    "negative l2": (["--l2", "-1"], "--l2 must be >= 0, got -1.0"),
    "val fraction 1": (["--val-fraction", "1"], "--val-fraction must be in [0, 1), got 1.0"),
    "checkpoint every 0": (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1, got 0"),
    "negative seed": (["--seed", "-1"], "--seed must be >= 0, got -1"),
    "unknown model": (["--model", "resnet"], "unknown model 'resnet'; choose one of: " + ", ".join(MODELS)),
    "unknown dataset": (["--dataset", "mnist"], "unknown dataset 'mnist'; choose one of: " + ", ".join(DATASETS)),
    "model of the other lab": (["--model", "convnet"], "model 'convnet' is a speech model and cannot train on "
                                                       "'cifar2'; cifar models: net, net-width"),
    "unknown preset": (["--preset", "lab9"], "unknown preset 'lab9'; choose one of: " + ", ".join(PRESETS)),
    "unknown class id": (["--classes", "3,12"], "unknown class ids [12]"),
    "one class": (["--classes", "3"], "at least two classes are needed"),
    "classes for speech": (["--dataset", "speech", "--classes", "3,5"], "--classes applies to CIFAR data sets only"),
}

ARGPARSE_ERRORS = {
    "epochs not a number": (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
    "classes not numbers": (["--classes", "cat,dog"], "--classes takes comma-separated CIFAR-10 label ids"),
    "unknown path": (["--path", "fast"], "argument --path: invalid choice: 'fast'"),
    "unknown init": (["--init", "zeros"], "argument --init: invalid choice: 'zeros'"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_bad_settings_are_refused_before_any_work(tmp_path, capsys, no_work, case):
    args, message = CONFIG_ERRORS[case]
    out = tmp_path / "run"
    code, err = run_main(["train", *args, "--out", str(out)], capsys)
    assert code == 2
    assert err.startswith("flaxcnn: error: ") and message in err, err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(ARGPARSE_ERRORS))
def test_malformed_values_are_refused_by_the_parser(tmp_path, capsys, no_work, case):
    args, message = ARGPARSE_ERRORS[case]
    out = tmp_path / "run"
    code, err = run_main(["train", *args, "--out", str(out)], capsys)
    assert code == 2 and message in err and "usage: flaxcnn train" in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_commands_on_a_folder_that_is_not_a_run(tmp_path, capsys, no_work, command):
    (tmp_path / "stuff").mkdir()
    extra = ["--out", str(tmp_path / "x.pt")] if command == "export" else []
    code, err = run_main([command, "--run", str(tmp_path / "stuff"), *extra], capsys)
    assert code == 2 and f"{tmp_path / 'stuff'} is not a flaxcnn run directory (no config.json)" in err
    assert not (tmp_path / "x.pt").exists()


def test_the_console_script_refuses_with_status_2(tmp_path):
    """The installed ``flaxcnn`` entry point: same message, status 2, nothing created."""
    script = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "flaxcnn.cli"]
    out = tmp_path / "run"
    proc = subprocess.run([*script, "train", "--momentum", "1.5", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "flaxcnn: error: --momentum must be in [0, 1), got 1.5"
    assert "Traceback" not in proc.stderr
    assert proc.stdout == "" and not out.exists()
