"""``flaxcnn port FILE.py:NAME``: files written, report printed, exit codes, clear input errors."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from flaxcnn.cli import main

MODEL_FILE = textwrap.dedent('''
    import torch
    from torch import nn


    class Small(nn.Module):
        def __init__(self, width=4, classes=3):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.fc = nn.Linear(width, classes)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            return self.fc(x.mean((2, 3)))


    def small(width=2):
        return Small(width=width, classes=2)
''')


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(MODEL_FILE)
    return path


def test_port_command_writes_the_folder_and_the_report(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["port", f"{model_file}:Small", "--input-shape", "3,6,6", "--kwargs", '{"width": 5}',
                 "--batch", "3", "--class-name", "Ported", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert sorted(p.name for p in out.iterdir()) == ["model.py", "parity.json", "weights.npz"]
    assert "class Ported(nnx.Module):" in (out / "model.py").read_text()
    assert "N.Conv2d(3, 5, kernel_size=3" in (out / "model.py").read_text()
    assert json.loads((out / "parity.json").read_text())["passed"] is True
    assert "verdict: passed" in printed and f"wrote {out}/model.py (class Ported)" in printed


def test_port_command_with_a_factory_and_a_state_dict(model_file, tmp_path, capsys):
    import numpy as np

    from flaxcnn.port.cli import load_torch_model

    weights = tmp_path / "w.pt"
    trained = load_torch_model(f"{model_file}:small", {})
    with torch.no_grad():
        trained.fc.bias.fill_(0.25)
    torch.save(trained.state_dict(), weights)
    out = tmp_path / "out"
    assert main(["port", f"{model_file}:small", "--input-shape", "3,4,4", "--state-dict", str(weights),
                 "--out", str(out)]) == 0
    with np.load(out / "weights.npz") as arrays:
        np.testing.assert_array_equal(arrays["fc.bias"], np.full(2, 0.25, np.float32))


@pytest.mark.parametrize("argv, message", [
    (["{file}:Small", "--input-shape", "3,6"], "--input-shape takes C,H,W"),
    (["{file}:Small", "--input-shape", "3,6,6", "--kwargs", "{width: 5}"], "--kwargs is not valid JSON"),
    (["{file}:Small", "--input-shape", "3,6,6", "--kwargs", "[1]"], "must be a JSON object"),
    (["{dir}/missing.py:Small", "--input-shape", "3,6,6"], "model file .* not found"),
    (["{file}:Nope", "--input-shape", "3,6,6"], "defines no class or function 'Nope'; its nn.Module classes: Small"),
    (["{file}:Small", "--input-shape", "3,6,6", "--kwargs", '{"depth": 1}'], "unexpected keyword"),
    (["{file}:Small", "--input-shape", "3,6,6", "--state-dict", "{dir}/none.pt"], "checkpoint file not found"),
])
def test_port_command_bad_input_is_one_line_and_exit_2(model_file, tmp_path, capsys, argv, message):
    import re

    out = tmp_path / "out"
    argv = [a.replace("{file}", str(model_file)).replace("{dir}", str(tmp_path)) for a in argv]
    assert main(["port", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flaxcnn: error: ") and re.search(message, err), err
    assert not out.exists()
