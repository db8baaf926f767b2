"""The ops the models are built from, against PyTorch (values and gradients, ties included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxcnn.models.ops import max_pool


def _torch_pool_grad(x, k, weights):
    t = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    out = torch.nn.functional.max_pool2d(t, k)
    (out * torch.tensor(weights.transpose(0, 3, 1, 2))).sum().backward()
    return out.detach().numpy().transpose(0, 2, 3, 1), t.grad.numpy().transpose(0, 2, 3, 1)


def _ours(x, k, weights):
    y, vjp = jax.vjp(lambda a: max_pool(a, k), jnp.asarray(x))
    return np.asarray(y), np.asarray(vjp(jnp.asarray(weights))[0])


@pytest.mark.parametrize("shape, k", [((3, 32, 32, 4), 2), ((2, 90, 17, 3), 4), ((2, 15, 9, 2), 2)])
def test_values_and_gradients_equal_torch(shape, k):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out_shape = (shape[0], shape[1] // k, shape[2] // k, shape[3])
    weights = np.random.default_rng(1).standard_normal(out_shape).astype(np.float32)
    ours, ours_grad = _ours(x, k, weights)
    ref, ref_grad = _torch_pool_grad(x, k, weights)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours_grad, ref_grad)


def test_ties_send_the_gradient_to_the_first_maximum_like_torch():
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, :2, :2, 0] = 1.0  # a window of four equal maxima
    x[0, 2, 3, 0] = x[0, 3, 2, 0] = 5.0  # two tied maxima, not first in the window
    weights = np.ones((1, 2, 2, 1), np.float32)
    _, ours_grad = _ours(x, 2, weights)
    _, ref_grad = _torch_pool_grad(x, 2, weights)
    np.testing.assert_array_equal(ours_grad, ref_grad)
    assert ours_grad.sum() == 4.0  # each window's gradient lands on exactly one element
