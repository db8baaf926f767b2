"""Parity's precision is scoped to each check: set while it compares, never left set after.

tests/conftest.py sets nothing, so a check that forgot to scope its precision would compare at
the backend's default; these tests catch that by asserting the setting at the point of comparison.
"""

import jax
import numpy as np
import torch

import parity.checks
import parity.layers
from flaxcnn import convert
from flaxcnn.models.registry import get_model
from parity.precision import full_precision, is_full_precision


def test_full_precision_is_set_for_the_block_only():
    before = (jax.config.jax_default_matmul_precision, torch.backends.cuda.matmul.allow_tf32)
    with full_precision():
        assert is_full_precision() and not torch.backends.cuda.matmul.allow_tf32
    assert (jax.config.jax_default_matmul_precision, torch.backends.cuda.matmul.allow_tf32) == before
    assert not is_full_precision()


def _asserting(function, seen: list):
    def wrapped(*args, **kwargs):
        seen.append(is_full_precision())
        return function(*args, **kwargs)

    return wrapped


def test_check_model_compares_at_full_precision_and_leaves_nothing_set(monkeypatch):
    seen: list[bool] = []
    monkeypatch.setattr(parity.checks, "_max_abs", _asserting(parity.checks._max_abs, seen))
    result = parity.checks.check_model(get_model("net"), batch=4)
    assert result.passed and seen and all(seen)
    assert not is_full_precision()


def test_compare_layers_compares_at_full_precision_and_leaves_nothing_set(monkeypatch):
    seen: list[bool] = []
    monkeypatch.setattr(parity.layers, "_diff", _asserting(parity.layers._diff, seen))
    spec = get_model("net")
    torch.manual_seed(0)
    tmodel = spec.build_torch()
    fmodel = convert.load_torch_state_dict(spec.build(seed=0), tmodel.state_dict())
    x = np.random.default_rng(0).standard_normal(spec.example_shape(4)).astype(np.float32)
    report = parity.layers.compare_layers(tmodel, fmodel, x)
    assert report.passed and seen and all(seen)
    assert not is_full_precision()
