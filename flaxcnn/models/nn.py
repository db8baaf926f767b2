"""Flax NNX layers named and parameterised like ``torch.nn``'s, with PyTorch's semantics.

What ported models (``flaxcnn port``) and hand-written mirrors are built from. Constructor
arguments are PyTorch's (names, order, defaults), plus keyword-only ``dtype`` (parameters and
statistics are created in it: float32, or float64 inside ``with jax.enable_x64(True):``),
``init`` (``"torch"``: PyTorch's default initial distributions; ``"flax"``: Flax's) and
``rngs`` where a layer draws parameters or random masks.

Layout, the one convention every layer follows: a **4-D array is an NHWC activation** (the
layout XLA's CPU convolutions and flaxcnn's kernels run in; a model transposes its NCHW input
once); an array of **any other rank is in PyTorch's layout** (``(N, C)``, ``(N, C, L)``, an
unbatched ``(C, H, W)``). Consequences, per layer:

* channel axis (BatchNorm, GroupNorm, Dropout2d): the last axis of a 4-D array, axis 1 otherwise;
* ``Softmax``/``LogSoftmax(dim)`` take the *physical* axis of the array they get (a code
  generator translates torch's ``dim`` of a 4-D tensor: torch dim 1 is axis 3);
* ``Flatten`` and ``LayerNorm`` take *torch's* dims and handle the NHWC case themselves:
  ``Flatten`` flattens in PyTorch's (C, H, W) order, ``LayerNorm`` normalises torch's last dims;
* ``Linear`` acts on the last physical axis (of a 4-D array that is C, not torch's W).

Convolutions and max-pools run under the layer's :class:`~flaxcnn.models.conv_policy.ConvPolicy`
(``conv_policy``, a static attribute that :func:`flaxcnn.models.conv_policy.apply` replaces
model-wide). Parameter names follow flaxcnn's converter (:mod:`flaxcnn.convert`):
``kernel``/``bias`` for convolutions and linears, ``scale``/``bias``/``mean``/``var``/
``num_batches_tracked`` for normalisation, so a PyTorch ``state_dict`` maps one key to one
variable. The gradients of kinked activations at their kinks are PyTorch's
(:mod:`flaxcnn.models.functional`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxcnn.errors import ConfigError, InputShapeError
from flaxcnn.models import functional as F
from flaxcnn.models import ops
from flaxcnn.models.conv_policy import DEFAULT, ConvPolicy
from flaxcnn.models.functional import IntPair, interpolate, pair  # noqa: F401 - part of this module's API


def torch_uniform(fan_in: int) -> nnx.Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Conv2d/Linear weights and biases
    (``kaiming_uniform_(a=sqrt(5))`` reduces to this bound)."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def check_init(init: str) -> str:
    if init not in ("torch", "flax"):
        raise ValueError(f"init must be 'torch' (PyTorch's default) or 'flax' (lecun_normal), got {init!r}")
    return init


def _torch_init(init: str, fan_in: int) -> dict:
    """nnx kernel/bias initialisers for ``init`` (``{}``: Flax's defaults)."""
    if check_init(init) == "torch":
        return dict(kernel_init=torch_uniform(fan_in), bias_init=torch_uniform(fan_in))
    return {}


def channel_axis(ndim: int) -> int:
    """The channel axis of an array of rank ``ndim`` in flaxcnn's layout (see the module docstring)."""
    return 3 if ndim == 4 else 1


def nhwc_to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


def nchw_to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


# --- convolutions -------------------------------------------------------------------------------


def conv_padding(padding: IntPair | str, kernel_size: tuple[int, int], dilation: tuple[int, int]
                 ) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch's ``padding`` as explicit (low, high) pairs: ``"valid"`` none, ``"same"`` the total
    ``dilation * (k - 1)`` split with the odd pixel at the end (as PyTorch does)."""
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)  # type: ignore[return-value]
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = pair(padding, "padding")
    return ((ph, ph), (pw, pw))


#: ``padding_mode`` -> ``jnp.pad`` mode (PyTorch's reflect repeats no edge, as numpy's "reflect")
PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _check_groups(name: str, in_channels: int, out_channels: int, groups: int) -> None:
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(f"{name}: in_channels ({in_channels}) and out_channels ({out_channels}) "
                         f"must be divisible by groups ({groups})")


class Conv2d(nnx.Conv):
    """``nn.Conv2d``: any stride, padding (int, pair, ``"same"``, ``"valid"``), dilation, groups
    (depthwise included), ``padding_mode`` (zeros, reflect, replicate, circular), with or without
    bias; NHWC in and out, HWIO kernel ``(kh, kw, in / groups, out)``.

    Stride-1, ungrouped, undilated float32 convolutions run on flaxcnn's CPU kernels under the
    default policy; the rest on XLA's convolution (:class:`flaxcnn.models.ops.Convolution`).
    ``init="torch"`` (default) draws PyTorch's initial distribution, ``"flax"`` Flax's.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair | str = 0, dilation: IntPair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", *, dtype=jnp.float32, init: str = "torch",
                 conv_policy: ConvPolicy = DEFAULT, rngs: nnx.Rngs):
        kernel_size, dilation, stride = pair(kernel_size, "kernel_size"), pair(dilation, "dilation"), pair(stride, "stride")
        _check_groups("Conv2d", in_channels, out_channels, groups)
        if padding == "same" and stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}")
        pads = conv_padding(padding, kernel_size, dilation)
        #: the padding applied before the convolution when it is not zeros (PyTorch pads the same way)
        self.padding_mode = padding_mode
        self.mode_padding = pads if padding_mode != "zeros" else None
        super().__init__(in_channels, out_channels, kernel_size, strides=stride,
                         padding=((0, 0), (0, 0)) if self.mode_padding else pads, kernel_dilation=dilation,
                         feature_group_count=groups, use_bias=bias, dtype=dtype, param_dtype=dtype,
                         conv_general_dilated=ops.Convolution(conv_policy), rngs=rngs,
                         **_torch_init(init, in_channels // groups * kernel_size[0] * kernel_size[1]))

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if self.mode_padding:
            inputs = jnp.pad(inputs, ((0, 0), *self.mode_padding, (0, 0)), mode=PADDING_MODES[self.padding_mode])
        return super().__call__(inputs)


class ConvTranspose2d(nnx.Module):
    """``nn.ConvTranspose2d`` (stride, padding, output_padding, groups, bias, dilation; the
    ``output_size`` call argument) on NHWC.

    ``kernel`` has shape ``(kh, kw, out / groups, in)``: PyTorch's weight ``(in, out / groups, kh,
    kw)`` transposed ``(2, 3, 1, 0)`` (as a Conv2d weight is), i.e. the HWIO kernel of the
    convolution out -> in of which this layer is the transpose. It is computed as that
    convolution's input gradient: the input dilated by ``stride``, padded by
    ``dilation * (k - 1) - padding`` (plus ``output_padding`` at the end), convolved with the
    kernel flipped in space and in/out swapped within each group. Output size:
    ``(H - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair = 0, output_padding: IntPair = 0, groups: int = 1, bias: bool = True,
                 dilation: IntPair = 1, padding_mode: str = "zeros", *, dtype=jnp.float32, init: str = "torch",
                 conv_policy: ConvPolicy = DEFAULT, rngs: nnx.Rngs):
        _check_groups("ConvTranspose2d", in_channels, out_channels, groups)
        if padding_mode != "zeros":
            raise ValueError(f'Only "zeros" padding mode is supported for ConvTranspose2d, got {padding_mode!r}')
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride, self.padding = pair(stride, "stride"), pair(padding, "padding")
        self.output_padding, self.dilation = pair(output_padding, "output_padding"), pair(dilation, "dilation")
        for op, s, d in zip(self.output_padding, self.stride, self.dilation):
            if op >= s and op >= d:
                raise ValueError(f"output padding must be smaller than either stride or dilation, got "
                                 f"output_padding={self.output_padding}, stride={self.stride}, dilation={self.dilation}")
        self.conv_policy, self.dtype = conv_policy, dtype
        kh, kw = self.kernel_size
        inits = _torch_init(init, out_channels // groups * kh * kw)  # PyTorch's fan_in of its weight
        kernel_init = inits.get("kernel_init", nnx.initializers.lecun_normal())
        keys = rngs.params
        self.kernel = nnx.Param(kernel_init(keys(), (kh, kw, out_channels // groups, in_channels), dtype))
        self.bias = nnx.Param(inits.get("bias_init", nnx.initializers.zeros)(keys(), (out_channels,), dtype)) \
            if bias else None

    def output_padding_for(self, x: jax.Array, output_size: Sequence[int] | None) -> tuple[int, int]:
        """``output_padding``, or the one that gives ``output_size`` (``(H, W)``, or PyTorch's
        ``(N, C, H, W)``), checked against the sizes this input can give."""
        if output_size is None:
            return self.output_padding
        size = tuple(int(s) for s in output_size)[-2:] if len(output_size) in (2, 4) else None
        if size is None:
            raise InputShapeError(f"ConvTranspose2d output_size must be (H, W) or (N, C, H, W), got {output_size!r}")
        smallest = [(n - 1) * s - 2 * p + d * (k - 1) + 1 for n, s, p, d, k in
                    zip(x.shape[1:3], self.stride, self.padding, self.dilation, self.kernel_size)]
        largest = [m + s - 1 for m, s in zip(smallest, self.stride)]
        if any(not lo <= n <= hi for n, lo, hi in zip(size, smallest, largest)):
            raise InputShapeError(f"requested an output size of {list(size)}, but valid sizes range from "
                                  f"{smallest} to {largest} (for an input of {list(x.shape[1:3])})")
        return tuple(n - lo for n, lo in zip(size, smallest))  # type: ignore[return-value]

    def __call__(self, x: jax.Array, output_size: Sequence[int] | None = None) -> jax.Array:
        if x.ndim != 4:
            raise InputShapeError(f"ConvTranspose2d takes a 4-D (N, H, W, C) batch, got shape {tuple(x.shape)}")
        out_padding = self.output_padding_for(x, output_size)
        kh, kw = self.kernel_size
        g, k, x = self.groups, self.kernel[...].astype(self.dtype), x.astype(self.dtype)
        # per group, (kh, kw, out/g, in/g) -> flipped, (kh, kw, in/g, out/g); groups stay on O
        k = jnp.flip(k, (0, 1)).reshape(kh, kw, k.shape[2], g, k.shape[3] // g)
        k = k.transpose(0, 1, 4, 3, 2).reshape(kh, kw, self.in_channels // g, self.out_channels)
        pads = [(d * (n - 1) - p, d * (n - 1) - p + op)
                for n, p, d, op in zip(self.kernel_size, self.padding, self.dilation, out_padding)]
        # a negative pad crops: done on the output so that the convolution gets plain padding
        conv = ops.Convolution(self.conv_policy)
        y = conv(x, k, (1, 1), [(max(lo, 0), max(hi, 0)) for lo, hi in pads],
                 lhs_dilation=self.stride, rhs_dilation=self.dilation, dimension_numbers=ops.NHWC_HWIO,
                 feature_group_count=g)
        (t, b), (l, r) = ((max(-lo, 0), max(-hi, 0)) for lo, hi in pads)
        y = y[:, t:y.shape[1] - b, l:y.shape[2] - r, :]
        return y + self.bias[...].astype(self.dtype) if self.bias is not None else y


class Linear(nnx.Linear):
    """``nn.Linear`` on the last axis; ``kernel`` is stored (in, out), the transpose of PyTorch's
    weight. ``init="torch"``: weight and bias U(+-1/sqrt(in_features))."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=jnp.float32,
                 init: str = "torch", rngs: nnx.Rngs):
        super().__init__(in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs,
                         **_torch_init(init, in_features))


# --- normalisation --------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch norm over all axes but the last: ``(y, batch mean, biased batch var)``.

    The forward pass is the textbook two-pass one (mean, then the mean of squared deviations),
    as PyTorch computes it. The backward pass is written out (the usual closed form: one pass
    that sums ``g`` and ``g * (x - mean)`` per channel, one elementwise pass for ``dx``) rather
    than left to autodiff, whose gradient through the two means took several more passes over
    the activations: NetBatchNorm's training step +16%, SpeechNet's +12% on CPU at batch 64.
    """
    y, mean, var, _ = _bn_forward(x, scale, bias, eps)
    return y, mean, var


def _bn_forward(x, scale, bias, eps):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), axis=axes)
    inv = jax.lax.rsqrt(var + eps)
    return centred * (inv * scale) + bias, mean, var, inv


def _bn_fwd(x, scale, bias, eps):
    y, mean, var, inv = _bn_forward(x, scale, bias, eps)
    return (y, mean, var), (x, mean, inv, scale)


def _bn_bwd(eps, residuals, cotangents):
    x, mean, inv, scale = residuals
    g, g_mean, g_var = cotangents
    axes = tuple(range(x.ndim - 1))
    n = math.prod(x.shape[:-1])
    centred = x - mean
    sum_g = jnp.sum(g, axis=axes)
    sum_g_centred = jnp.sum(g * centred, axis=axes)
    grad_scale = sum_g_centred * inv
    # d/dx of y through x, the mean and the variance; then the batch mean's and variance's own
    # cotangents (zero when, as in BatchNorm2d, they only feed stop_gradient'ed running stats)
    k = scale * inv
    grad_x = k * (g - sum_g / n - centred * (inv * inv) * (sum_g_centred / n))
    grad_x = grad_x + g_mean / n + centred * (2.0 * g_var / n)
    return grad_x, grad_scale, sum_g


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


class BatchNormNd(nnx.Module):
    """The shared implementation of :class:`BatchNorm1d` and :class:`BatchNorm2d`, with PyTorch's
    exact semantics.

    Why not ``nnx.BatchNorm``: PyTorch normalises with the biased batch variance but stores the
    *unbiased* one in ``running_var``, and counts ``num_batches_tracked``; Flax stores the biased
    variance. ``momentum`` is PyTorch's (weight of the new batch, 0.1), i.e. Flax's 0.9;
    ``momentum=None`` is PyTorch's cumulative average (weight ``1 / num_batches_tracked``).
    ``affine=False``: no ``scale``/``bias`` (None); ``track_running_stats=False``: no
    ``mean``/``var``/``num_batches_tracked`` (None) and batch statistics in eval mode too.
    Batch statistics are plain means over the batch axes, so under ``jax.sharding`` with a
    sharded batch they are global-batch statistics with no extra code.
    """

    #: the input ranks the layer takes (PyTorch's) and how it names them in errors
    ranks: tuple[int, ...] = ()
    expected: str = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, dtype=jnp.float32, use_running_average: bool = False):
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.use_running_average = use_running_average
        c = (num_features,)
        self.scale = nnx.Param(jnp.ones(c, dtype)) if affine else None
        self.bias = nnx.Param(jnp.zeros(c, dtype)) if affine else None
        self.mean = nnx.BatchStat(jnp.zeros(c, dtype)) if track_running_stats else None
        self.var = nnx.BatchStat(jnp.ones(c, dtype)) if track_running_stats else None
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32)) if track_running_stats else None

    def channels_last(self, x: jax.Array) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
        """``x`` with its channel axis last, and the function that puts it back."""
        if x.ndim not in self.ranks:
            raise InputShapeError(f"{type(self).__name__} takes {self.expected}, got shape {tuple(x.shape)}")
        if x.shape[channel_axis(x.ndim)] != self.num_features:
            raise InputShapeError(f"{type(self).__name__}({self.num_features}) got {x.shape[channel_axis(x.ndim)]} "
                                  f"channels (input shape {tuple(x.shape)})")
        if channel_axis(x.ndim) == x.ndim - 1:
            return x, lambda y: y
        return jnp.moveaxis(x, 1, -1), lambda y: jnp.moveaxis(y, -1, 1)

    def __call__(self, x: jax.Array, *, use_running_average: bool | None = None) -> jax.Array:
        x, restore = self.channels_last(x)
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        scale = self.scale[...] if self.affine else jnp.ones((self.num_features,), x.dtype)
        bias = self.bias[...] if self.affine else jnp.zeros((self.num_features,), x.dtype)
        if use_ra and self.track_running_stats:
            inv = jax.lax.rsqrt(self.var[...] + self.eps) * scale
            return restore((x - self.mean[...]) * inv + bias)
        n = math.prod(x.shape[:-1])
        if n == 1:
            raise InputShapeError(f"{type(self).__name__}: expected more than 1 value per channel when training, "
                                  f"got input shape {tuple(x.shape)}")
        y, mean, var = batch_norm_train(x, scale, bias, self.eps)
        if not use_ra and self.track_running_stats:
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
            m = self.momentum
            if m is None:  # cumulative moving average
                m = 1.0 / self.num_batches_tracked[...].astype(self.mean[...].dtype)
            unbiased = var * (n / (n - 1))
            self.mean[...] = (1.0 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
            self.var[...] = (1.0 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
        return restore(y)


class BatchNorm1d(BatchNormNd):
    """``nn.BatchNorm1d`` on ``(N, C)`` or ``(N, C, L)`` in PyTorch's layout (channel axis 1:
    a 3-D array is not an NHWC activation, see the module docstring)."""

    ranks, expected = (2, 3), "a 2-D (N, C) or 3-D (N, C, L) array"


class BatchNorm2d(BatchNormNd):
    """``nn.BatchNorm2d`` on an NHWC batch, over the channel (last) axis."""

    ranks, expected = (4,), "a 4-D (N, H, W, C) batch"


class GroupNorm(nnx.Module):
    """``nn.GroupNorm(num_groups, num_channels)``: per example and group of consecutive channels,
    normalised with the biased variance over the group's channels and all spatial positions;
    per-channel ``scale``/``bias`` (``affine``). Channel axis as everywhere (last of a 4-D NHWC
    batch, axis 1 of ``(N, C, ...)`` otherwise)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, *,
                 dtype=jnp.float32):
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        self.scale = nnx.Param(jnp.ones((num_channels,), dtype)) if affine else None
        self.bias = nnx.Param(jnp.zeros((num_channels,), dtype)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim < 2 or x.shape[channel_axis(x.ndim)] != self.num_channels:
            raise InputShapeError(f"GroupNorm({self.num_groups}, {self.num_channels}) takes (N, C, ...) or an NHWC "
                                  f"batch with {self.num_channels} channels, got shape {tuple(x.shape)}")
        moved = channel_axis(x.ndim) != x.ndim - 1
        h = jnp.moveaxis(x, 1, -1) if moved else x
        grouped = h.reshape(*h.shape[:-1], self.num_groups, self.num_channels // self.num_groups)
        axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
        mean = jnp.mean(grouped, axis=axes, keepdims=True)
        centred = grouped - mean
        var = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)
        y = (centred * jax.lax.rsqrt(var + self.eps)).reshape(h.shape)
        if self.affine:
            y = y * self.scale[...] + self.bias[...]
        return jnp.moveaxis(y, -1, 1) if moved else y


class LayerNorm(nnx.Module):
    """``nn.LayerNorm(normalized_shape)``: normalises over PyTorch's last ``len(normalized_shape)``
    dims, with the biased variance, and applies an element-wise ``scale``/``bias`` of shape
    ``normalized_shape``.

    Dims are torch's. A 4-D input is the NHWC form of torch's ``(N, C, H, W)``: ``(W,)``
    normalises over axis 2, ``(H, W)`` over axes 1, 2, ``(C, H, W)`` over axes 1, 2, 3 (the
    statistics do not depend on the order), and ``scale``/``bias`` are stored in torch's order
    (``(C, H, W)``, as in the state_dict: the converter copies them unchanged) and transposed to
    the input's layout when applied. Inputs of other ranks are in torch's layout.
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, *, dtype=jnp.float32):
        shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
        self.normalized_shape = tuple(int(d) for d in shape)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        self.scale = nnx.Param(jnp.ones(self.normalized_shape, dtype)) if elementwise_affine else None
        self.bias = nnx.Param(jnp.zeros(self.normalized_shape, dtype)) if elementwise_affine and bias else None

    def _physical(self, w: jax.Array, ndim: int) -> jax.Array:
        """A ``normalized_shape`` array broadcast against the input in its physical layout."""
        w = w.reshape((1,) * (ndim - w.ndim) + w.shape)
        return nchw_to_nhwc(w) if ndim == 4 else w

    def __call__(self, x: jax.Array) -> jax.Array:
        k = len(self.normalized_shape)
        logical = (x.shape[0], x.shape[3], x.shape[1], x.shape[2]) if x.ndim == 4 else tuple(x.shape)
        if x.ndim < k or logical[x.ndim - k:] != self.normalized_shape:
            raise InputShapeError(f"Given normalized_shape={list(self.normalized_shape)}, expected input with shape "
                                  f"[*, {', '.join(map(str, self.normalized_shape))}] (torch's order), but got "
                                  f"input of size {list(logical)} (torch's order; physical shape {tuple(x.shape)})")
        to_physical = (0, 3, 1, 2) if x.ndim == 4 else tuple(range(x.ndim))  # torch dim -> axis
        axes = tuple(sorted(to_physical[d] for d in range(x.ndim - k, x.ndim)))
        mean = jnp.mean(x, axis=axes, keepdims=True)
        centred = x - mean
        var = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self._physical(self.scale[...], x.ndim)
        if self.bias is not None:
            y = y + self._physical(self.bias[...], x.ndim)
        return y


# --- random layers ------------------------------------------------------------------------


def _own_stream(rngs, rng_collection: str):
    """What a random layer keeps of ``rngs`` (as ``nnx.Dropout`` does): a fork of its stream."""
    if isinstance(rngs, nnx.Rngs):
        return rngs[rng_collection].fork()
    if isinstance(rngs, nnx.RngStream):
        return rngs.fork()
    if rngs is None:
        return nnx.data(None)
    raise TypeError(f"rngs must be an nnx.Rngs, an nnx.RngStream or None, got {type(rngs).__name__}")


def _draw_key(own, given, rng_collection: str, layer: str) -> jax.Array:
    """A key from the call's ``rngs`` (a key, a stream or an Rngs) or else the layer's own stream."""
    stream = given if given is not None else own
    if stream is None:
        raise ValueError(f"{layer} in training mode needs rngs: build the model with nnx.Rngs(dropout=...)")
    if isinstance(stream, jax.Array):
        return stream
    return stream[rng_collection]() if isinstance(stream, nnx.Rngs) else stream()


def _check_probability(p, what: str) -> None:
    if isinstance(p, (int, float)) and not 0.0 <= p <= 1.0:
        raise ValueError(f"{what} has to be between 0 and 1, but got {p}")


class Dropout(nnx.Dropout):
    """``nn.Dropout(p)``: element-wise, inputs scaled by 1/(1-p) in training, identity in eval.
    ``inplace`` is accepted and ignored (arrays are immutable).

    The keep-mask is drawn by :meth:`keep_mask`, the only random part, so the parity suite can
    replay masks that PyTorch drew (see ``parity.dropout``) and test everything else as is.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, *, deterministic: bool | None = False,
                 rng_collection: str = "dropout", rngs: nnx.Rngs | nnx.RngStream | None = None):
        _check_probability(p, "dropout probability")
        super().__init__(p, deterministic=deterministic, rng_collection=rng_collection, rngs=rngs)

    def mask_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def keep_mask(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return jax.random.bernoulli(key, 1.0 - self.rate, shape)

    def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0.0:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        key = _draw_key(self.rngs, rngs, self.rng_collection, "dropout")
        keep = self.keep_mask(key, self.mask_shape(tuple(inputs.shape)))
        keep_prob = 1.0 - self.rate
        return jnp.where(jnp.broadcast_to(keep, inputs.shape), inputs / keep_prob, 0.0)


class Dropout2d(Dropout):
    """``nn.Dropout2d`` as PyTorch 2.x applies it.

    On a 4-D batch it zeroes whole channels (in NHWC the mask is (N, 1, 1, C)). On a 2-D batch
    PyTorch 2.x warns and falls back to element-wise dropout, which lab 8's ``NetDropout`` relies
    on after ``fc1``; this layer does the same (without the warning).
    """

    def mask_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) == 4:
            return (shape[0], 1, 1, shape[3])
        if len(shape) == 2:
            return shape
        raise InputShapeError(f"Dropout2d takes a 4-D (N, H, W, C) or 2-D (N, F) array, got shape {shape}")


class Bernoulli(nnx.Module):
    """A {0, 1} random draw, ``torch.empty(shape, dtype=dtype).bernoulli_(p)``: what torchvision's
    ``stochastic_depth`` draws its per-example keep mask with (``p`` is its survival rate).

    ``Bernoulli(rngs=...)(shape, p, dtype)``. The draw is :meth:`keep_mask` (1 with probability
    ``p``), from the ``"dropout"`` stream, the same replay seam as :class:`Dropout`'s
    ``keep_mask(key, shape)`` with the probability as a third argument: a replayed mask
    replaces it on the instance and ignores the key. ``shape`` is as given (no layout change).
    """

    def __init__(self, *, rng_collection: str = "dropout", rngs: nnx.Rngs | nnx.RngStream | None = None):
        self.rng_collection = rng_collection
        self.rngs = _own_stream(rngs, rng_collection)

    def keep_mask(self, key: jax.Array, shape: tuple[int, ...], p: float) -> jax.Array:
        return jax.random.bernoulli(key, p, shape)

    def __call__(self, shape: Sequence[int], p: float, dtype=jnp.float32, *, rngs=None) -> jax.Array:
        _check_probability(p, "Bernoulli p")
        key = _draw_key(self.rngs, rngs, self.rng_collection, "Bernoulli")
        return self.keep_mask(key, tuple(int(d) for d in shape), p).astype(dtype)


# --- pooling ------------------------------------------------------------------------------


class MaxPool2d(nnx.Module):
    """``nn.MaxPool2d`` on NHWC (or an unbatched torch-layout ``(C, H, W)``): kernel, stride,
    padding (``-inf``: never the maximum), dilation, ceil mode (a last window starting in the
    right padding is dropped, as in PyTorch), ``return_indices`` (PyTorch's ``h * W + w`` per
    plane, int32, NHWC). The gradient of each window goes to its first maximum in row-major
    order, a NaN counting as the maximum (PyTorch's rule).

    A square k x k window with stride k, no padding and floor mode runs on flaxcnn's CPU kernels
    under the layer's policy (:func:`flaxcnn.models.ops.max_pool`); the rest by explicit
    selection (:func:`flaxcnn.models.functional.max_pool_nhwc`). ``tap``: the verification seam of
    :class:`KinkedActivation`, for the window choices (:mod:`parity.pool_decisions`).
    """

    def __init__(self, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
                 dilation: IntPair = 1, return_indices: bool = False, ceil_mode: bool = False, *,
                 conv_policy: ConvPolicy = DEFAULT, tap: Callable[[jax.Array], None] | None = None):
        self.tap = tap
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride") if stride is not None else self.kernel_size
        self.padding = pair(padding, "padding")
        self.dilation = pair(dilation, "dilation")
        self.return_indices = bool(return_indices)
        self.ceil_mode = bool(ceil_mode)
        self.conv_policy = conv_policy
        for k, p, d in zip(self.kernel_size, self.padding, self.dilation):
            if p > k // 2 or p > ((k - 1) * d + 1) // 2:
                raise ValueError(f"MaxPool2d: pad should be at most half of the kernel size, got padding="
                                 f"{self.padding}, kernel_size={self.kernel_size}, dilation={self.dilation}")

    def plain(self) -> bool:
        k = self.kernel_size
        return (k[0] == k[1] and self.stride == k and self.padding == (0, 0) and self.dilation == (1, 1)
                and not self.ceil_mode and not self.return_indices)

    def _pool(self, x: jax.Array):
        wins = [F.strided_windows(x.shape[1 + i], self.kernel_size[i], self.stride[i], self.padding[i],
                                  self.dilation[i], self.ceil_mode) for i in range(2)]
        F.check_output_size("MaxPool2d", x.shape[1:3], (wins[0].out, wins[1].out))
        if self.plain():
            return ops.max_pool(x, self.kernel_size[0], self.conv_policy)
        return F.max_pool_nhwc(x, *wins, return_indices=self.return_indices)

    def __call__(self, x: jax.Array):
        if self.tap is not None:
            self.tap(x)
        return F.on_spatial(self._pool, x, "MaxPool2d")


class AvgPool2d(nnx.Module):
    """``nn.AvgPool2d`` on NHWC (or an unbatched torch-layout ``(C, H, W)``), with PyTorch's
    divisors: the window cut at the end of the padded input (``count_include_pad``, default),
    or its positions inside the input, or ``divisor_override``; zero padding; ceil-mode windows
    as for :class:`MaxPool2d`."""

    def __init__(self, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
                 ceil_mode: bool = False, count_include_pad: bool = True, divisor_override: int | None = None):
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride") if stride is not None else self.kernel_size
        self.padding = pair(padding, "padding")
        self.ceil_mode, self.count_include_pad = bool(ceil_mode), bool(count_include_pad)
        if divisor_override is not None and int(divisor_override) == 0:
            raise ValueError("AvgPool2d: divisor_override must be non-zero")
        self.divisor_override = divisor_override
        if any(p > k // 2 for k, p in zip(self.kernel_size, self.padding)):
            raise ValueError(f"AvgPool2d: pad should be at most half of the kernel size, got padding={self.padding}, "
                             f"kernel_size={self.kernel_size}")

    def _pool(self, x: jax.Array) -> jax.Array:
        args = list(zip(self.kernel_size, self.stride, self.padding))
        wins = [F.strided_windows(x.shape[1 + i], k, s, p, 1, self.ceil_mode) for i, (k, s, p) in enumerate(args)]
        F.check_output_size("AvgPool2d", x.shape[1:3], (wins[0].out, wins[1].out))
        if self.divisor_override is not None:
            return F.avg_pool_nhwc(x, *wins, int(self.divisor_override))
        lengths = [F.avg_divisor(w, k, s, p, self.count_include_pad) for w, (k, s, p) in zip(wins, args)]
        return F.avg_pool_nhwc(x, *wins, np.outer(*lengths))

    def __call__(self, x: jax.Array) -> jax.Array:
        return F.on_spatial(self._pool, x, "AvgPool2d")


class AdaptiveAvgPool2d(nnx.Module):
    """``nn.AdaptiveAvgPool2d(output_size)`` (an int, or a pair with None for "keep this size"):
    output ``i`` averages input ``[floor(i*H/out), ceil((i+1)*H/out))``. NHWC or unbatched (C, H, W)."""

    def __init__(self, output_size: int | Sequence[int | None]):
        self.output_size = output_size
        F.adaptive_output_size(output_size, (1, 1))  # refuse a bad size now

    def __call__(self, x: jax.Array) -> jax.Array:
        return F.on_spatial(lambda a: F.adaptive_avg_pool(a, (1, 2), F.adaptive_output_size(
            self.output_size, a.shape[1:3])), x, "AdaptiveAvgPool2d")


class AdaptiveMaxPool2d(nnx.Module):
    """``nn.AdaptiveMaxPool2d(output_size, return_indices)``: PyTorch's adaptive windows (see
    :class:`AdaptiveAvgPool2d`), the maximum and its gradient as in :class:`MaxPool2d`."""

    def __init__(self, output_size: int | Sequence[int | None], return_indices: bool = False):
        self.output_size, self.return_indices = output_size, bool(return_indices)
        F.adaptive_output_size(output_size, (1, 1))

    def _pool(self, x: jax.Array):
        out = F.adaptive_output_size(self.output_size, x.shape[1:3])
        wins = [F.adaptive_windows(x.shape[1 + i], out[i]) for i in range(2)]
        return F.max_pool_nhwc(x, *wins, return_indices=self.return_indices)

    def __call__(self, x: jax.Array):
        return F.on_spatial(self._pool, x, "AdaptiveMaxPool2d")


# --- activations --------------------------------------------------------------------------


class KinkedActivation(nnx.Module):
    """A piecewise activation whose derivative jumps at fixed inputs (:meth:`kinks`): an input
    within rounding of a kink is decided by the last bits of the forward pass. ``tap``: an
    explicit seam for verification (None in normal use): a callable that the parity suite and
    the port's proof set, on a copy of a model, to see every input (they record, then the layer
    runs unchanged; see :mod:`parity.relu_decisions`). ``inplace`` is PyTorch's memory option,
    accepted and ignored. A subclass gives ``KINKS`` and ``fn`` (or overrides both methods)."""

    KINKS: tuple[float, ...] = ()
    fn: Callable[[jax.Array], jax.Array]

    def __init__(self, inplace: bool = False, *, tap: Callable[[jax.Array], None] | None = None):
        del inplace
        self.tap = tap

    def kinks(self) -> tuple[float, ...]:
        return type(self).KINKS

    def activate(self, x: jax.Array) -> jax.Array:
        return type(self).fn(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.tap is not None:
            self.tap(x)
        return self.activate(x)


class ReLU(KinkedActivation):
    """``nn.ReLU``, with the verification seam ``tap`` (:class:`KinkedActivation`)."""

    KINKS = (0.0,)
    fn = staticmethod(jax.nn.relu)


class ReLU6(KinkedActivation):
    """``nn.ReLU6``: min(max(x, 0), 6); gradient 0 at 0 and 6 (PyTorch's hardtanh backward)."""

    KINKS = (0.0, 6.0)
    fn = staticmethod(F.relu6)


class Hardswish(KinkedActivation):
    """``nn.Hardswish``: x * relu6(x + 3) / 6; gradient 0 at -3, 1 at 3 (PyTorch's)."""

    KINKS = (-3.0, 3.0)
    fn = staticmethod(F.hardswish)


class Hardsigmoid(KinkedActivation):
    """``nn.Hardsigmoid``: relu6(x + 3) / 6; gradient 0 at -3 and 3 (PyTorch's)."""

    KINKS = (-3.0, 3.0)
    fn = staticmethod(F.hardsigmoid)


class LeakyReLU(KinkedActivation):
    """``nn.LeakyReLU(negative_slope)``: x if x > 0 else slope * x; gradient ``slope`` at 0 (PyTorch's)."""

    KINKS = (0.0,)

    def __init__(self, negative_slope: float = 0.01, inplace: bool = False):
        super().__init__(inplace)
        self.negative_slope = float(negative_slope)

    def activate(self, x: jax.Array) -> jax.Array:
        return F.leaky_relu(x, self.negative_slope)


class _Elementwise(nnx.Module):
    """An activation without parameters: ``fn`` element by element (any layout). ``inplace`` is
    PyTorch's memory option, accepted and ignored (arrays are immutable; results are the same)."""

    fn: Callable[[jax.Array], jax.Array]

    def __init__(self, inplace: bool = False):
        del inplace

    def __call__(self, x: jax.Array) -> jax.Array:
        return type(self).fn(x)


class SiLU(_Elementwise):
    """``nn.SiLU``: x * sigmoid(x)."""

    fn = staticmethod(jax.nn.silu)


class Sigmoid(_Elementwise):
    """``nn.Sigmoid``."""

    fn = staticmethod(jax.nn.sigmoid)

    def __init__(self):
        super().__init__()


class Tanh(_Elementwise):
    """``nn.Tanh``."""

    fn = staticmethod(jnp.tanh)

    def __init__(self):
        super().__init__()


class ELU(nnx.Module):
    """``nn.ELU(alpha)``: x if x > 0 else alpha * (exp(x) - 1); gradient ``alpha`` at 0 (PyTorch's)."""

    def __init__(self, alpha: float = 1.0, inplace: bool = False):
        self.alpha = float(alpha)

    def __call__(self, x: jax.Array) -> jax.Array:
        return F.elu(x, self.alpha)


class GELU(nnx.Module):
    """``nn.GELU(approximate='none' | 'tanh')``: the erf form, or PyTorch's tanh approximation."""

    def __init__(self, approximate: str = "none"):
        F.gelu(jnp.zeros(()), approximate)  # refuse an unknown approximation now
        self.approximate = approximate

    def __call__(self, x: jax.Array) -> jax.Array:
        return F.gelu(x, self.approximate)


class Softmax(nnx.Module):
    """``nn.Softmax(dim)`` over the **physical** axis ``dim`` of the array it gets (a code
    generator translates torch's dim of a 4-D NHWC tensor: torch dim 1 is axis 3 or -1).
    ``dim=None``: PyTorch's implicit choice (:func:`flaxcnn.models.functional.implicit_softmax_axis`)."""

    def __init__(self, dim: int | None = None):
        self.dim = dim

    def axis(self, x: jax.Array) -> int:
        return F.implicit_softmax_axis(x.ndim) if self.dim is None else self.dim

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.softmax(x, axis=self.axis(x))


class LogSoftmax(Softmax):
    """``nn.LogSoftmax(dim)``, ``dim`` a physical axis as for :class:`Softmax`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.log_softmax(x, axis=self.axis(x))


class Identity(nnx.Module):
    """``nn.Identity``: any constructor arguments are accepted and ignored, as in PyTorch."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class Flatten(nnx.Module):
    """``nn.Flatten(start_dim, end_dim)`` in **torch's** dims and element order: a 4-D NHWC input
    is transposed back to NCHW first, so ``Flatten()`` of ``(N, H, W, C)`` is ``(N, C*H*W)`` in
    PyTorch's (c, h, w) order and the next Linear takes PyTorch's weight unchanged (no
    ``nchw_flatten`` row permutation). A 4-D result (no dims merged, or a 5-D input) is
    returned NHWC, so the layout convention holds on both sides."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        self.start_dim, self.end_dim = start_dim, end_dim

    def __call__(self, x: jax.Array) -> jax.Array:
        logical = nhwc_to_nchw(x) if x.ndim == 4 else x
        ndim = max(logical.ndim, 1)
        start, end = (d + ndim if d < 0 else d for d in (self.start_dim, self.end_dim))
        if not 0 <= start <= end < ndim:
            raise InputShapeError(f"Flatten(start_dim={self.start_dim}, end_dim={self.end_dim}) does not fit an "
                                  f"input of {logical.ndim} dims (torch's shape {tuple(logical.shape)})")
        shape = logical.shape
        y = logical.reshape(shape[:start] + (math.prod(shape[start:end + 1]),) + shape[end + 1:])
        return nchw_to_nhwc(y) if y.ndim == 4 else y


# --- resampling -----------------------------------------------------------------------------


class Upsample(nnx.Module):
    """``nn.Upsample(size, scale_factor, mode, align_corners, recompute_scale_factor)``: see
    :func:`flaxcnn.models.functional.interpolate` (NHWC for 4-D, (N, C, L) for 3-D)."""

    def __init__(self, size: int | Sequence[int] | None = None, scale_factor: float | Sequence[float] | None = None,
                 mode: str = "nearest", align_corners: bool | None = None,
                 recompute_scale_factor: bool | None = None):
        self.size = size
        if isinstance(scale_factor, Sequence):
            self.scale_factor = tuple(float(s) for s in scale_factor)
        else:
            self.scale_factor = float(scale_factor) if scale_factor else None
        self.mode, self.align_corners, self.recompute_scale_factor = mode, align_corners, recompute_scale_factor
        if mode not in F.RESIZE_MODES:
            raise ConfigError(f"Upsample mode must be one of {', '.join(F.RESIZE_MODES)}, got {mode!r}")

    def __call__(self, x: jax.Array) -> jax.Array:
        return interpolate(x, self.size, self.scale_factor, self.mode, self.align_corners,
                           recompute_scale_factor=self.recompute_scale_factor)


class UpsamplingNearest2d(Upsample):
    """``nn.UpsamplingNearest2d``: ``Upsample(mode="nearest")``."""

    def __init__(self, size: int | Sequence[int] | None = None, scale_factor: float | Sequence[float] | None = None):
        super().__init__(size, scale_factor, mode="nearest")


class UpsamplingBilinear2d(Upsample):
    """``nn.UpsamplingBilinear2d``: ``Upsample(mode="bilinear", align_corners=True)``."""

    def __init__(self, size: int | Sequence[int] | None = None, scale_factor: float | Sequence[float] | None = None):
        super().__init__(size, scale_factor, mode="bilinear", align_corners=True)
