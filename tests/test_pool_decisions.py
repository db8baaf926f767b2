"""Max-pool window choices made by rounding are found, replayed into PyTorch as flaxcnn chose, and only those."""

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx

from flaxcnn.models import nn as N
from parity.pool_decisions import (pool_choices_to_replay, record_flax_pool_inputs, record_torch_pool_inputs,
                                   replay_torch_pool_choices)


def _recorded(x: torch.Tensor, pool: torch.nn.Module):
    with record_torch_pool_inputs() as seen:
        pool(x)
    return seen


def test_a_window_tied_by_rounding_routes_its_gradient_as_flaxcnn_chose():
    # window 0: PyTorch's four zeros (a ReLU blocked element 1) against flaxcnn's tiny positive element 1;
    # window 1: the same maximum on both sides
    x = torch.tensor([[[[0.0, 0.0, 5.0, 1.0], [0.0, 0.0, 1.0, 1.0]]]], requires_grad=True)
    seen = _recorded(x, torch.nn.MaxPool2d(2))
    assert len(seen) == 1 and seen.settings[0]["kernel_size"] == 2 and seen.settings[0]["stride"] == 2
    flax_in = [np.array([[[[0.0, 1e-7, 5.0, 1.0], [0.0, 0.0, 1.0, 1.0]]]], np.float32)]
    replay = pool_choices_to_replay(seen, flax_in, rtol=1e-5)
    assert replay.tolerated == 1 and replay.beyond_tolerance == 0 and not replay.unpaired
    with replay_torch_pool_choices(replay):
        out = torch.nn.MaxPool2d(2)(x)
    out.sum().backward()
    np.testing.assert_array_equal(out.detach().numpy(), [[[[0.0, 5.0]]]])  # PyTorch's values
    np.testing.assert_array_equal(x.grad.numpy(), [[[[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]])


def test_a_choice_that_differs_without_a_near_tie_is_not_replayed():
    x = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    seen = _recorded(x, torch.nn.MaxPool2d(2))
    replay = pool_choices_to_replay(seen, [np.array([[[[0.0, 1.0], [0.0, 0.0]]]], np.float32)], rtol=1e-5)
    assert replay.tolerated == 0 and replay.beyond_tolerance == 1


def test_overlapping_ceil_mode_windows_and_unpaired_calls():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 7)
    pool = torch.nn.MaxPool2d(3, stride=2, ceil_mode=True)
    seen = _recorded(x, pool)
    assert seen.settings[0]["ceil_mode"] is True
    same = pool_choices_to_replay(seen, [x.numpy()], rtol=1e-5)
    assert same.tolerated == 0 and same.beyond_tolerance == 0
    assert "PyTorch made 1 max-pool calls, flaxcnn 0" in pool_choices_to_replay(seen, [], rtol=1e-5).unpaired
    assert "(NCHW)" in pool_choices_to_replay(seen, [x.numpy()[:1]], rtol=1e-5).unpaired


def test_flax_max_pools_are_recorded_in_nchw_under_jit():
    class Model(nnx.Module):
        def __init__(self):
            self.pool = N.MaxPool2d(2)
            self.pool2 = N.MaxPool2d(3, stride=2, ceil_mode=True)

        def __call__(self, x):
            return self.pool2(self.pool(x))

    model = Model()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
    with record_flax_pool_inputs(model) as seen:
        nnx.jit(lambda m, x: m(x))(model, x)
    assert [a.shape for a in seen] == [(2, 3, 8, 8), (2, 3, 4, 4)]
    np.testing.assert_array_equal(seen[0], np.transpose(np.asarray(x), (0, 3, 1, 2)))
    assert model.pool.tap is None and model.pool2.tap is None  # the seam is put back
