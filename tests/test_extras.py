"""Each command that needs an optional dependency says, in one line, which extra to install."""

import sys

import pytest

from flaxcnn.cli import main


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def without_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError


def test_export_without_torch(without_torch, tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "m.pt")]) == 2
    assert _one_error_line(capsys) == ("flaxcnn: error: flaxcnn export needs PyTorch, which is not installed: "
                                       "pip install 'flaxcnn[torch]'")


def test_parity_without_torch(without_torch, capsys):
    assert main(["parity", "--models", "net"]) == 2
    assert "flaxcnn parity needs PyTorch" in _one_error_line(capsys)


def test_port_without_torch(without_torch, tmp_path, capsys):
    model_file = tmp_path / "m.py"
    model_file.write_text("import torch\n")
    assert main(["port", f"{model_file}:Net", "--input-shape", "3,8,8", "--out", str(tmp_path / "out")]) == 2
    assert "flaxcnn port needs PyTorch" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_tfds_folder_without_tensorflow_datasets(monkeypatch, tmp_path, capsys):
    (tmp_path / "cifar10").mkdir()  # a tfds data_dir: the auto source picks tfds
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    assert main(["train", "--data-dir", str(tmp_path), "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert "needs tensorflow-datasets" in line and "pip install 'flaxcnn[tfds]'" in line
