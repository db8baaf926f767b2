"""flaxcnn.models.nn against torch.nn, layer by layer: forward outputs, gradients with respect to
the input and every parameter, and running statistics after one training step, in float64
(relative 1e-12) and float32 (relative 1e-5), with the layer's state converted from PyTorch by
flaxcnn.convert. 4-D arrays are NHWC on the Flax side, NCHW on PyTorch's."""

from __future__ import annotations

import contextlib
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from flax import nnx

from flaxcnn import convert
from flaxcnn.errors import ConversionError, InputShapeError
from flaxcnn.models import layers
from flaxcnn.models import nn as N

#: dtype name -> (torch dtype, jax dtype, relative tolerance)
DTYPES = {"float64": (torch.float64, jnp.float64, 1e-12), "float32": (torch.float32, jnp.float32, 1e-5)}
BOTH = pytest.mark.parametrize("dtype", list(DTYPES))


class TorchHolder(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer


class FlaxHolder(nnx.Module):
    def __init__(self, layer: nnx.Module):
        self.layer = layer


def to_flax(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


@contextlib.contextmanager
def precision(dtype: str):
    """float64 runs inside jax's scoped x64 mode (never the global flag)."""
    with jax.enable_x64(dtype == "float64"):
        yield


def assert_close(actual, expected, tol: float, what: str) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.nanmax(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def randomise(layer: torch.nn.Module, seed: int) -> None:
    """Random parameters (norm layers start at ones/zeros, which hide layout mistakes) and
    non-trivial running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        if getattr(layer, "running_var", None) is not None:
            layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=gen))
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=gen) + 0.5)
            layer.num_batches_tracked.fill_(3)


def check_layer(make_torch, make_flax, x_shape, dtype, *, train=True, seed=0, integers=False, torch_call=None):
    """One forward and backward pass on both sides; compares output, input gradient, every
    parameter gradient and the state afterwards (running statistics). Returns the Flax output."""
    tdtype, jdtype, tol = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, x_shape).astype(np.float64) if integers else rng.standard_normal(x_shape)
    tlayer = make_torch().to(tdtype)
    randomise(tlayer, seed)
    tlayer.train(train)
    before = {k: v.clone() for k, v in TorchHolder(tlayer).state_dict().items()}
    xt = torch.tensor(x, dtype=tdtype, requires_grad=True)
    yt = (torch_call or tlayer)(xt)
    g = rng.standard_normal(tuple(yt.shape))
    (yt * torch.tensor(g, dtype=tdtype)).sum().backward()
    with precision(dtype):
        model = convert.load_torch_state_dict(FlaxHolder(make_flax(jdtype)), before)
        model.train() if train else model.eval()
        xf, gf = jnp.asarray(to_flax(x), jdtype), jnp.asarray(to_flax(g), jdtype)

        def loss(m, inputs):
            y = m.layer(inputs)
            return jnp.sum(y * gf), y

        (_, yf), (grad_model, grad_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, xf)
        assert yf.dtype == jdtype and grad_x.dtype == jdtype
        assert_close(yf, to_flax(yt.detach().numpy()), tol, "output")
        assert_close(grad_x, to_flax(xt.grad.numpy()), tol, "input gradient")
        grads = nnx.clone(model)
        nnx.update(grads, grad_model)
        grads = convert.to_numpy_state_dict(grads)
        for name, p in TorchHolder(tlayer).named_parameters():
            assert grads[name].dtype == np.dtype(dtype), name
            assert_close(grads[name], p.grad.numpy(), tol, f"gradient of {name}")
        after = convert.to_numpy_state_dict(model)
        expected = TorchHolder(tlayer).state_dict()
        assert list(after) == list(expected)
        for name, value in expected.items():
            assert_close(after[name], value.numpy(), tol, f"state {name} after the step")
            assert after[name].dtype == value.numpy().dtype, name
    return yf


# --- convolutions -------------------------------------------------------------------------

CONV2D = [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=3, out_channels=6, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, bias=False),  # depthwise
    dict(in_channels=4, out_channels=8, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), groups=2),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), padding="same", dilation=2),
    dict(in_channels=4, out_channels=6, kernel_size=2, padding="same"),  # odd total padding: extra at the end
    dict(in_channels=2, out_channels=4, kernel_size=3, padding="valid", dilation=(1, 2)),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=(2, 1), padding_mode="replicate"),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", padding_mode="circular", stride=1),
]


@BOTH
@pytest.mark.parametrize("config", CONV2D, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_conv2d(config, dtype):
    check_layer(lambda: torch.nn.Conv2d(**config), lambda dt: N.Conv2d(**config, dtype=dt, rngs=nnx.Rngs(0)),
                (2, config["in_channels"], 7, 6), dtype)


CONV_TRANSPOSE = [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1, output_padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2),
         groups=2),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=3),  # padding beyond k - 1 crops
    dict(in_channels=2, out_channels=4, kernel_size=2, stride=2, groups=2, bias=False, dilation=2, output_padding=1),
    dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, groups=4, padding=(0, 1)),  # depthwise
]


@BOTH
@pytest.mark.parametrize("config", CONV_TRANSPOSE, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_conv_transpose2d(config, dtype):
    check_layer(lambda: torch.nn.ConvTranspose2d(**config),
                lambda dt: N.ConvTranspose2d(**config, dtype=dt, rngs=nnx.Rngs(0)),
                (2, config["in_channels"], 5, 6), dtype)


def test_conv_transpose2d_output_size_picks_torchs_output_padding():
    config = dict(in_channels=2, out_channels=3, kernel_size=3, stride=3, padding=1)
    tlayer = torch.nn.ConvTranspose2d(**config).double()
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 5))
    expected = tlayer(torch.tensor(x), output_size=(11, 14)).detach().numpy()
    with jax.enable_x64(True):
        model = convert.load_torch_state_dict(FlaxHolder(N.ConvTranspose2d(**config, dtype=jnp.float64,
                                                                           rngs=nnx.Rngs(0))), TorchHolder(tlayer).state_dict())
        y = model.layer(jnp.asarray(to_flax(x)), output_size=(1, 3, 11, 14))
        assert_close(y, to_flax(expected), 1e-12, "output")
        with pytest.raises(InputShapeError, match="valid sizes range from"):
            model.layer(jnp.asarray(to_flax(x)), output_size=(13, 14))


@BOTH
@pytest.mark.parametrize("shape,bias", [((4, 5), True), ((2, 3, 5), False)])
def test_linear(shape, bias, dtype):
    check_layer(lambda: torch.nn.Linear(5, 3, bias=bias), lambda dt: N.Linear(5, 3, bias=bias, dtype=dt, rngs=nnx.Rngs(0)),
                shape, dtype)


@pytest.mark.parametrize("make,fan_in", [
    (lambda: N.Conv2d(4, 6, (3, 2), groups=2, dtype=jnp.float64, rngs=nnx.Rngs(0)), 2 * 3 * 2),
    (lambda: N.ConvTranspose2d(4, 6, (3, 2), groups=2, dtype=jnp.float64, rngs=nnx.Rngs(0)), 3 * 3 * 2),
    (lambda: N.Linear(50, 40, dtype=jnp.float64, rngs=nnx.Rngs(0)), 50),
])
def test_torch_init_bounds_and_dtype(make, fan_in):
    with jax.enable_x64(True):
        layer = make()
        bound = 1 / np.sqrt(fan_in)
        for name in ("kernel", "bias"):
            value = np.asarray(getattr(layer, name)[...])
            assert value.dtype == np.float64
            assert np.abs(value).max() <= bound and np.abs(value).max() > 0.5 * bound, name


# --- normalisation --------------------------------------------------------------------------

BN_OPTIONS = [dict(), dict(affine=False), dict(momentum=None), dict(track_running_stats=False),
              dict(eps=1e-3, momentum=0.3, affine=False, track_running_stats=False)]


@BOTH
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("options", BN_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_batchnorm2d(options, train, dtype):
    check_layer(lambda: torch.nn.BatchNorm2d(3, **options), lambda dt: N.BatchNorm2d(3, **options, dtype=dt),
                (4, 3, 5, 2), dtype, train=train)


@BOTH
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5)])
@pytest.mark.parametrize("options", BN_OPTIONS[:4], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_batchnorm1d(options, shape, train, dtype):
    check_layer(lambda: torch.nn.BatchNorm1d(3, **options), lambda dt: N.BatchNorm1d(3, **options, dtype=dt),
                shape, dtype, train=train)


def test_batchnorm_refuses_one_value_per_channel_and_wrong_rank():
    with pytest.raises(InputShapeError, match="more than 1 value per channel"):
        N.BatchNorm2d(2)(jnp.ones((1, 1, 1, 2)))
    with pytest.raises(InputShapeError, match=r"4-D \(N, H, W, C\)"):
        N.BatchNorm2d(2)(jnp.ones((4, 2)))
    with pytest.raises(InputShapeError, match="got 3 channels"):
        N.BatchNorm1d(2)(jnp.ones((4, 3, 5)))


def test_batchnorm2d_keeps_its_layers_alias():
    assert layers.BatchNorm2d is N.BatchNorm2d and layers.Dropout is N.Dropout and layers.Dropout2d is N.Dropout2d


@BOTH
@pytest.mark.parametrize("groups,channels,shape,affine", [
    (2, 6, (2, 6, 5, 4), True), (3, 6, (2, 6, 7), True), (1, 4, (3, 4), False), (4, 4, (2, 4, 3, 3), False),
])
def test_groupnorm(groups, channels, shape, affine, dtype):
    check_layer(lambda: torch.nn.GroupNorm(groups, channels, affine=affine),
                lambda dt: N.GroupNorm(groups, channels, affine=affine, dtype=dt), shape, dtype)


@BOTH
@pytest.mark.parametrize("normalized_shape,shape,options", [
    ((4,), (2, 3, 5, 4), {}),  # torch's last dim W of a 4-D map
    ((5, 4), (2, 3, 5, 4), {}),
    ((3, 5, 4), (2, 3, 5, 4), {}),  # (C, H, W): weight stored in torch order, transposed when applied
    ((3, 5, 4), (2, 3, 5, 4), dict(bias=False)),
    (6, (2, 3, 6), {}),
    ((6,), (4, 6), dict(elementwise_affine=False)),
])
def test_layernorm(normalized_shape, shape, options, dtype):
    check_layer(lambda: torch.nn.LayerNorm(normalized_shape, **options),
                lambda dt: N.LayerNorm(normalized_shape, **options, dtype=dt), shape, dtype)


def test_layernorm_names_the_shape_it_expects():
    with pytest.raises(InputShapeError, match=r"\[\*, 3, 5, 4\].*\[2, 4, 5, 3\]"):
        N.LayerNorm((3, 5, 4))(jnp.ones((2, 5, 3, 4)))


# --- pooling ------------------------------------------------------------------------------

MAX_POOL = [
    dict(kernel_size=2),  # the plain case: ops.max_pool (C++ kernels in float32)
    dict(kernel_size=3),  # plain, cropping the last row
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, ceil_mode=True),
    dict(kernel_size=3, stride=1, padding=1),  # overlapping windows: gradients add up
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1), dilation=(2, 1), ceil_mode=True),
    dict(kernel_size=2, stride=2, padding=1, ceil_mode=True),
]


@BOTH
@pytest.mark.parametrize("config", MAX_POOL, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_max_pool2d_with_ties(config, dtype):
    # integer-valued inputs tie often: the gradient must go to the first maximum, as in PyTorch
    check_layer(lambda: torch.nn.MaxPool2d(**config), lambda dt: N.MaxPool2d(**config), (2, 3, 7, 6), dtype,
                integers=True)


@pytest.mark.parametrize("config", MAX_POOL[2:], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_max_pool2d_return_indices_are_torchs(config):
    x = np.random.default_rng(1).integers(-2, 3, (2, 3, 7, 6)).astype(np.float32)
    x[0, 0, 1, 1] = np.nan
    x[1, 2, 2:4, 2:4] = np.nan  # several NaNs in a window: PyTorch takes the last
    y, index = torch.nn.MaxPool2d(**config, return_indices=True)(torch.tensor(x))
    yf, index_f = N.MaxPool2d(**config, return_indices=True)(jnp.asarray(to_flax(x)))
    np.testing.assert_array_equal(np.asarray(yf), to_flax(y.numpy()))
    np.testing.assert_array_equal(np.asarray(index_f), to_flax(index.numpy()))


def test_max_pool_nan_takes_the_gradient():
    x = np.array([[[[1.0, np.nan], [3.0, np.nan]]]])
    xt = torch.tensor(x, requires_grad=True)
    TF.max_pool2d(xt, 2, padding=1).sum().backward()
    grad = jax.grad(lambda a: jnp.sum(N.MaxPool2d(2, padding=1)(a)))(jnp.asarray(to_flax(x), jnp.float32))
    np.testing.assert_array_equal(np.asarray(grad), to_flax(xt.grad.numpy()))


AVG_POOL = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    dict(kernel_size=(2, 3), stride=(3, 2), padding=(1, 1), ceil_mode=True),
    dict(kernel_size=3, padding=1, divisor_override=5),
    dict(kernel_size=2, stride=1, padding=1, ceil_mode=True, count_include_pad=False),
]


@BOTH
@pytest.mark.parametrize("config", AVG_POOL, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_avg_pool2d(config, dtype):
    check_layer(lambda: torch.nn.AvgPool2d(**config), lambda dt: N.AvgPool2d(**config), (2, 3, 7, 6), dtype)


def test_avg_pool2d_divisors_in_every_configuration():
    # forward only, float64, every combination of the options that change the divisor
    x = np.random.default_rng(2).standard_normal((1, 2, 7, 5))
    with jax.enable_x64(True):
        xf = jnp.asarray(to_flax(x))
        for k, s, p, ceil, include, override in itertools.product((2, 3, (3, 2)), (1, 2, 3, (2, 3)), (0, 1, (1, 0)),
                                                                  (False, True), (True, False), (None, 4)):
            if max(N.pair(p)) > min(N.pair(k)) // 2:
                continue
            options = dict(kernel_size=k, stride=s, padding=p, ceil_mode=ceil, count_include_pad=include,
                           divisor_override=override)
            expected = torch.nn.AvgPool2d(**options)(torch.tensor(x)).numpy()
            assert_close(N.AvgPool2d(**options)(xf), to_flax(expected), 1e-12, str(options))


@BOTH
@pytest.mark.parametrize("output_size", [1, 3, (4, None), (5, 3), (2, 4), (7, 6)])
def test_adaptive_pools(output_size, dtype):
    check_layer(lambda: torch.nn.AdaptiveAvgPool2d(output_size), lambda dt: N.AdaptiveAvgPool2d(output_size),
                (2, 3, 7, 6), dtype)
    check_layer(lambda: torch.nn.AdaptiveMaxPool2d(output_size), lambda dt: N.AdaptiveMaxPool2d(output_size),
                (2, 3, 7, 6), dtype, integers=True)


def test_adaptive_max_pool2d_return_indices_are_torchs():
    x = np.random.default_rng(3).integers(-2, 3, (2, 3, 7, 6)).astype(np.float32)
    y, index = torch.nn.AdaptiveMaxPool2d((3, 4), return_indices=True)(torch.tensor(x))
    yf, index_f = N.AdaptiveMaxPool2d((3, 4), return_indices=True)(jnp.asarray(to_flax(x)))
    np.testing.assert_array_equal(np.asarray(yf), to_flax(y.numpy()))
    np.testing.assert_array_equal(np.asarray(index_f), to_flax(index.numpy()))


def test_pools_take_unbatched_chw_in_torch_layout():
    x = np.random.default_rng(4).standard_normal((3, 7, 6)).astype(np.float32)
    for tlayer, flayer in [(torch.nn.MaxPool2d(3, 2, 1), N.MaxPool2d(3, 2, 1)), (torch.nn.AvgPool2d(2), N.AvgPool2d(2)),
                           (torch.nn.AdaptiveAvgPool2d(3), N.AdaptiveAvgPool2d(3))]:
        assert_close(flayer(jnp.asarray(x)), tlayer(torch.tensor(x)).numpy(), 1e-6, type(flayer).__name__)


def test_pool_arguments_are_checked_like_torch():
    with pytest.raises(ValueError, match="pad should be at most half"):
        N.MaxPool2d(3, padding=2, dilation=2)
    with pytest.raises(ValueError, match="pad should be at most half"):
        N.AvgPool2d(2, padding=2)
    with pytest.raises(InputShapeError, match="too small"):
        N.MaxPool2d(3)(jnp.ones((1, 2, 2, 1)))


# --- resampling ---------------------------------------------------------------------------

INTERPOLATE = [
    dict(scale_factor=2), dict(scale_factor=1.7), dict(scale_factor=0.6), dict(size=(5, 13)),
    dict(scale_factor=(2.5, 1.3), mode="nearest-exact"),
    dict(scale_factor=2.3, mode="bilinear"), dict(scale_factor=0.5, mode="bilinear"),
    dict(size=(4, 11), mode="bilinear", align_corners=True), dict(scale_factor=1.7, mode="bilinear", align_corners=True),
    dict(scale_factor=1.7, mode="bilinear", recompute_scale_factor=True),
    dict(size=(4, 3), mode="area"), dict(size=(7, 6), mode="bilinear"),
]


@BOTH
@pytest.mark.parametrize("options", INTERPOLATE, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_interpolate(options, dtype):
    check_layer(lambda: torch.nn.Upsample(**options), lambda dt: N.Upsample(**options), (2, 3, 7, 6), dtype)


def test_interpolate_reads_torchs_source_pixels_at_many_scales():
    # nearest indices are floor(dst * scale) in float32 (float64 for double): exact equality
    x = np.random.default_rng(5).standard_normal((1, 1, 11, 7))
    for dtype, scale in itertools.product((np.float32, np.float64), (0.3, 1 / 3, 0.7, 1.1, 1.5, 2.5, 2.9, 3.3, 4.0)):
        with jax.enable_x64(dtype == np.float64):
            xf = jnp.asarray(to_flax(x.astype(dtype)))
            for mode in ("nearest", "nearest-exact"):
                expected = TF.interpolate(torch.tensor(x.astype(dtype)), scale_factor=scale, mode=mode).numpy()
                np.testing.assert_array_equal(np.asarray(N.interpolate(xf, scale_factor=scale, mode=mode)),
                                              to_flax(expected), err_msg=f"{mode} {scale} {dtype}")
            expected = TF.interpolate(torch.tensor(x.astype(dtype)), scale_factor=scale, mode="bilinear").numpy()
            assert_close(N.interpolate(xf, scale_factor=scale, mode="bilinear"), to_flax(expected),
                         1e-12 if dtype == np.float64 else 1e-6, f"bilinear {scale}")


@pytest.mark.parametrize("options", [dict(scale_factor=1.5), dict(size=4, mode="linear"),
                                     dict(scale_factor=0.7, mode="linear", align_corners=True)])
def test_interpolate_3d_is_torch_layout(options):
    x = np.random.default_rng(6).standard_normal((2, 3, 6))
    with jax.enable_x64(True):
        assert_close(N.interpolate(jnp.asarray(x), **options), TF.interpolate(torch.tensor(x), **options).numpy(),
                     1e-12, str(options))


def test_interpolate_refuses_what_torch_refuses():
    with pytest.raises(ValueError, match="align_corners option can only be set"):
        N.interpolate(jnp.ones((1, 4, 4, 1)), scale_factor=2, align_corners=True)
    with pytest.raises(InputShapeError, match="needs a 4-D input"):
        N.interpolate(jnp.ones((1, 2, 4)), scale_factor=2, mode="bilinear")
    with pytest.raises(ValueError, match="exactly one of size or scale_factor"):
        N.interpolate(jnp.ones((1, 4, 4, 1)))


# --- activations ----------------------------------------------------------------------------

ACTIVATIONS = [
    (lambda: torch.nn.ReLU6(), lambda: N.ReLU6()),
    (lambda: torch.nn.LeakyReLU(0.2), lambda: N.LeakyReLU(0.2)),
    (lambda: torch.nn.ELU(1.5), lambda: N.ELU(1.5)),
    (lambda: torch.nn.GELU(), lambda: N.GELU()),
    (lambda: torch.nn.GELU("tanh"), lambda: N.GELU("tanh")),
    (lambda: torch.nn.SiLU(), lambda: N.SiLU()),
    (lambda: torch.nn.Hardswish(), lambda: N.Hardswish()),
    (lambda: torch.nn.Hardsigmoid(), lambda: N.Hardsigmoid()),
    (lambda: torch.nn.Sigmoid(), lambda: N.Sigmoid()),
    (lambda: torch.nn.Tanh(), lambda: N.Tanh()),
    (lambda: torch.nn.Identity(3, key=1), lambda: N.Identity(3, key=1)),
]


@BOTH
@pytest.mark.parametrize("make_torch,make_flax", ACTIVATIONS, ids=lambda f: type(f()).__name__)
def test_activations_including_their_kinks(make_torch, make_flax, dtype):
    # random values on an NCHW map, with every kink (0, +-3, 6) and large values planted
    tdtype, jdtype, tol = DTYPES[dtype]
    x = np.random.default_rng(7).standard_normal((2, 3, 4, 4)) * 4
    x.reshape(-1)[:9] = [0.0, 3.0, -3.0, 6.0, -6.0, 100.0, -100.0, 1e-3, -1e-3]
    xt = torch.tensor(x, dtype=tdtype, requires_grad=True)
    yt = make_torch()(xt)
    yt.sum().backward()
    with precision(dtype):
        xf = jnp.asarray(to_flax(x), jdtype)
        layer = make_flax()
        grad = jax.grad(lambda a: jnp.sum(layer(a)))(xf)
        assert_close(layer(xf), to_flax(yt.detach().numpy()), tol, "output")
        assert_close(grad, to_flax(xt.grad.numpy()), tol, "gradient")
        assert grad.dtype == jdtype


@BOTH
@pytest.mark.parametrize("torch_dim,ndim", [(1, 4), (-1, 4), (2, 4), (1, 2), (0, 2), (None, 4), (None, 2), (None, 3)])
def test_softmax_takes_the_physical_axis(torch_dim, ndim, dtype):
    shape = {4: (2, 3, 4, 5), 2: (3, 4), 3: (2, 3, 4)}[ndim]
    axis = torch_dim if ndim != 4 or torch_dim is None else (0, 3, 1, 2)[torch_dim]  # torch dim -> NHWC axis
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's implicit-dim warning
        for tclass, fclass in [(torch.nn.Softmax, N.Softmax), (torch.nn.LogSoftmax, N.LogSoftmax)]:
            check_layer(lambda: tclass(torch_dim), lambda dt: fclass(axis), shape, dtype)


@pytest.mark.parametrize("start,end,shape", [(1, -1, (2, 3, 4, 5)), (2, 3, (2, 3, 4, 5)), (0, 1, (2, 3, 4, 5)),
                                             (1, 1, (2, 3, 4, 5)), (1, 2, (2, 3, 2, 4, 5)), (1, -1, (4, 6))])
def test_flatten_in_torch_order(start, end, shape):
    check_layer(lambda: torch.nn.Flatten(start, end), lambda dt: N.Flatten(start, end), shape, "float64")


# --- random layers ------------------------------------------------------------------------


def test_dropout_replay_seam_gives_torchs_output():
    x = np.random.default_rng(8).standard_normal((4, 3, 5, 5)).astype(np.float32)
    torch.manual_seed(0)
    tlayer = torch.nn.Dropout2d(0.4).train()
    y = tlayer(torch.tensor(x)).numpy()
    keep = (y != 0).any(axis=(2, 3))  # channel mask (N, C)
    layer = N.Dropout2d(0.4, rngs=nnx.Rngs(dropout=0))
    object.__setattr__(layer, "keep_mask", lambda key, shape: jnp.asarray(keep[:, None, None, :]))
    assert_close(layer(jnp.asarray(to_flax(x))), to_flax(y), 1e-6, "Dropout2d")
    with pytest.raises(ValueError, match="between 0 and 1"):
        N.Dropout(1.5)


def test_bernoulli_draws_zeros_and_ones_with_probability_p_in_the_dtype_asked():
    with jax.enable_x64(True):
        draw = N.Bernoulli(rngs=nnx.Rngs(dropout=0))
        mask = draw((20000,), 0.3, jnp.float64)
        assert mask.dtype == jnp.float64 and set(np.unique(np.asarray(mask))) == {0.0, 1.0}
        assert abs(float(mask.mean()) - 0.3) < 0.02
        assert not np.array_equal(np.asarray(draw((64,), 0.5)), np.asarray(draw((64,), 0.5)))  # the stream moves on
        assert float(draw((8,), 1.0).min()) == 1.0 and float(draw((8,), 0.0).max()) == 0.0
    replayed = np.array([1.0, 0.0, 1.0])
    object.__setattr__(draw, "keep_mask", lambda key, shape, p: jnp.asarray(replayed, bool))  # the replay seam
    np.testing.assert_array_equal(np.asarray(draw((3,), 0.5)), replayed)
    with pytest.raises(ValueError, match="between 0 and 1"):
        draw((3,), 1.5)


# --- the converter for every stateful layer -------------------------------------------------


class TorchEverything(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, groups=2, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, groups=8, bias=False)
        self.up = torch.nn.ConvTranspose2d(8, 6, (3, 2), stride=2, groups=2)
        self.bn = torch.nn.BatchNorm2d(6)
        self.bn_plain = torch.nn.BatchNorm2d(6, affine=False)
        self.bn_batch = torch.nn.BatchNorm2d(6, track_running_stats=False)
        self.gn = torch.nn.GroupNorm(3, 6)
        self.ln = torch.nn.LayerNorm((6, 9, 10))
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(540, 5), torch.nn.BatchNorm1d(5))

    def forward(self, x):
        x = self.up(self.dw(self.conv(x)))
        return self.head(self.ln(self.gn(self.bn_batch(self.bn_plain(self.bn(x))))))


class FlaxEverything(nnx.Module):
    def __init__(self, dtype, rngs: nnx.Rngs):
        self.conv = N.Conv2d(4, 8, 3, groups=2, padding=1, dtype=dtype, rngs=rngs)
        self.dw = N.Conv2d(8, 8, 3, groups=8, bias=False, dtype=dtype, rngs=rngs)
        self.up = N.ConvTranspose2d(8, 6, (3, 2), stride=2, groups=2, dtype=dtype, rngs=rngs)
        self.bn = N.BatchNorm2d(6, dtype=dtype)
        self.bn_plain = N.BatchNorm2d(6, affine=False, dtype=dtype)
        self.bn_batch = N.BatchNorm2d(6, track_running_stats=False, dtype=dtype)
        self.gn = N.GroupNorm(3, 6, dtype=dtype)
        self.ln = N.LayerNorm((6, 9, 10), dtype=dtype)
        self.head = nnx.Sequential(N.Flatten(), N.Linear(540, 5, dtype=dtype, rngs=rngs), N.BatchNorm1d(5, dtype=dtype))

    def __call__(self, x):
        x = self.up(self.dw(self.conv(x)))
        return self.head(self.ln(self.gn(self.bn_batch(self.bn_plain(self.bn(x))))))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_round_trip_of_every_stateful_layer_is_exact_and_keeps_the_dtype(dtype):
    tdtype, jdtype, tol = DTYPES[dtype]
    torch.manual_seed(0)
    tmodel = TorchEverything().to(tdtype)
    for module in tmodel.modules():
        randomise(module, 1)
    sd = tmodel.state_dict()
    assert "bn_plain.weight" not in sd and "bn_batch.running_mean" not in sd and "up.weight" in sd
    with precision(dtype):
        fmodel = convert.load_torch_state_dict(FlaxEverything(jdtype, nnx.Rngs(0)), sd)
        assert fmodel.up.kernel[...].shape == (3, 2, 3, 8)  # (kh, kw, out / groups, in)
        assert fmodel.dw.kernel[...].shape == (3, 3, 1, 8)  # (kh, kw, in / groups, out)
        back = convert.to_torch_state_dict(fmodel)
        assert list(back) == list(sd)
        for key in sd:
            assert back[key].dtype == sd[key].dtype, key
            assert torch.equal(back[key], sd[key]), key
        TorchEverything().to(tdtype).load_state_dict(back, strict=True)
        # and the whole model computes what PyTorch does (eval mode: running statistics)
        x = np.random.default_rng(9).standard_normal((2, 4, 6, 7))  # -> 6 x 9 x 10 at the LayerNorm
        fmodel.eval()
        tmodel.eval()
        expected = tmodel(torch.tensor(x, dtype=tdtype)).detach().numpy()
        assert_close(fmodel(jnp.asarray(to_flax(x), jdtype)), expected, tol * 10, "model output")


def test_strictness_names_keys_of_the_new_layers():
    sd = dict(TorchEverything().state_dict())
    del sd["ln.bias"]
    sd["bn_plain.weight"] = torch.ones(6)
    sd["up.weight"] = torch.zeros(8, 6, 3, 2)
    with pytest.raises(ConversionError) as info:
        convert.load_torch_state_dict(FlaxEverything(jnp.float32, nnx.Rngs(0)), sd)
    message = str(info.value)
    assert "missing keys: ln.bias" in message and "unexpected keys: bn_plain.weight" in message
    assert "up.weight: checkpoint has shape (8, 6, 3, 2), model expects (8, 3, 3, 2)" in message


def test_unsupported_stateful_layers_are_refused_with_the_supported_list():
    class WithFlaxBatchNorm(nnx.Module):
        def __init__(self):
            self.bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))

    with pytest.raises(ConversionError, match="bn .*flax.nnx.*BatchNorm.*Supported: .*ConvTranspose2d.*GroupNorm"):
        convert.to_numpy_state_dict(WithFlaxBatchNorm())
