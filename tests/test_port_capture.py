"""flaxcnn.port.capture: what is traced (layers and custom classes kept as calls, both modes,
shapes on every node) and the errors for what cannot be ported (every unsupported node in one
error, data-dependent control flow), with no output folder left behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flaxcnn.errors import ConfigError
from flaxcnn.port import port
from flaxcnn.port.capture import capture, is_custom
from flaxcnn.port.errors import TraceControlFlowError, UnsupportedModelError
from flaxcnn.port.ops import rank_of
from tests.port_check import example


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return F.dropout(self.conv(x), 0.2, self.training) + x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(Block(), nn.ReLU())
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_custom_classes_are_leaves_traced_on_their_own_in_both_modes():
    model = Net()
    cap = capture(model, example((2, 3, 5, 5)))
    assert set(cap.instances) == {"", "features.0"}
    top = cap.instances[""].graphs["eval"]
    assert [n.target for n in top.nodes if n.op == "call_module"] == ["features.0", "features.1", "fc"]
    block = cap.instances["features.0"]
    train_ops = [n.target for n in block.graphs["train"].nodes if n.op == "call_function"]
    eval_ops = [n.target for n in block.graphs["eval"].nodes if n.op == "call_function"]
    assert F.dropout in train_ops and F.dropout in eval_ops  # training=True / False baked in
    drop = next(n for n in block.graphs["train"].nodes if n.target is F.dropout)
    assert drop.kwargs["training"] is True
    assert next(n for n in block.graphs["eval"].nodes if n.target is F.dropout).kwargs["training"] is False
    for inst in cap.instances.values():
        for graph in inst.graphs.values():
            for node in graph.nodes:
                if node.op not in ("output",) and node.meta.get("type") is torch.Tensor:
                    assert rank_of(node) is not None, node
    assert cap.input_chw == (3, 5, 5) and tuple(cap.torch_output.shape) == (2, 2)
    assert model.training  # the user's module is not touched (a copy is traced)


def test_is_custom():
    assert is_custom(Block()) and not is_custom(nn.Conv2d(1, 1, 1)) and not is_custom(nn.Sequential())
    assert not is_custom(nn.ModuleList())

    class Seq(nn.Sequential):
        pass

    assert is_custom(Seq(nn.ReLU()))


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.rnn = nn.LSTM(4, 4)

    def forward(self, x):
        x = self.conv(x)
        y = torch.fft.fft(x).real
        out, _ = self.rnn(y.flatten(2).permute(2, 0, 1))
        return out.sum(0)


def test_unsupported_nodes_are_listed_in_one_error_and_nothing_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UnsupportedModelError) as info:
        port(Unsupported(), example((2, 3, 6, 6)), out_dir=out, prove=False)
    message = str(info.value)
    assert "3 unsupported operation(s)" in message  # fft, its .real, the LSTM (not the nodes after them)
    assert "torch._C._fft.fft_fft" in message and "attribute .real" in message and "rnn (torch.nn.LSTM)" in message
    assert "test_port_capture.py:" in message  # the source line of each
    assert "Supported: layers nn.Conv2d" in message
    assert isinstance(info.value, ConfigError)
    assert list(tmp_path.iterdir()) == []


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            return x
        return -x


def test_data_dependent_control_flow_is_a_clear_error(tmp_path):
    with pytest.raises(TraceControlFlowError) as info:
        port(nn.Sequential(nn.ReLU(), Branchy()), example((2, 3, 4, 4)), out_dir=tmp_path / "out", prove=False)
    message = str(info.value)
    assert message.startswith("Branchy.forward has data-dependent control flow at test_port_capture.py:")
    assert "if x.sum() > 0:" in message and "Traceback" not in message
    assert list(tmp_path.iterdir()) == []


class OwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale.view(1, 3, 1, 1)


def test_a_parameter_outside_a_layer_is_unsupported():
    with pytest.raises(UnsupportedModelError, match="tensor scale held by custom class OwnParameter"):
        port(OwnParameter(), example((2, 3, 4, 4)), prove=False)


def test_example_input_must_be_an_nchw_batch():
    with pytest.raises(ConfigError, match=r"\(N, C, H, W\)"):
        port(Net(), np.zeros((3, 5, 5), np.float32), prove=False)


class WithUnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.aux = Block()  # built (its weights are in the state dict) but never called

    def forward(self, x):
        return self.conv(x)


def test_a_custom_module_never_called_keeps_its_weights_and_refuses_calls():
    from tests.port_check import assert_ports

    result = assert_ports(WithUnusedHead().eval(), example((2, 3, 4, 4)))
    assert "never called by the traced forward" in result.source
    with pytest.raises(NotImplementedError):
        result.module.aux(np.zeros((1, 4, 4, 3), np.float32))
