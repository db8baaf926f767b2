"""The ops the models are built from, against PyTorch (values and gradients, ties included)."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from flaxcnn import kernels
from flaxcnn.models import ops
from flaxcnn.models.conv_policy import DEFAULT, ConvLayer, PoolLayer
from flaxcnn.models.ops import band_width, banded_conv, kernel_grad_by_rows, max_pool, split_batch
from tests.test_kernels import _torch_conv as _torch_conv_with_input_grad


def _torch_pool_grad(x, k, weights):
    t = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    out = torch.nn.functional.max_pool2d(t, k)
    (out * torch.tensor(weights.transpose(0, 3, 1, 2))).sum().backward()
    return out.detach().numpy().transpose(0, 2, 3, 1), t.grad.numpy().transpose(0, 2, 3, 1)


def _pool_names():
    names = ["taps", "argmax"]
    if jax.default_backend() == "cpu" and kernels.available():
        names.append("cpp")
    return names


@pytest.fixture(params=_pool_names())
def pool_impl(request):
    """Each pool test runs on every implementation (XLA's taps and argmax, the C++ kernel)."""
    return request.param


def _ours(x, k, weights, name):
    """Forward (alone, and with its first-maximum residual) and backward of one implementation."""
    impl = ops.POOLS[name]
    pool = PoolLayer(*x.shape, k, kernels.selected_isa() if name == "cpp" else None)
    y_alone = impl.forward(jnp.asarray(x), pool)
    y, first = impl.train_forward(jnp.asarray(x), pool)
    np.testing.assert_array_equal(np.asarray(y_alone), np.asarray(y))
    dx = impl.backward(first, jnp.asarray(weights), pool, x.shape)
    return np.asarray(y), np.asarray(dx)


@pytest.mark.parametrize("shape, k", [((3, 32, 32, 4), 2), ((2, 90, 17, 3), 4), ((2, 15, 9, 2), 2)])
def test_values_and_gradients_equal_torch(shape, k, pool_impl):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out_shape = (shape[0], shape[1] // k, shape[2] // k, shape[3])
    weights = np.random.default_rng(1).standard_normal(out_shape).astype(np.float32)
    ours, ours_grad = _ours(x, k, weights, pool_impl)
    ref, ref_grad = _torch_pool_grad(x, k, weights)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours_grad, ref_grad)


def test_ties_send_the_gradient_to_the_first_maximum_like_torch(pool_impl):
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, :2, :2, 0] = 1.0  # a window of four equal maxima
    x[0, 2, 3, 0] = x[0, 3, 2, 0] = 5.0  # two tied maxima, not first in the window
    weights = np.ones((1, 2, 2, 1), np.float32)
    _, ours_grad = _ours(x, 2, weights, pool_impl)
    _, ref_grad = _torch_pool_grad(x, 2, weights)
    np.testing.assert_array_equal(ours_grad, ref_grad)
    assert ours_grad.sum() == 4.0  # each window's gradient lands on exactly one element


@pytest.mark.parametrize("k", [2, 3, 4])  # the taps-chain (2x2) and the argmax (larger) paths
def test_ties_in_every_window_size_follow_torch(k, pool_impl):
    rng = np.random.default_rng(k)
    x = rng.integers(0, 3, (2, 4 * k + 1, 3 * k, 3)).astype(np.float32)  # many tied maxima; a cropped edge
    weights = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    ours, ours_grad = _ours(x, k, weights, pool_impl)
    ref, ref_grad = _torch_pool_grad(x, k, weights)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours_grad, ref_grad)


def _torch_conv(x, w, pad, grad_weights):
    """PyTorch's conv2d on an NHWC batch and HWIO kernel: output and kernel gradient (in float64)."""
    tx = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64)
    tw = torch.tensor(w.transpose(3, 2, 0, 1), dtype=torch.float64, requires_grad=True)
    out = torch.nn.functional.conv2d(tx, tw, padding=pad)
    (out * torch.tensor(grad_weights.transpose(0, 3, 1, 2), dtype=torch.float64)).sum().backward()
    return out.detach().numpy().transpose(0, 2, 3, 1), tw.grad.numpy().transpose(2, 3, 1, 0)


# the lab layers that take the banded path (Net/NetWidth conv1, ConvNet conv1), a block width that
# does not divide the output width, and odd shapes
@pytest.mark.parametrize("hw, c, o, k, pad", [((32, 32), 3, 16, 3, 1), ((32, 32), 3, 32, 3, 1),
                                              ((99, 26), 1, 10, 10, 0), ((9, 30), 2, 24, 3, 1),
                                              ((7, 5), 4, 3, 2, 0)])
def test_banded_conv_is_the_convolution(hw, c, o, k, pad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *hw, c)).astype(np.float32)
    w = (rng.standard_normal((k, k, c, o)) / k).astype(np.float32)
    out_hw = (hw[0] + 2 * pad - k + 1, hw[1] + 2 * pad - k + 1)
    grad_weights = rng.standard_normal((2, *out_hw, o)).astype(np.float32)
    ref, ref_grad = _torch_conv(x, w, pad, grad_weights)
    pads = ((pad, pad), (pad, pad))
    out, vjp = jax.vjp(lambda kernel: banded_conv(jnp.asarray(x), kernel, pads), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(grad_weights))[0]), ref_grad, rtol=1e-5, atol=2e-4)


def test_band_width_takes_whole_narrow_rows_and_blocks_wide_ones():
    assert band_width(17, 10) == 17  # ConvNet: one matmul row per output row
    assert band_width(32, 16) == 8  # Net: 8 columns x 16 channels
    assert band_width(32, 300) == 1


def _conv_inputs(c: int = 3):
    x = jnp.ones((1, 8, 8, c))
    w = jnp.ones((3, 3, c, 4))
    return x, w, lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("kwargs", [dict(window_strides=(2, 2)), dict(padding="SAME"),
                                    dict(rhs_dilation=(2, 2)), dict(feature_group_count=3)])
def test_other_convolutions_go_to_xla_unchanged(kwargs):
    x, w, dn = _conv_inputs()
    if "feature_group_count" in kwargs:
        w = w[:, :, :1, :3]
    args = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=dn) | kwargs
    with mock.patch.object(ops, "conv2d", side_effect=AssertionError("dispatched")):
        out = ops.conv_general_dilated(x, w, **args)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(lax.conv_general_dilated(x, w, **args)))


def _torch_conv_all(x, w, padding, g):
    """PyTorch's conv2d in float64 (``tests.test_kernels._torch_conv``) by part name."""
    out, dx, dw = _torch_conv_with_input_grad(x, w, padding, g)
    return {"forward": out, "input_grad": dx, "kernel_grad": dw}


def _implementations():
    cases = []
    for part, impls in ops.PARTS.items():
        for name in impls:
            cases.append((part, name))
    return cases


# every implementation of every part, on a lab-like layer and an odd one (asymmetric padding,
# channel counts without a C++ kernel fall back to skipping the cpp case)
@pytest.mark.parametrize("part, name", _implementations())
@pytest.mark.parametrize("n, hw, c, o, k, padding", [(5, (12, 10), 3, 16, 3, ((1, 1), (1, 1))),
                                                     (4, (9, 7), 8, 10, 2, ((0, 1), (2, 0)))])
def test_every_implementation_of_every_part_equals_torch(part, name, n, hw, c, o, k, padding):
    isa = kernels.selected_isa() if jax.default_backend() == "cpu" and kernels.available() else None
    if name == "cpp" and (isa is None or not kernels.supports_conv(c, o, jnp.float32)[part]):
        pytest.skip("no C++ kernel for this part here")
    layer = ConvLayer(n, *hw, (k, k, c, o), padding, None, isa)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((n, *hw, c)).astype(np.float32)
    w = (rng.standard_normal((k, k, c, o)) / k).astype(np.float32)
    g = rng.standard_normal((n, *layer.out_hw, o)).astype(np.float32)
    ref = _torch_conv_all(x, w, padding, g)[part]
    args = {"forward": (x, w), "kernel_grad": (x, g), "input_grad": (g, w)}[part]
    out = np.asarray(ops.PARTS[part][name](*map(jnp.asarray, args), layer))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_a_convolution_under_the_default_policy_and_its_gradients_equal_torch():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((8, 10, 10, 16)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 16, 8)) / 12).astype(np.float32)
    g = rng.standard_normal((8, 10, 10, 8)).astype(np.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ops.NHWC_HWIO)
    conv = lambda a, b: ops.conv_general_dilated(a, b, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
    out, vjp = jax.vjp(conv, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    ref = _torch_conv_all(x, w, ((1, 1), (1, 1)), g)
    for name, ours in (("forward", out), ("input_grad", dx), ("kernel_grad", dw)):
        np.testing.assert_allclose(np.asarray(ours), ref[name], rtol=0, atol=1e-5 * np.abs(ref[name]).max())


def test_a_pool_under_the_default_policy_equals_torch_in_training_and_evaluation():
    x = np.random.default_rng(9).integers(0, 4, (4, 9, 8, 3)).astype(np.float32)  # ties, a cropped row
    weights = np.random.default_rng(10).standard_normal((4, 4, 4, 3)).astype(np.float32)
    y, vjp = jax.vjp(lambda a: max_pool(a, 2, DEFAULT), jnp.asarray(x))
    ref, ref_grad = _torch_pool_grad(x, 2, weights)
    np.testing.assert_array_equal(np.asarray(y), ref)
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(weights))[0]), ref_grad)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: max_pool(a, 2, DEFAULT))(jnp.asarray(x))), ref)


@pytest.mark.parametrize("hw, c, o, k, pad", [((16, 16), 32, 64, 3, 1), ((9, 7), 3, 5, 3, 0)])
def test_row_kernel_gradient_is_the_convolution_gradient(hw, c, o, k, pad):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *hw, c)).astype(np.float32)
    w = (rng.standard_normal((k, k, c, o)) / (k * np.sqrt(c))).astype(np.float32)
    out_hw = (hw[0] + 2 * pad - k + 1, hw[1] + 2 * pad - k + 1)
    grad_weights = rng.standard_normal((2, *out_hw, o)).astype(np.float32)
    _, ref_grad = _torch_conv(x, w, pad, grad_weights)
    pads = ((pad, pad), (pad, pad))
    grad_w = kernel_grad_by_rows(jnp.asarray(x), jnp.asarray(grad_weights), w.shape, pads)
    np.testing.assert_allclose(np.asarray(grad_w), ref_grad, rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("n, parts, slices", [(64, 2, 2), (50, 3, 3), (2, 3, 2), (1, 2, 1), (64, 1, 1)])
def test_split_batch_is_the_same_convolution_in_slices(n, parts, slices):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((n, 6, 5, 3)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)).astype(np.float32))
    calls = []

    def conv(a):
        calls.append(a.shape[0])
        return lax.conv_general_dilated(a, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    out = split_batch(conv, x, parts)
    assert len(calls) == slices and sum(calls) == n
    whole = conv(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(whole))  # each row computed as before
