"""Flax NNX layers named and parameterised like ``torch.nn``'s, with PyTorch's semantics.

What ported models (``flaxcnn port``) and hand-written mirrors are built from. Layout: every
layer here takes and returns NHWC activations (the layout XLA's CPU convolutions and flaxcnn's
kernels run in); a model transposes its NCHW input once. Convolutions and max-pools run under
the layer's :class:`~flaxcnn.models.conv_policy.ConvPolicy` (``conv_policy``, a static
attribute that :func:`flaxcnn.models.conv_policy.apply` replaces model-wide).

Parameter names follow flaxcnn's converter (:mod:`flaxcnn.convert`): ``kernel``/``bias`` for
convolutions and linears, ``scale``/``bias``/``mean``/``var`` for normalisation, so a PyTorch
``state_dict`` maps one key to one variable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flaxcnn.models import ops
from flaxcnn.models.conv_policy import DEFAULT, ConvPolicy

IntPair = int | tuple[int, int]


def pair(v: IntPair) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def torch_uniform(fan_in: int) -> nnx.Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Conv2d/Linear weights and biases
    (``kaiming_uniform_(a=sqrt(5))`` reduces to this bound)."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


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
    ph, pw = pair(padding)
    return ((ph, ph), (pw, pw))


class Conv2d(nnx.Conv):
    """``nn.Conv2d``: any stride, padding (int, pair, ``"same"``, ``"valid"``), dilation and groups,
    with or without bias; NHWC in and out, HWIO kernel ``(kh, kw, in / groups, out)``.

    Stride-1, ungrouped, undilated float32 convolutions run on flaxcnn's CPU kernels under the
    default policy; the rest on XLA's convolution (:class:`flaxcnn.models.ops.Convolution`).
    ``init="torch"`` (default) draws PyTorch's initial distribution, ``"flax"`` Flax's.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair | str = 0, dilation: IntPair = 1, groups: int = 1, bias: bool = True, *,
                 dtype=jnp.float32, init: str = "torch", conv_policy: ConvPolicy = DEFAULT, rngs: nnx.Rngs):
        kernel_size, dilation = pair(kernel_size), pair(dilation)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        kwargs = {}
        if init == "torch":
            fan_in = in_channels // groups * kernel_size[0] * kernel_size[1]
            kwargs = dict(kernel_init=torch_uniform(fan_in), bias_init=torch_uniform(fan_in))
        super().__init__(in_channels, out_channels, kernel_size, strides=pair(stride),
                         padding=conv_padding(padding, kernel_size, dilation), kernel_dilation=dilation,
                         feature_group_count=groups, use_bias=bias, dtype=dtype, param_dtype=dtype,
                         conv_general_dilated=ops.Convolution(conv_policy), rngs=rngs, **kwargs)


class MaxPool2d(nnx.Module):
    """``nn.MaxPool2d`` on NHWC: a k x k window with stride k, no padding and floor mode runs on
    flaxcnn's CPU kernels under the layer's policy (:func:`flaxcnn.models.ops.max_pool`)."""

    def __init__(self, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
                 dilation: IntPair = 1, ceil_mode: bool = False, *, conv_policy: ConvPolicy = DEFAULT):
        self.kernel_size = pair(kernel_size)
        self.stride = pair(stride) if stride is not None else self.kernel_size
        self.padding = pair(padding)
        self.dilation = pair(dilation)
        self.ceil_mode = bool(ceil_mode)
        self.conv_policy = conv_policy

    def plain(self) -> bool:
        k = self.kernel_size
        return (k[0] == k[1] and self.stride == k and self.padding == (0, 0) and self.dilation == (1, 1)
                and not self.ceil_mode)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.plain():
            return ops.max_pool(x, self.kernel_size[0], self.conv_policy)
        raise NotImplementedError("MaxPool2d with padding, ceil_mode, dilation or stride != kernel_size")


class ReLU(nnx.Module):
    """``nn.ReLU``. ``tap``: an explicit seam for verification (None in normal use): a callable
    that the parity suite sets, on a copy of a model, to see every ReLU input (it records, then
    the ReLU runs unchanged; see :mod:`parity.relu_decisions`)."""

    def __init__(self, tap: Callable[[jax.Array], None] | None = None):
        self.tap = tap

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.tap is not None:
            self.tap(x)
        return jax.nn.relu(x)
