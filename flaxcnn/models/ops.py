"""The array operations the models are built from, in the formulation that runs fastest.

Each function computes exactly the mathematical operation its name says (the parity suite
checks every model against PyTorch on the path that uses these), but *how* it is expressed is
chosen for XLA's CPU and GPU backends; see the notes on each.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxcnn import kernels

#: the layout every flaxcnn convolution uses (see :mod:`flaxcnn.models.layers`)
NHWC_HWIO = ("NHWC", "HWIO", "NHWC")
#: CPU convolutions split their batch into this many slices (None: one per available core) ...
CONV_BATCH_SPLITS: int | None = None
#: ... of at least this many samples each, when the convolution's forward pass over the whole
#: batch costs at least this many FLOPs (see :func:`split_batch`). Measured on the lab networks at
#: batch 64 on 2 cores: splitting NetDropout's/NetDepth's 32->32 layers (302 MFLOP) and ConvNet's
#: first layer (196) gave +15-35% per step; splitting the small layers of Net and SpeechNet
#: (<= 100 MFLOP) cost 4-9%. Only 2 cores were measured; the 16-sample floor keeps each slice's
#: convolution from becoming tiny on machines with many cores.
CONV_MIN_SLICE, CONV_SPLIT_MIN_FLOPS = 16, 150e6
#: convolutions with at most this many input channels run as banded matmuls on CPU
BANDED_MAX_IN_CHANNELS = 4
#: on CPU, convolutions with at least these input and output channels and output positions take
#: their kernel gradient from :func:`kernel_grad_by_rows` (NetWidth's 32->64 layer on 16x16; in
#: the training step it made the 32->32 layers of NetDepth/NetDropout slower, so they stay on XLA)
ROW_GRAD_MIN_IN_CHANNELS, ROW_GRAD_MIN_OUT_CHANNELS, ROW_GRAD_MIN_POSITIONS = 32, 64, 256


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         precision=None, **kwargs) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` (what ``nnx.Conv`` calls).

    On the CPU backend, a plain float32 convolution (stride 1, no dilation, one group, explicit
    padding, NHWC/HWIO) runs on flaxcnn's C++ kernels (:func:`flaxcnn.kernels.conv2d`) when its
    output channel count has one: measured on the lab layers at batch 64, up to 8x faster than
    XLA's convolutions per operation (about even on SpeechNet's small late layers), and the
    training step of Net about 2.1x, NetWidth 2.8x, ConvNet 1.6x. Without them (no C++ compiler,
    ``FLAXCNN_FFI_CONV=0``, other channel counts), the XLA formulations below take over: with few input channels --
    the first layer of every lab network -- :func:`banded_conv`, with many input channels on a
    large map :func:`conv_with_row_kernel_grad`; a large one is cut into batch slices that run
    on all cores (:func:`split_batch`). Everything else goes to XLA's convolution unchanged.
    """
    if (jax.default_backend() == "cpu" and lhs.ndim == 4 and feature_group_count == 1
            and not isinstance(padding, str) and tuple(window_strides) == (1, 1)
            and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC_HWIO)):
        pads = tuple(tuple(int(v) for v in p) for p in padding)
        if kernels.supports(lhs, rhs):
            return kernels.conv2d(lhs, rhs, pads)
        out_positions = ((lhs.shape[1] + sum(pads[0]) - rhs.shape[0] + 1)
                         * (lhs.shape[2] + sum(pads[1]) - rhs.shape[1] + 1))
        if rhs.shape[2] <= BANDED_MAX_IN_CHANNELS:
            def conv(x): return banded_conv(x, rhs, pads, precision)
        elif (rhs.shape[2] >= ROW_GRAD_MIN_IN_CHANNELS and rhs.shape[3] >= ROW_GRAD_MIN_OUT_CHANNELS
              and out_positions >= ROW_GRAD_MIN_POSITIONS):
            def conv(x): return conv_with_row_kernel_grad(x, rhs, pads, precision)
        else:
            def conv(x): return _xla_conv(x, rhs, pads, precision)
        flops = 2 * lhs.shape[0] * out_positions * rhs.shape[0] * rhs.shape[1] * rhs.shape[2] * rhs.shape[3]
        if flops >= CONV_SPLIT_MIN_FLOPS:
            return split_batch(conv, lhs, conv_batch_splits())
        return conv(lhs)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision, **kwargs)


def conv_batch_splits() -> int:
    """Into how many batch slices a CPU convolution is cut: :data:`CONV_BATCH_SPLITS`, or the
    number of cores this process may run on."""
    if CONV_BATCH_SPLITS is not None:
        return CONV_BATCH_SPLITS
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def split_batch(conv: Callable[[jax.Array], jax.Array], x: jax.Array, parts: int) -> jax.Array:
    """``conv(x)`` computed as ``parts`` independent convolutions of batch slices, concatenated.

    Why: XLA's CPU convolutions (YNNPACK kernels) and small matmuls run on one thread each, so
    a training step of these networks kept the second core of a 2-core machine mostly idle.
    Independent slices are independent operations, which XLA's CPU runtime executes
    concurrently (forward, input gradient and the per-slice kernel gradients, which autodiff
    then sums). Each output row is computed exactly as before; only the kernel gradient's sum
    over the batch is split into ``parts`` partial sums.
    """
    n = x.shape[0]
    parts = min(parts, n // CONV_MIN_SLICE)
    if parts <= 1:
        return conv(x)
    bounds = np.linspace(0, n, parts + 1).astype(int)
    return jnp.concatenate([conv(x[a:b]) for a, b in zip(bounds[:-1], bounds[1:])], axis=0)


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
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
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


def _xla_conv(x: jax.Array, w: jax.Array, padding, precision=None) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC_HWIO, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_with_row_kernel_grad(x: jax.Array, w: jax.Array, padding, precision=None) -> jax.Array:
    """XLA's stride-1 convolution (forward and input gradient) with the kernel gradient from
    :func:`kernel_grad_by_rows`.

    Why: XLA's CPU kernel gradient for NetWidth's 32->64 layer on 16x16 maps takes about
    20 ms per batch of 64, 4-5x its forward pass of the same FLOPs; as ``kh`` matmuls it takes
    7-8 ms (NetWidth's training step +18%).
    """
    return _xla_conv(x, w, padding, precision)


def _row_grad_fwd(x, w, padding, precision):
    return _xla_conv(x, w, padding, precision), (x, w)


def _row_grad_bwd(padding, precision, residuals, g):
    x, w = residuals
    grad_x = jax.vjp(lambda a: _xla_conv(a, w, padding, precision), x)[1](g)[0]
    return grad_x, kernel_grad_by_rows(x, g, w.shape, padding, precision)


conv_with_row_kernel_grad.defvjp(_row_grad_fwd, _row_grad_bwd)


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


#: windows up to this size find their first maximum by a chain of comparisons over the taps,
#: larger ones by an argmax over the window. XLA's CPU fusion recomputes the chain inside every
#: consumer, which is cheap for 2x2 (Net: +15% step over the argmax) and 16x the work for
#: ConvNet's 4x4 (there the argmax is 2.2x faster).
TAPS_ARGMAX_MAX_WINDOW = 4


def max_pool(x: jax.Array, k: int) -> jax.Array:
    """``F.max_pool2d(x, k)`` (stride k, floor mode) on an NHWC batch.

    Forward: the elementwise maximum of the k*k strided sub-grids ("taps") of the cropped input.
    Backward (:func:`_pool_taps_bwd`): each window's gradient goes to the *first* tap, in
    row-major window order, that equals the maximum -- PyTorch's rule on ties; plain autodiff of
    a max would split it between tied elements. Why a custom VJP: XLA's CPU backend lowers the
    gradient of ``reduce_window`` to select-and-scatter and that of reshape+max to a slow
    reduction; saving the first maximum's index in the forward pass and scattering by one
    elementwise comparison was measured 2-3x faster for the pool gradient (the largest
    avoidable cost of the lab networks' training step on CPU). On CPU with flaxcnn's C++ kernels,
    windows larger than 2x2 and windows that crop the input run as two C++ loops
    (:func:`flaxcnn.kernels.max_pool`), measured at batch 64: ConvNet's 4x4 pool (XLA transposed
    the whole activation into windows) +7%, SpeechNet's cropped 2x2 pools +21%; for the uncropped
    2x2 pools of the CIFAR nets XLA's taps, fused with their producers, stay faster (Net -6%,
    NetBatchNorm -9% with the C++ pool).
    """
    n, h, w, c = x.shape
    ho, wo = h // k, w // k
    cropped = (ho * k, wo * k) != (h, w)
    if (k * k > TAPS_ARGMAX_MAX_WINDOW or cropped) and kernels.supports_pool(x):
        return kernels.max_pool(x, k)
    if cropped:
        x = x[:, : ho * k, : wo * k, :]
    return _pool_taps(x, k)


def _taps(x: jax.Array, k: int) -> list[jax.Array]:
    """The k*k strided sub-grids of x in row-major window order, each (N, H/k, W/k, C)."""
    return [x[:, i::k, j::k, :] for i in range(k) for j in range(k)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pool_taps(x: jax.Array, k: int) -> jax.Array:
    return functools.reduce(jnp.maximum, _taps(x, k))


def _pool_taps_fwd(x: jax.Array, k: int):
    """The pooled values and, as the residual, the row-major index of each window's first
    maximum (PyTorch's choice on ties)."""
    n, h, w, c = x.shape
    if k * k <= TAPS_ARGMAX_MAX_WINDOW:
        taps = _taps(x, k)
        y = functools.reduce(jnp.maximum, taps)
        first = jnp.full(y.shape, k * k, jnp.int32)
        for t in reversed(range(k * k)):
            first = jnp.where(taps[t] == y, t, first)
    else:
        windows = x.reshape(n, h // k, k, w // k, k, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, h // k, w // k, c, k * k)
        y, first = jnp.max(windows, axis=-1), jnp.argmax(windows, axis=-1).astype(jnp.int32)
    return y, (first, x.shape)


def _pool_taps_bwd(k: int, residuals, g: jax.Array):
    """One elementwise pass in the input's shape, seen as (N, H/k, k, W/k, k, C): an element
    gets its window's gradient when its position in the window is the saved first maximum."""
    first, (n, h, w, c) = residuals
    position = (lax.broadcasted_iota(jnp.int32, (1, 1, k, 1, k, 1), 2) * k
                + lax.broadcasted_iota(jnp.int32, (1, 1, k, 1, k, 1), 4))
    dx = jnp.where(position == first[:, :, None, :, None, :], g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    return (dx.reshape(n, h, w, c),)


_pool_taps.defvjp(_pool_taps_fwd, _pool_taps_bwd)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """``F.adaptive_avg_pool2d(x, 1).flatten(1)`` on an NHWC batch: (N, H, W, C) -> (N, C)."""
    return jnp.mean(x, axis=(1, 2))
