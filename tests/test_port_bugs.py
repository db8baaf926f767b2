"""Bugs planted in a generated port: the proof fails and names the layer that holds each.

A small CNN is ported without its proof; each test changes one thing in the generated
``model.py`` (or, for the kernel, in the weights as a wrong converter would leave them), proves
the changed port against the untouched PyTorch module, and asserts that the proof fails in the
part the bug moves and names the layer. The unchanged port passes (the control).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flaxcnn.port import build_from_source, port
from flaxcnn.port.proof import prove


class Small(nn.Module):
    """Conv -> BN -> ReLU -> pool (padded, count_include_pad) -> conv -> BN -> ReLU -> pool ->
    flatten -> dropout -> linear: each kind of layer a planted bug touches."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = torch.flatten(x, 1)
        return self.fc(self.drop(x))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model = Small()
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    result = port(model, x, prove=False)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return model, x, result.source, state


def _prove(pair, source: str, after_build=None):
    model, x, _, state = pair

    def build_flax(dtype):
        built = build_from_source(source, "Small", dtype, state)
        return after_build(built) if after_build else built

    return prove(model, build_flax, x)


def _replace_once(source: str, old: str, new: str) -> str:
    assert source.count(old) == 1, f"expected one {old!r} in the generated source:\n{source}"
    return source.replace(old, new)


def test_the_unchanged_port_passes(pair):
    proof = _prove(pair, pair[2])
    assert proof.passed, proof.format()
    assert proof.first_divergent_layer is None


def test_a_transposed_conv_kernel_is_named(pair):
    def swap_kh_kw(model):  # HWIO -> WHIO: what a converter with the wrong axis order leaves
        model.conv2.kernel[...] = jnp.swapaxes(model.conv2.kernel[...], 0, 1)
        return model

    proof = _prove(pair, pair[2], swap_kh_kw)
    assert not proof.passed and proof.first_divergent_layer == "conv2", proof.format()
    assert not proof.parts["float32"]["forward"]["passed"]


def test_a_pooling_padding_counted_differently_is_named(pair):
    source = _replace_once(pair[2], "N.AvgPool2d(3, stride=2, padding=1", "N.AvgPool2d(3, stride=2, padding=1, count_include_pad=False")
    proof = _prove(pair, source)
    assert not proof.passed and proof.first_divergent_layer == "pool", proof.format()


def test_a_batchnorm_momentum_is_named(pair):
    source = _replace_once(pair[2], "N.BatchNorm2d(8, ", "N.BatchNorm2d(8, momentum=0.01, ")
    proof = _prove(pair, source)
    assert not proof.passed and proof.first_divergent_layer == "bn1", proof.format()
    assert proof.parts["float32"]["forward"]["passed"]  # eval forward from the same statistics: equal
    assert not proof.parts["float32"]["buffers"]["passed"]


def test_a_flatten_in_the_wrong_order_is_named(pair):
    source = _replace_once(pair[2], "N.nhwc_to_nchw(x).reshape(x.shape[0], -1)", "x.reshape(x.shape[0], -1)")
    proof = _prove(pair, source)
    # the flatten is inline code before `drop`: the first layer whose input differs
    assert not proof.passed and proof.first_divergent_layer == "drop", proof.format()
