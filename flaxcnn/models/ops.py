"""The array operations the models are built from, in the formulation that runs fastest.

Each function computes exactly the mathematical operation its name says (the parity suite
checks every model against PyTorch on the path that uses these), but *how* it is expressed is
chosen for XLA's CPU and GPU backends; see the notes on each.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxcnn import kernels
from flaxcnn.models.conv_policy import CONV_PARTS, DEFAULT, ConvLayer, ConvPolicy, DepthwiseLayer, PoolLayer

#: the layout every flaxcnn convolution uses (see :mod:`flaxcnn.models.layers`)
NHWC_HWIO = ("NHWC", "HWIO", "NHWC")
Padding = tuple[tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class Convolution:
    """``lax.conv_general_dilated`` (what ``nnx.Conv`` calls) under a :class:`ConvPolicy`.

    A plain convolution (stride 1, no dilation, one group, explicit padding, NHWC/HWIO, float32)
    lowers, on CPU, to :func:`conv2d` with the implementation of each part (forward, kernel
    gradient, input gradient) that ``policy`` names for this layer shape; on every other platform
    (GPU, TPU) to XLA's convolution. The platform is chosen at lowering
    (``lax.platform_dependent``), not from the default backend, so the same jitted function placed
    on a CPU device of a GPU host, or exported for another platform, gets the right code.
    A float32 NHWC depthwise convolution (one group per input channel; any stride, padding and
    dilation) lowers on CPU to :data:`DEPTHWISE`'s implementation the policy names (per-tap
    multiply-adds by default, :class:`DepthwiseLayer`), elsewhere to XLA's grouped convolution.
    Everything else goes to XLA's convolution unchanged. Frozen and hashable: an ``nnx.Conv``
    holding one keeps it in its static graph, so a policy is part of the traced program.
    """

    policy: ConvPolicy = DEFAULT

    def __call__(self, lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
                 rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                 precision=None, **kwargs) -> jax.Array:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # nnx.Conv passes out_sharding=None
        depthwise = self._depthwise_layer(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                          dimension_numbers, feature_group_count, precision, kwargs)
        if depthwise is not None:
            impl = DEPTHWISE[self.policy.choose(depthwise, "depthwise", DEPTHWISE)]
            return lax.platform_dependent(lhs, rhs, cpu=lambda x, w: impl(x, w, depthwise),
                                          default=lambda x, w: depthwise_xla(x, w, depthwise))
        if (lhs.ndim == 4 and feature_group_count == 1 and not isinstance(padding, str)
                and tuple(window_strides) == (1, 1) and jnp.dtype(lhs.dtype) == jnp.float32
                and jnp.dtype(rhs.dtype) == jnp.float32 and not kwargs
                and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
                and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC_HWIO)):
            pads = tuple(tuple(int(v) for v in p) for p in padding)
            n, h, w, _ = (int(v) for v in lhs.shape)
            layer = ConvLayer(n, h, w, tuple(int(v) for v in rhs.shape), pads, precision, self.policy.kernel_isa())
            choice = tuple(self.policy.choose(layer, part, PARTS[part]) for part in CONV_PARTS)
            return lax.platform_dependent(lhs, rhs, cpu=lambda x, w: conv2d(x, w, layer, choice),
                                          default=lambda x, w: xla_conv(x, w, pads, precision))
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)

    @staticmethod
    def _depthwise_layer(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                         feature_group_count, precision, kwargs) -> DepthwiseLayer | None:
        """The call as a :class:`DepthwiseLayer`, or None when it is not a float32 NHWC/HWIO
        depthwise convolution with explicit padding."""
        if not (lhs.ndim == 4 and rhs.ndim == 4 and not kwargs and not isinstance(padding, str)
                and feature_group_count > 1 and feature_group_count == lhs.shape[-1] and rhs.shape[2] == 1
                and jnp.dtype(lhs.dtype) == jnp.float32 and jnp.dtype(rhs.dtype) == jnp.float32
                and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
                and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC_HWIO)):
            return None
        n, h, w, c = (int(v) for v in lhs.shape)
        return DepthwiseLayer(n, h, w, c, int(rhs.shape[3]) // c, (int(rhs.shape[0]), int(rhs.shape[1])),
                              tuple(int(v) for v in window_strides),
                              tuple(tuple(int(v) for v in p) for p in padding),
                              tuple(int(v) for v in (rhs_dilation or (1, 1))), precision)


#: ``nnx.Conv(..., conv_general_dilated=conv_general_dilated)``: the default policy
conv_general_dilated = Convolution(DEFAULT)


def xla_conv(x: jax.Array, w: jax.Array, padding: Padding, precision=None) -> jax.Array:
    """XLA's own stride-1 NHWC/HWIO convolution (on CPU: one YNNPACK call)."""
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC_HWIO, precision=precision)


def _pad(x: jax.Array, padding: Padding) -> jax.Array:
    """Zero padding of H and W; a negative amount crops (``lax.pad`` semantics)."""
    (t, b), (l, r) = padding
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (t, b, 0), (l, r, 0), (0, 0, 0)))


# --- the implementations of each part of a convolution's training step --------------------------
# forward:      (x, w) -> y
# kernel_grad:  (x, g) -> dW    (g: the output gradient)
# input_grad:   (g, w) -> dx
# Each takes the layer (shapes, padding, precision, kernel variant) and computes exactly its
# mathematical operation; they differ in how XLA's CPU backend runs them. "-split" variants cut
# the batch into one slice per core (see split_batch).


def forward_cpp(x, w, layer):
    return kernels.conv_forward(_pad(x, layer.padding), w, layer.isa)


def kernel_grad_cpp(x, g, layer):
    return kernels.conv_kernel_grad(_pad(x, layer.padding), g, layer.kernel_shape, layer.isa)


def _input_grad_padding(layer: ConvLayer) -> Padding:
    """An input gradient is the output gradient, padded by this so that the result has the
    input's size, convolved with :func:`_flipped` kernel (a negative amount crops)."""
    kh, kw = layer.kernel_shape[:2]
    (t, b), (l, r) = layer.padding
    return (kh - 1 - t, kh - 1 - b), (kw - 1 - l, kw - 1 - r)


def _flipped(w: jax.Array) -> jax.Array:
    """The HWIO kernel flipped in space, with in and out channels swapped."""
    return jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)


def input_grad_cpp(g, w, layer):
    return kernels.conv_forward(_pad(g, _input_grad_padding(layer)), _flipped(w), layer.isa)


def forward_xla(x, w, layer):
    return xla_conv(x, w, layer.padding, layer.precision)


def kernel_grad_xla(x, g, layer):
    w0 = jnp.zeros(layer.kernel_shape, g.dtype)  # the convolution is linear in w: any w will do
    return jax.vjp(lambda w: xla_conv(x, w, layer.padding, layer.precision), w0)[1](g)[0]


def input_grad_xla(g, w, layer):
    x0 = jnp.zeros(layer.input_shape_for(g.shape[0]), g.dtype)
    return jax.vjp(lambda x: xla_conv(x, w, layer.padding, layer.precision), x0)[1](g)[0]


def forward_banded(x, w, layer):
    return banded_conv(x, w, layer.padding, layer.precision)


def kernel_grad_banded(x, g, layer):
    w0 = jnp.zeros(layer.kernel_shape, g.dtype)
    return jax.vjp(lambda w: banded_conv(x, w, layer.padding, layer.precision), w0)[1](g)[0]


def input_grad_banded(g, w, layer):
    return banded_conv(g, _flipped(w), _input_grad_padding(layer), layer.precision)


def kernel_grad_rows(x, g, layer):
    return kernel_grad_by_rows(x, g, layer.kernel_shape, layer.padding, layer.precision)


def _split(part: Callable, reduce: str) -> Callable:
    """``part`` computed on batch slices (one per core, :func:`split_batch`): concatenated, or
    summed for a kernel gradient (a sum over the batch)."""
    def split_part(a, b, layer):
        if reduce == "sum":
            outs = [part(a[lo:hi], b[lo:hi], layer) for lo, hi in slice_bounds(a.shape[0], cores())]
            return functools.reduce(jnp.add, outs)
        return split_batch(lambda piece: part(piece, b, layer), a, cores())
    return split_part


#: every implementation of each part (a ConvPolicy names one per part; ``flaxcnn tune`` times those that apply)
FORWARD: dict[str, Callable] = {"cpp": forward_cpp, "xla": forward_xla, "xla-split": _split(forward_xla, "concat"),
                                "banded": forward_banded}
KERNEL_GRAD: dict[str, Callable] = {"cpp": kernel_grad_cpp, "xla": kernel_grad_xla,
                                    "xla-split": _split(kernel_grad_xla, "sum"), "rows": kernel_grad_rows,
                                    "banded": kernel_grad_banded}
INPUT_GRAD: dict[str, Callable] = {"cpp": input_grad_cpp, "xla": input_grad_xla,
                                   "xla-split": _split(input_grad_xla, "concat"), "banded": input_grad_banded}
PARTS = {"forward": FORWARD, "kernel_grad": KERNEL_GRAD, "input_grad": INPUT_GRAD}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, w: jax.Array, layer: ConvLayer, choice: tuple[str, str, str]) -> jax.Array:
    """Stride-1 convolution of an NHWC batch with an HWIO kernel, each part of it by the
    implementation named in ``choice`` (forward, kernel gradient, input gradient: see
    :data:`PARTS`). Parts are independent: any forward pairs with any gradient, and each computes
    the same mathematical operation."""
    return FORWARD[choice[0]](x, w, layer)


def _conv2d_fwd(x, w, layer, choice):
    """With symbolic zeros: a network's first convolution, whose input is data, is not asked for
    an input gradient, and then none is computed."""
    y = conv2d(x.value, w.value, layer, choice)
    return y, (x.value, w.value if x.perturbed else None, w.perturbed)


def _conv2d_bwd(layer, choice, residuals, g):
    x, w, w_perturbed = residuals
    grad_x = None if w is None else INPUT_GRAD[choice[2]](g, w, layer)
    grad_w = KERNEL_GRAD[choice[1]](x, g, layer) if w_perturbed else None
    return grad_x, grad_w


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd, symbolic_zeros=True)


def cores() -> int:
    """Cores this process may run on (the "-split" implementations cut one batch slice per core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def slice_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` (at most ``n``) near-equal ``[lo, hi)`` slices of a batch of ``n``."""
    parts = max(1, min(parts, n))
    edges = np.linspace(0, n, parts + 1).astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def split_batch(conv: Callable[[jax.Array], jax.Array], x: jax.Array, parts: int) -> jax.Array:
    """``conv(x)`` computed as ``parts`` independent convolutions of batch slices, concatenated.

    Why: XLA's CPU convolutions (YNNPACK kernels) and small matmuls run on one thread each, so
    a training step of these networks kept the second core of a 2-core machine mostly idle.
    Independent slices are independent operations, which XLA's CPU runtime executes
    concurrently. Each output row is computed exactly as before; only a kernel gradient's sum
    over the batch is split into ``parts`` partial sums.
    """
    return jnp.concatenate([conv(x[lo:hi]) for lo, hi in slice_bounds(x.shape[0], parts)], axis=0)


def band_width(out_width: int, out_channels: int) -> int:
    """Output columns per matmul row in :func:`banded_conv`: the whole row when it is narrow
    (ConvNet: 17 x 10), else blocks of about 128 outputs (Net's conv1: 8 x 16). Measured on
    the lab layers: narrower blocks starve the matmul, wider ones multiply by zeros."""
    if out_width * out_channels <= 256:
        return out_width
    return max(1, min(out_width, 128 // out_channels))


def banded_conv(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]],
                precision=None) -> jax.Array:
    """Stride-1 convolution of an NHWC batch with an HWIO kernel as one matmul per block of
    output columns.

    Why: XLA's CPU convolutions (YNNPACK) are slow when there are few input channels: Net's
    3->16 first layer ran at about 13 GFLOP/s and ConvNet's 1->10 10x10 filter gradient took
    30+ ms per batch of 64. Here each output row block of ``wb`` columns is one row of a matmul:
    the ``kh`` input rows under it, ``wb + kw - 1`` columns wide, flattened (K = kh * (wb+kw-1)
    * C) times a banded matrix built from the kernel (N = wb * O) that is zero where a column
    is outside a tap's reach. That multiplies some zeros (2-3x the convolution's FLOPs) but
    runs as one well-shaped GEMM, forward and (by autodiff: patches^T @ grad, gathered back
    into the kernel) for the kernel gradient, 2-9x faster than XLA's convolution on these
    layers. The result is the same convolution up to float32 summation order (the parity
    suite checks it against PyTorch). A non-finite input value spreads NaN (0 * inf) to its
    whole row block, where a direct convolution would keep it to its receptive field.
    """
    n, _, _, c = x.shape
    kh, kw, _, o = w.shape
    xp = _pad(x, padding)
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    wb = band_width(wo, o)
    blocks = -(-wo // wb)
    if blocks * wb > wo:  # pad the right edge to whole blocks; the extra columns are cut off below
        xp = jnp.pad(xp, ((0, 0), (0, 0), (0, blocks * wb - wo), (0, 0)))
    span = wb + kw - 1
    rows = jnp.concatenate([xp[:, i:i + ho] for i in range(kh)], axis=-1)  # (n, ho, W, kh*c)
    patches = jnp.stack([rows[:, :, b * wb:b * wb + span] for b in range(blocks)], axis=2)
    patches = patches.reshape(n * ho * blocks, span * kh * c)  # rows: (n, ho, block); cols: (u, kh, c)
    reach = np.zeros((span, wb, kw), np.float32)  # reach[u, v, j] = 1 where input column u = v + j
    for v in range(wb):
        reach[v:v + kw, v, :] = np.eye(kw, dtype=np.float32)
    band = jnp.einsum("uvj,hjco->uhcvo", reach, w, precision=lax.Precision.HIGHEST)
    out = jnp.matmul(patches, band.reshape(span * kh * c, wb * o), precision=precision)
    out = out.reshape(n, ho, blocks * wb, o)
    return out[:, :, :wo] if blocks * wb > wo else out


def depthwise_taps(x: jax.Array, w: jax.Array, layer: DepthwiseLayer) -> jax.Array:
    """A depthwise convolution (NHWC input, HWIO kernel with I = 1 and ``multiplier`` outputs per
    channel, output channel ``c * multiplier + m`` from input channel ``c``) as one multiply-add
    per kernel tap: the padded input's strided slice under tap (i, j) times that tap's weights.

    Why: XLA's CPU backend runs a grouped convolution as many one-channel convolutions; these
    slices, products and sums are elementwise work XLA fuses into a few loops, and their
    gradients (pads and strided slices) fuse too. See :class:`DepthwiseLayer` for the figures.
    The result is the same sum in another order (float32 rounding differs, as between any two
    convolution implementations)."""
    kh, kw = layer.kernel_hw
    (sh, sw), (dh, dw) = layer.strides, layer.dilation
    ho, wo = layer.out_hw
    xp = _pad(x, layer.padding)
    if layer.multiplier > 1:
        xp = jnp.repeat(xp, layer.multiplier, axis=-1)
    n, channels = xp.shape[0], xp.shape[-1]
    out = None
    for i in range(kh):
        for j in range(kw):
            window = lax.slice(xp, (0, i * dh, j * dw, 0),
                               (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, channels), (1, sh, sw, 1))
            term = window * w[i, j, 0]
            out = term if out is None else out + term
    return out


def depthwise_xla(x: jax.Array, w: jax.Array, layer: DepthwiseLayer) -> jax.Array:
    """XLA's grouped convolution (what every platform but CPU runs)."""
    return lax.conv_general_dilated(x, w, layer.strides, layer.padding, rhs_dilation=layer.dilation,
                                    dimension_numbers=NHWC_HWIO, feature_group_count=layer.c,
                                    precision=layer.precision)


#: the implementations of a depthwise convolution (forward; the gradients by autodiff)
DEPTHWISE: dict[str, Callable] = {"taps": depthwise_taps, "xla": depthwise_xla}


def kernel_grad_by_rows(x: jax.Array, g: jax.Array, kernel_shape, padding, precision=None) -> jax.Array:
    """The HWIO kernel gradient of a stride-1 NHWC convolution given the output gradient ``g``:
    ``dW[i, j, c, o] = sum over (n, y, x) of x_padded[n, y + i, x + j, c] * g[n, y, x, o]``.

    The ``kw`` column shifts of the padded input are laid side by side on the channel axis
    once, then each kernel row ``i`` is one matmul over all (n, y, x): its rows of that
    array (``kw * C`` wide) transposed times ``g`` (``O`` wide).
    """
    kh, kw, c, o = kernel_shape
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    ho, wo = g.shape[1], g.shape[2]
    shifted = jnp.concatenate([xp[:, :, j:j + wo] for j in range(kw)], axis=-1)  # (n, Hp, wo, kw*c)
    g2 = g.reshape(-1, o)
    rows = [lax.dot_general(shifted[:, i:i + ho].reshape(-1, kw * c), g2, (((0,), (0,)), ((), ())),
                            precision=precision) for i in range(kh)]
    return jnp.stack(rows).reshape(kh, kw, c, o)


def max_pool(x: jax.Array, k: int, policy: ConvPolicy = DEFAULT) -> jax.Array:
    """``F.max_pool2d(x, k)`` (stride k, floor mode) on an NHWC batch.

    The gradient of each window goes to its *first* maximum in row-major window order --
    PyTorch's rule on ties (plain autodiff of a max would split it between tied elements). On
    CPU, in float32, the implementation is the one ``policy`` names for this shape (see
    :data:`POOLS`); elsewhere XLA's taps (chosen at lowering, as for convolutions).
    """
    if x.ndim != 4 or jnp.dtype(x.dtype) != jnp.float32:
        return _taps_pool(_crop(x, k), k)
    n, h, w, c = (int(v) for v in x.shape)
    pool = PoolLayer(n, h, w, c, int(k), policy.kernel_isa())
    choice = tuple(policy.choose(pool, part, POOLS) for part in ("pool_forward", "pool"))
    return lax.platform_dependent(x, cpu=lambda a: pool2d(a, pool, choice),
                                  default=lambda a: _taps_pool(_crop(a, k), k))


def _crop(x: jax.Array, k: int) -> jax.Array:
    n, h, w, c = x.shape
    return x[:, : h // k * k, : w // k * k, :]


def _uncrop(dx: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A cropped input's gradient, zero-padded back to the input's shape (rows/columns past the
    last window get no gradient)."""
    return jnp.pad(dx, ((0, 0), (0, shape[1] - dx.shape[1]), (0, shape[2] - dx.shape[2]), (0, 0)))


def _taps(x: jax.Array, k: int) -> list[jax.Array]:
    """The k*k strided sub-grids of x in row-major window order, each (N, H/k, W/k, C)."""
    return [x[:, i::k, j::k, :] for i in range(k) for j in range(k)]


def _taps_pool(x: jax.Array, k: int) -> jax.Array:
    return pool2d_taps_train(x, k)


def _first_by_taps(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    taps = _taps(x, k)
    y = functools.reduce(jnp.maximum, taps)
    first = jnp.full(y.shape, k * k, jnp.int32)
    for t in reversed(range(k * k)):
        first = jnp.where(taps[t] == y, t, first)
    return y, first


def _first_by_argmax(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    n, h, w, c = x.shape
    windows = x.reshape(n, h // k, k, w // k, k, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, h // k, w // k, c, k * k)
    return jnp.max(windows, axis=-1), jnp.argmax(windows, axis=-1).astype(jnp.int32)


def _scatter_to_first(first: jax.Array, g: jax.Array, k: int) -> jax.Array:
    """One elementwise pass in the (cropped) input's shape, seen as (N, H/k, k, W/k, k, C): an
    element gets its window's gradient when its position in the window is the first maximum."""
    n, ho, wo, c = g.shape
    position = (lax.broadcasted_iota(jnp.int32, (1, 1, k, 1, k, 1), 2) * k
                + lax.broadcasted_iota(jnp.int32, (1, 1, k, 1, k, 1), 4))
    dx = jnp.where(position == first[:, :, None, :, None, :], g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    return dx.reshape(n, ho * k, wo * k, c)


@dataclass(frozen=True)
class PoolImpl:
    """A max-pool formulation: the forward pass alone (evaluation), the forward pass with each
    window's first maximum (row-major index in the window, PyTorch's tie rule) as the residual,
    and the backward pass from that residual. All three formulations share the residual's
    meaning, so each is a complete, exact max-pool."""

    forward: Callable  # (x, pool) -> y
    train_forward: Callable  # (x, pool) -> (y, first)
    backward: Callable  # (first, g, pool, x_shape) -> dx


def _xla_pool(find: Callable, forward: Callable) -> PoolImpl:
    # The barriers keep XLA from fusing the pool's producer (an activation) into the taps and the
    # gradient's scatter into its consumers (an activation's or BatchNorm's backward). Without them
    # the fused ops were recomputed in several consumers: NetDepth's, SpeechNet's and
    # SpeechResNet's steps ran 12-25% slower than with the C++ pool (AMD EPYC, AVX-512, batch 64);
    # with them the XLA pools were as fast or faster in all three, and in Net. They also make a
    # pool timed alone (``flaxcnn tune``) run as it does inside its step.
    return PoolImpl(
        forward=lambda x, pool: forward(_crop(x, pool.k), pool.k),
        train_forward=lambda x, pool: find(_crop(lax.optimization_barrier(x), pool.k), pool.k),
        backward=lambda first, g, pool, shape: lax.optimization_barrier(_uncrop(_scatter_to_first(first, g, pool.k), shape)))


#: the max-pool implementations (a ConvPolicy names one; ``flaxcnn tune`` times them). Why several: XLA's CPU backend lowers the
#: gradient of ``reduce_window`` to select-and-scatter and that of reshape+max to a slow reduction,
#: so each formulation saves the first maximum's index in the forward pass and writes the gradient
#: in one elementwise pass. "taps" finds it by a chain of comparisons over the k*k strided taps
#: (fused by XLA into the producer, recomputed in every consumer: cheap for 2x2, 16x the work for
#: 4x4), "argmax" by an argmax over the window (one transpose of the activation), "cpp" by a C++
#: loop (which also handles cropped windows without a copy; a NaN counts as the maximum, as in
#: PyTorch's CPU kernel). Measured on the lab networks at batch 64 on an AVX-512 Xeon: taps
#: fastest for the uncropped 2x2 pools of the CIFAR nets, cpp for ConvNet's 4x4 (+7% per step)
#: and SpeechNet's cropped 2x2 pools (+21%).
POOLS: dict[str, PoolImpl] = {
    "cpp": PoolImpl(forward=lambda x, pool: kernels.max_pool_forward(x, pool.k, pool.isa)[0],
                    train_forward=lambda x, pool: kernels.max_pool_forward(x, pool.k, pool.isa),
                    backward=lambda first, g, pool, shape: kernels.max_pool_backward(first, g, pool.k, shape, pool.isa)),
    "taps": _xla_pool(_first_by_taps, lambda x, k: functools.reduce(jnp.maximum, _taps(x, k))),
    "argmax": _xla_pool(_first_by_argmax, lambda x, k: _first_by_argmax(x, k)[0]),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def pool2d(x: jax.Array, pool: PoolLayer, choice: tuple[str, str]) -> jax.Array:
    """The max-pool by the implementations named in ``choice``: for a forward pass alone (this
    body runs only when nothing differentiates it: evaluation) ``choice[0]``; under
    differentiation (:func:`_pool2d_fwd`) the forward-and-backward pair ``choice[1]``."""
    return POOLS[choice[0]].forward(x, pool)


def _pool2d_fwd(x, pool, choice):
    y, first = POOLS[choice[1]].train_forward(x, pool)
    return y, (first, x.shape)


def _pool2d_bwd(pool, choice, residuals, g):
    first, shape = residuals
    return (POOLS[choice[1]].backward(first, g, pool, shape),)


pool2d.defvjp(_pool2d_fwd, _pool2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def pool2d_taps_train(x: jax.Array, k: int) -> jax.Array:
    """The taps max-pool of an uncropped batch on every platform (GPU/TPU, sharded steps)."""
    return functools.reduce(jnp.maximum, _taps(x, k))


pool2d_taps_train.defvjp(lambda x, k: (lambda yf: (yf[0], (yf[1], x.shape)))(_first_by_taps(x, k)),
                         lambda k, res, g: (_scatter_to_first(res[0], g, k),))


def global_avg_pool(x: jax.Array) -> jax.Array:
    """``F.adaptive_avg_pool2d(x, 1).flatten(1)`` on an NHWC batch: (N, H, W, C) -> (N, C)."""
    return jnp.mean(x, axis=(1, 2))
