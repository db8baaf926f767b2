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
from flaxcnn.models.ops import band_width, banded_conv, conv_with_row_kernel_grad, max_pool, split_batch


def _torch_pool_grad(x, k, weights):
    t = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    out = torch.nn.functional.max_pool2d(t, k)
    (out * torch.tensor(weights.transpose(0, 3, 1, 2))).sum().backward()
    return out.detach().numpy().transpose(0, 2, 3, 1), t.grad.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(params=["xla", "cpp"])
def pool_impl(request):
    """Each pool test runs on both implementations: XLA's taps/argmax and the C++ kernel."""
    if request.param == "xla":
        with mock.patch.object(kernels, "supports_pool", return_value=False):
            yield "xla"
    else:
        if jax.default_backend() != "cpu" or not kernels.available():
            pytest.skip("the C++ kernels run on the CPU backend and need a C++ compiler")
        with mock.patch.object(ops, "TAPS_ARGMAX_MAX_WINDOW", 0):  # every window size to C++
            yield "cpp"


def _ours(x, k, weights):
    y, vjp = jax.vjp(lambda a: max_pool(a, k), jnp.asarray(x))
    return np.asarray(y), np.asarray(vjp(jnp.asarray(weights))[0])


@pytest.mark.parametrize("shape, k", [((3, 32, 32, 4), 2), ((2, 90, 17, 3), 4), ((2, 15, 9, 2), 2)])
def test_values_and_gradients_equal_torch(shape, k, pool_impl):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out_shape = (shape[0], shape[1] // k, shape[2] // k, shape[3])
    weights = np.random.default_rng(1).standard_normal(out_shape).astype(np.float32)
    ours, ours_grad = _ours(x, k, weights)
    ref, ref_grad = _torch_pool_grad(x, k, weights)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours_grad, ref_grad)


def test_ties_send_the_gradient_to_the_first_maximum_like_torch(pool_impl):
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, :2, :2, 0] = 1.0  # a window of four equal maxima
    x[0, 2, 3, 0] = x[0, 3, 2, 0] = 5.0  # two tied maxima, not first in the window
    weights = np.ones((1, 2, 2, 1), np.float32)
    _, ours_grad = _ours(x, 2, weights)
    _, ref_grad = _torch_pool_grad(x, 2, weights)
    np.testing.assert_array_equal(ours_grad, ref_grad)
    assert ours_grad.sum() == 4.0  # each window's gradient lands on exactly one element


@pytest.mark.parametrize("k", [2, 3, 4])  # the taps-chain (2x2) and the argmax (larger) paths
def test_ties_in_every_window_size_follow_torch(k, pool_impl):
    rng = np.random.default_rng(k)
    x = rng.integers(0, 3, (2, 4 * k + 1, 3 * k, 3)).astype(np.float32)  # many tied maxima; a cropped edge
    weights = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    ours, ours_grad = _ours(x, k, weights)
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
                                    dict(rhs_dilation=(2, 2)), dict(c=8)])
def test_other_convolutions_go_to_xla_unchanged(kwargs):
    x, w, dn = _conv_inputs(kwargs.pop("c", 3))
    args = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=dn) | kwargs
    with mock.patch.object(ops, "banded_conv", side_effect=AssertionError("banded path taken")), \
            mock.patch.object(kernels, "conv2d", side_effect=AssertionError("C++ kernel taken")):
        out = ops.conv_general_dilated(x, w, **args)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(lax.conv_general_dilated(x, w, **args)))


def test_without_cpp_kernels_few_channel_convolutions_are_banded_on_cpu():
    x, w, dn = _conv_inputs()
    with mock.patch.object(kernels, "available", return_value=False), \
            mock.patch.object(ops, "banded_conv", wraps=ops.banded_conv) as banded:
        ops.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
    assert banded.call_count == (1 if jax.default_backend() == "cpu" else 0)


@pytest.mark.parametrize("hw, c, o, k, pad", [((16, 16), 32, 64, 3, 1), ((9, 7), 3, 5, 3, 0)])
def test_row_kernel_gradient_is_the_convolution_gradient(hw, c, o, k, pad):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *hw, c)).astype(np.float32)
    w = (rng.standard_normal((k, k, c, o)) / (k * np.sqrt(c))).astype(np.float32)
    out_hw = (hw[0] + 2 * pad - k + 1, hw[1] + 2 * pad - k + 1)
    grad_weights = rng.standard_normal((2, *out_hw, o)).astype(np.float32)
    ref, ref_grad = _torch_conv(x, w, pad, grad_weights)
    pads = ((pad, pad), (pad, pad))
    out, vjp = jax.vjp(lambda a, b: conv_with_row_kernel_grad(a, b, pads), jnp.asarray(x), jnp.asarray(w))
    grad_x, grad_w = vjp(jnp.asarray(grad_weights))
    xla_grad_x = jax.vjp(lambda a: lax.conv_general_dilated(a, jnp.asarray(w), (1, 1), pads,
                                                            dimension_numbers=("NHWC", "HWIO", "NHWC")),
                         jnp.asarray(x))[1](jnp.asarray(grad_weights))[0]
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(grad_w), ref_grad, rtol=1e-5, atol=2e-4)
    np.testing.assert_array_equal(np.asarray(grad_x), np.asarray(xla_grad_x))


def test_without_cpp_kernels_wide_layers_on_large_maps_take_the_row_kernel_gradient():
    x, w = jnp.ones((1, 16, 16, 32)), jnp.ones((3, 3, 32, 64))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    with mock.patch.object(kernels, "available", return_value=False), \
            mock.patch.object(ops, "conv_with_row_kernel_grad", wraps=ops.conv_with_row_kernel_grad) as rows:
        ops.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
        ops.conv_general_dilated(x[:, :8, :8], w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)  # small map
        ops.conv_general_dilated(x, w[..., :32], (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)  # 32 -> 32
    assert rows.call_count == (1 if jax.default_backend() == "cpu" else 0)


@pytest.mark.parametrize("n, parts, slices", [(64, 2, 2), (50, 3, 3), (40, 3, 2), (20, 2, 1), (64, 1, 1)])
def test_split_batch_is_the_same_convolution_in_slices(n, parts, slices):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((n, 6, 5, 3)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)).astype(np.float32))
    calls = []

    def conv(a):
        calls.append(a.shape[0])
        return lax.conv_general_dilated(a, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    out = split_batch(conv, x, parts)
    assert len(calls) == slices and sum(calls) == n  # slices of at least ops.CONV_MIN_SLICE samples
    whole = conv(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(whole))  # each row computed as before
    loss = lambda kernel: jnp.sum(jnp.sin(split_batch(lambda a: lax.conv_general_dilated(
        a, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")), x, parts)))
    whole_loss = lambda kernel: jnp.sum(jnp.sin(lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))))
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(w)), np.asarray(jax.grad(whole_loss)(w)), rtol=1e-5, atol=1e-4)


def test_without_cpp_kernels_large_convolutions_are_split_over_the_cores():
    x, w = jnp.ones((64, 16, 16, 32)), jnp.ones((3, 3, 32, 32))  # NetDropout's conv2: 302 MFLOP
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    with mock.patch.object(kernels, "available", return_value=False), \
            mock.patch.object(ops, "CONV_BATCH_SPLITS", 2), \
            mock.patch.object(ops, "split_batch", wraps=ops.split_batch) as split:
        ops.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
        ops.conv_general_dilated(x[:, :8, :8], w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)  # 75 MFLOP
    assert split.call_count == (1 if jax.default_backend() == "cpu" else 0)
