"""Functions with ``torch.nn.functional``'s semantics on flaxcnn's layouts.

Layout: a 4-D array is an NHWC activation (PyTorch's NCHW tensor, transposed once by the
model); an array of any other rank is in PyTorch's own layout (``(N, C)``, ``(N, C, L)``,
unbatched ``(C, H, W)``). Pools and ``interpolate`` work on the spatial axes of that layout.

Exactness: window and index arithmetic is done on static shapes with numpy, in the integer and
floating-point types PyTorch's CPU kernels use (index scales in float32 or float64 as the input,
rounded through ``floorf``), so every output element reads the same input elements as in
PyTorch. Max-pools send each window's gradient to the element PyTorch picks: the first maximum
in row-major window order, a NaN taking the place of any number (a later NaN replacing an
earlier one), never a padding position. ``lax.reduce_window``'s gradient (select-and-scatter
with ``>=``) also goes to the first maximum on CPU, but loses NaNs and can pick a padding
position in a window of ``-inf``, and gives no indices, so the pools here select explicitly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxcnn.errors import ConfigError, InputShapeError

IntPair = int | Sequence[int]


def pair(v: IntPair, name: str = "value") -> tuple[int, int]:
    """``torch.nn.modules.utils._pair``: an int for both spatial axes, or an (h, w) pair."""
    if isinstance(v, (int, np.integer)):
        return (int(v), int(v))
    if isinstance(v, Sequence) and len(v) == 2 and all(isinstance(e, (int, np.integer)) for e in v):
        return (int(v[0]), int(v[1]))
    raise ConfigError(f"{name} must be an int or a pair of ints (h, w), got {v!r}")


# --- activations whose gradient at a kink is PyTorch's -------------------------------------------
# Autodiff of jnp.clip/maximum splits a tie (gradient 0.5 at the kink) and of jnp.where can turn
# an overflowing unused branch into NaN; these carry PyTorch's backward formulas as their JVPs.


def _with_derivative(forward: Callable, derivative: Callable) -> Callable:
    """``forward(x, c)`` whose JVP is ``derivative(x, c) * t`` (``c``: a Python constant)."""

    @functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
    def f(x, c):
        return forward(x, c)

    @f.defjvp
    def f_jvp(c, primals, tangents):
        (x,), (t,) = primals, tangents
        return f(x, c), derivative(x, c) * t

    return f


# forward: min(max(x, 0), 6); backward (hardtanh_backward): 1 strictly inside (0, 6), else 0
_relu6 = _with_derivative(lambda x, _: jnp.minimum(jnp.maximum(x, 0), 6),
                          lambda x, _: jnp.where((x > 0) & (x < 6), 1, 0).astype(x.dtype))
# forward: x * min(max(x + 3, 0), 6) / 6; backward: 0 for x <= -3, x/3 + 1/2 for x < 3, else 1
_hardswish = _with_derivative(lambda x, _: x * jnp.minimum(jnp.maximum(x + 3, 0), 6) / 6,
                              lambda x, _: jnp.where(x <= -3, 0, jnp.where(x < 3, x / 3 + 0.5, 1)).astype(x.dtype))
# forward: min(max(x + 3, 0), 6) / 6; backward: 1/6 strictly inside (-3, 3), else 0
_hardsigmoid = _with_derivative(lambda x, _: jnp.minimum(jnp.maximum(x + 3, 0), 6) / 6,
                                # PyTorch's backward kernel holds 1/6 as a float (1.0f / 6.0f), in float64 too
                                lambda x, _: jnp.where((x > -3) & (x < 3), np.float32(1 / 6), 0).astype(x.dtype))
# forward: x > 0 ? x : x * slope; backward: x > 0 ? 1 : slope (slope at 0)
_leaky_relu = _with_derivative(lambda x, slope: jnp.where(x > 0, x, x * slope),
                               lambda x, slope: jnp.where(x > 0, 1, slope).astype(x.dtype))
# forward: x <= 0 ? alpha * expm1(x) : x; backward: x <= 0 ? alpha * exp(x) : 1 (alpha at 0);
# exp of min(x, 0) so that the unused branch never overflows
_elu = _with_derivative(lambda x, alpha: jnp.where(x <= 0, alpha * jnp.expm1(jnp.minimum(x, 0)), x),
                        lambda x, alpha: jnp.where(x <= 0, alpha * jnp.exp(jnp.minimum(x, 0)), 1).astype(x.dtype))


def relu6(x: jax.Array) -> jax.Array:
    return _relu6(x, None)


def hardswish(x: jax.Array) -> jax.Array:
    return _hardswish(x, None)


def hardsigmoid(x: jax.Array) -> jax.Array:
    return _hardsigmoid(x, None)


def leaky_relu(x: jax.Array, negative_slope: float = 0.01) -> jax.Array:
    return _leaky_relu(x, float(negative_slope))


def elu(x: jax.Array, alpha: float = 1.0) -> jax.Array:
    return _elu(x, float(alpha))


def gelu(x: jax.Array, approximate: str = "none") -> jax.Array:
    if approximate not in ("none", "tanh"):
        raise ConfigError(f"GELU approximate must be 'none' or 'tanh', got {approximate!r}")
    return jax.nn.gelu(x, approximate=approximate == "tanh")


def implicit_softmax_axis(ndim: int) -> int:
    """The physical axis PyTorch's ``dim=None`` softmax uses (``_get_softmax_dim``: 0 for 0-, 1-
    and 3-D tensors, else 1), on flaxcnn's layout: torch's channel axis 1 is axis 3 of NHWC."""
    if ndim in (0, 1, 3):
        return 0
    return 3 if ndim == 4 else 1


# --- pooling windows --------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisWindows:
    """A pool's windows along one spatial axis as static tables over (tap, output position).

    ``src[t, o]``: the input position tap ``t`` of output ``o`` reads; ``valid[t, o]``: whether it
    is inside the input and inside the window (padding is not; for adaptive pools, whose windows
    differ in length, neither are the taps past a window's end). Taps are in window order.
    """

    src: np.ndarray
    valid: np.ndarray
    size: int

    @property
    def taps(self) -> int:
        return int(self.src.shape[0])

    @property
    def out(self) -> int:
        return int(self.src.shape[1])

    def lengths(self) -> np.ndarray:
        """Valid positions in each window."""
        return self.valid.sum(axis=0)


def pool_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """PyTorch's ``pooling_output_shape``: floor (or ceil) division, and in ceil mode the last
    window dropped when it would start past the input and its left padding."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def strided_windows(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> AxisWindows:
    out = pool_output_size(size, kernel, stride, pad, dilation, ceil_mode)
    src = np.arange(out)[None, :] * stride - pad + np.arange(kernel)[:, None] * dilation
    return AxisWindows(src, (src >= 0) & (src < size), size)


def adaptive_windows(size: int, out: int) -> AxisWindows:
    """PyTorch's adaptive windows: output ``i`` covers ``[floor(i*size/out), ceil((i+1)*size/out))``."""
    o = np.arange(out)
    start, end = (o * size) // out, -((-(o + 1) * size) // out)
    src = start[None, :] + np.arange(int((end - start).max()))[:, None]
    return AxisWindows(src, src < end[None, :], size)


def _take(x: jax.Array, axis: int, positions: np.ndarray) -> jax.Array:
    """``x`` at static ``positions`` along ``axis``: a strided slice when they are evenly spaced
    (every ordinary pool), else a gather (adaptive pools with uneven windows)."""
    steps = np.diff(positions)
    step = int(steps[0]) if len(steps) else 1
    if step > 0 and np.all(steps == step):
        return lax.slice_in_dim(x, int(positions[0]), int(positions[-1]) + 1, step, axis)
    return jnp.take(x, jnp.asarray(positions), axis=axis)


def _taps(x: jax.Array, axis: int, win: AxisWindows) -> list[jax.Array]:
    """One array per tap, each ``x`` with ``axis`` replaced by the outputs; positions outside the
    input read zero padding (the pools never use them: see ``valid``)."""
    lo, hi = max(0, -int(win.src.min())), max(0, int(win.src.max()) - win.size + 1)
    if lo or hi:
        config = [(0, 0, 0)] * x.ndim
        config[axis] = (lo, hi, 0)
        x = lax.pad(x, jnp.zeros((), x.dtype), config)
    return [_take(x, axis, win.src[t] + lo) for t in range(win.taps)]


def _along(table: np.ndarray, axis: int, ndim: int) -> jax.Array:
    shape = [1] * ndim
    shape[axis] = -1
    return jnp.asarray(table.reshape(shape))


def _max_along(x: jax.Array, axis: int, win: AxisWindows, carry: jax.Array | None = None):
    """Max over each window along ``axis`` by PyTorch's rule; ``(y, tap index, carry selected)``.

    The index is found on values without gradient (PyTorch's scan: take a valid tap when none was
    taken yet, when it is greater, or when it is NaN), then ``y`` is that tap, selected with
    ``where`` so that the gradient reaches that element alone. ``carry``: an array of ``x``'s shape
    selected alongside (a first pass's positions, for the second axis of a 2-D pool).
    """
    taps = _taps(x, axis, win)
    held = [lax.stop_gradient(t) for t in taps]
    valid = [_along(win.valid[t], axis, x.ndim) for t in range(win.taps)]
    floating = jnp.issubdtype(x.dtype, jnp.floating)
    best, index = held[0], jnp.zeros(held[0].shape, jnp.int32)
    seen = jnp.broadcast_to(valid[0], best.shape)
    for t in range(1, win.taps):
        better = held[t] > best
        if floating:
            better = better | jnp.isnan(held[t])
        take = valid[t] & (~seen | better)
        best, index, seen = jnp.where(take, held[t], best), jnp.where(take, t, index), seen | valid[t]
    carried = _taps(carry, axis, win) if carry is not None else None
    y, c = taps[0], carried[0] if carried else None
    for t in range(1, win.taps):
        chosen = index == t
        y = jnp.where(chosen, taps[t], y)
        if carried:
            c = jnp.where(chosen, carried[t], c)
    return y, index, c


def window_sum(x: jax.Array, axis: int, win: AxisWindows) -> jax.Array:
    """Sum over each window along ``axis`` of its valid positions, in window order."""
    total = None
    for t, tap in enumerate(_taps(x, axis, win)):
        term = jnp.where(_along(win.valid[t], axis, x.ndim), tap, jnp.zeros((), x.dtype))
        total = term if total is None else total + term
    return total


def _positions(win: AxisWindows, index: jax.Array, axis: int) -> jax.Array:
    """The input position of the chosen tap of every output along ``axis``."""
    outputs = _along(np.arange(win.out), axis, index.ndim)
    return jnp.asarray(win.src.astype(np.int32))[index, outputs]


def max_pool_nhwc(x: jax.Array, win_h: AxisWindows, win_w: AxisWindows, return_indices: bool = False):
    """Max-pool of an NHWC batch over the given windows, separably: along W (first maximum of
    each row of a window), then along H (first row holding the maximum), which picks the first
    maximum in row-major order. Indices (``return_indices``) are PyTorch's: ``h * W + w`` into
    each input plane, int32, in NHWC order ``(N, Ho, Wo, C)``."""
    rows, index_w, _ = _max_along(x, 2, win_w)
    cols = _positions(win_w, index_w, 2) if return_indices else None
    y, index_h, cols = _max_along(rows, 1, win_h, carry=cols)
    if not return_indices:
        return y
    return y, _positions(win_h, index_h, 1) * win_w.size + cols


def avg_pool_nhwc(x: jax.Array, win_h: AxisWindows, win_w: AxisWindows, divisor: np.ndarray | int) -> jax.Array:
    """Average-pool of an NHWC batch: window sums (W before H) over ``divisor`` ((Ho, Wo) or a number)."""
    total = window_sum(window_sum(x, 2, win_w), 1, win_h)
    if isinstance(divisor, np.ndarray):
        divisor = jnp.asarray(np.maximum(divisor, 1)[None, :, :, None], x.dtype)  # an empty window sums to 0
    return total / divisor


def avg_divisor(win: AxisWindows, kernel: int, stride: int, pad: int, count_include_pad: bool) -> np.ndarray:
    """Per output position along one axis, PyTorch's averaging length: the window cut at the
    padded input's end (``count_include_pad``), or its positions inside the input."""
    if not count_include_pad:
        return win.lengths()
    start = np.arange(win.out) * stride - pad
    return np.minimum(start + kernel, win.size + pad) - start


def on_spatial(fn: Callable, x: jax.Array, name: str):
    """``fn`` on an NHWC batch; a 3-D input is PyTorch's unbatched ``(C, H, W)`` and is returned
    as such (every array ``fn`` returns)."""
    if x.ndim == 4:
        return fn(x)
    if x.ndim == 3:
        out = fn(jnp.transpose(x, (1, 2, 0))[None])
        unbatch = lambda a: jnp.transpose(a[0], (2, 0, 1))  # noqa: E731
        return tuple(map(unbatch, out)) if isinstance(out, tuple) else unbatch(out)
    raise InputShapeError(f"{name} takes a 4-D (N, H, W, C) batch or an unbatched 3-D (C, H, W) array, "
                          f"got shape {tuple(x.shape)}")


def check_output_size(name: str, x_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    if min(out_hw) < 1:
        raise InputShapeError(f"{name}: input of size {x_hw[0]}x{x_hw[1]} gives an output of size "
                              f"{out_hw[0]}x{out_hw[1]}, too small (the window is larger than the padded input)")


def adaptive_output_size(output_size, hw: tuple[int, int]) -> tuple[int, int]:
    """``output_size`` (an int, or a pair whose None entries keep the input's size) as (h, w)."""
    if isinstance(output_size, (int, np.integer)):
        output_size = (output_size, output_size)
    if not (isinstance(output_size, Sequence) and len(output_size) == 2
            and all(o is None or (isinstance(o, (int, np.integer)) and o > 0) for o in output_size)):
        raise ConfigError(f"output_size must be a positive int or a pair of positive ints or None, got {output_size!r}")
    return tuple(int(size if o is None else o) for o, size in zip(output_size, hw))  # type: ignore[return-value]


def adaptive_avg_pool(x: jax.Array, axes: Sequence[int], out_sizes: Sequence[int]) -> jax.Array:
    """``adaptive_avg_pool{1,2}d`` over ``axes``: windows that tile the axis evenly by a reshape
    and a mean, uneven ones by window sums (W before H) over PyTorch's window lengths."""
    sizes = [x.shape[a] for a in axes]
    if all(s % o == 0 for s, o in zip(sizes, out_sizes)):
        shape, window_axes = list(x.shape), []
        for a, o in sorted(zip(axes, out_sizes), reverse=True):  # split from the last axis on
            shape[a:a + 1] = [o, shape[a] // o]
        offset = 0
        for a in sorted(axes):
            window_axes.append(a + offset + 1)
            offset += 1
        return jnp.mean(x.reshape(shape), axis=tuple(window_axes))
    divisor = np.ones([1] * x.ndim)
    for a, s, o in sorted(zip(axes, sizes, out_sizes), reverse=True):
        win = adaptive_windows(s, o)
        x = window_sum(x, a, win)
        divisor = divisor * win.lengths().reshape([-1 if i == a else 1 for i in range(x.ndim)])
    return x / jnp.asarray(divisor, x.dtype)


# --- interpolation ----------------------------------------------------------------------------

RESIZE_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "area")


def _opmath(dtype) -> type:
    """The type PyTorch's CPU upsampling kernels compute scales and source indices in."""
    return np.float64 if jnp.dtype(dtype) == jnp.float64 else np.float32


def _index_scale(in_size: int, out_size: int, align_corners: bool, scale: float | None, op: type):
    """``area_pixel_compute_scale``: input pixels per output pixel."""
    if align_corners:
        return op(in_size - 1) / op(out_size - 1) if out_size > 1 else op(0)
    if scale is not None and scale > 0:
        return op(1.0 / scale)
    return op(in_size) / op(out_size)


def _floorf(v: np.ndarray) -> np.ndarray:
    """C's ``floorf`` as PyTorch calls it on a float or double: through float32."""
    return np.floor(v.astype(np.float32)).astype(np.int64)


def _nearest_source(in_size, out_size, scale, op, exact: bool) -> np.ndarray:
    if in_size == out_size and not exact:  # ATen's nearest_idx: an unchanged size is the identity,
        return np.arange(out_size)          # whatever the scale factor (11 * 1.1 -> 12 but 7 * 1.1 -> 7)
    s = _index_scale(in_size, out_size, False, scale, op)
    o = np.arange(out_size).astype(op)
    if exact:  # area_pixel_compute_source_index(align_corners=False), then round half up
        real = np.maximum(s * (o + op(0.5)) - op(0.5), op(0))
        index = _floorf(real + op(0.5))
    else:
        index = _floorf(s * o)
    return np.minimum(index, in_size - 1)


def _linear_source(in_size, out_size, scale, op, align_corners: bool):
    """``compute_source_index_and_lambda``: the two input positions and their weights."""
    if in_size == out_size:
        i = np.arange(out_size)
        return i, i, np.ones(out_size, op), np.zeros(out_size, op)
    s = _index_scale(in_size, out_size, align_corners, scale, op)
    o = np.arange(out_size).astype(op)
    real = s * o if align_corners else np.maximum(s * (o + op(0.5)) - op(0.5), op(0))
    i0 = np.minimum(_floorf(real), in_size - 1)
    lambda1 = np.clip(real - i0.astype(op), op(0), op(1)).astype(op)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, (op(1) - lambda1).astype(op), lambda1


def _resize_axis(x, axis, out_size, mode, scale, align_corners):
    in_size, op = x.shape[axis], _opmath(x.dtype)
    if mode in ("nearest", "nearest-exact"):
        return jnp.take(x, jnp.asarray(_nearest_source(in_size, out_size, scale, op, mode == "nearest-exact")),
                        axis=axis)
    i0, i1, l0, l1 = _linear_source(in_size, out_size, scale, op, align_corners)
    w0, w1 = (_along(w, axis, x.ndim).astype(x.dtype) for w in (l0, l1))
    return jnp.take(x, jnp.asarray(i0), axis=axis) * w0 + jnp.take(x, jnp.asarray(i1), axis=axis) * w1


def _per_axis(value, dim: int, what: str) -> list:
    if isinstance(value, Sequence):
        if len(value) != dim:
            raise ConfigError(f"interpolate: {what} {tuple(value)} has {len(value)} entries for an input "
                              f"with {dim} spatial dimension(s)")
        return list(value)
    return [value] * dim


def interpolate(x: jax.Array, size: int | Sequence[int] | None = None,
                scale_factor: float | Sequence[float] | None = None, mode: str = "nearest",
                align_corners: bool | None = None, recompute_scale_factor: bool | None = None,
                antialias: bool = False) -> jax.Array:
    """``F.interpolate`` on a 4-D NHWC batch (H, W resized) or a 3-D ``(N, C, L)`` batch in
    PyTorch's layout (L resized).

    Modes: ``nearest`` (source ``floor(dst * scale)``, PyTorch's legacy nearest), ``nearest-exact``
    (``floor((dst + 0.5) * scale)``), ``linear`` (3-D), ``bilinear`` (4-D; ``align_corners``
    False by default, as in PyTorch; W interpolated before H, PyTorch's order), ``area``
    (adaptive average pooling). ``scale`` is ``1 / scale_factor`` when a scale factor is given and
    not recomputed, else ``in / out``; the output size is ``floor(in * scale_factor)``.
    """
    spatial = {4: (1, 2), 3: (2,)}.get(x.ndim)
    if spatial is None:
        raise InputShapeError(f"interpolate takes a 4-D (N, H, W, C) or 3-D (N, C, L) array, got shape {tuple(x.shape)}")
    if mode not in RESIZE_MODES:
        raise ConfigError(f"interpolate mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    dim = len(spatial)
    if (mode, dim) in (("bilinear", 1), ("linear", 2)):
        need = "4-D" if mode == "bilinear" else "3-D"
        raise InputShapeError(f"interpolate: mode {mode!r} needs a {need} input, got shape {tuple(x.shape)}")
    if antialias:
        raise ConfigError("interpolate: antialias=True is not supported")
    if mode in ("nearest", "nearest-exact", "area"):
        if align_corners is not None:
            raise ConfigError("align_corners option can only be set with the interpolating modes: linear | bilinear")
    elif align_corners is None:
        align_corners = False
    in_sizes = [x.shape[a] for a in spatial]
    if (size is None) == (scale_factor is None):
        raise ConfigError("interpolate: give exactly one of size or scale_factor")
    if size is not None:
        if recompute_scale_factor:
            raise ConfigError("recompute_scale_factor is not meaningful with an explicit size.")
        out_sizes, scales = [int(s) for s in _per_axis(size, dim, "size")], [None] * dim
    else:
        scales = [float(s) for s in _per_axis(scale_factor, dim, "scale_factor")]
        out_sizes = [int(n * s) for n, s in zip(in_sizes, scales)]  # C++: static_cast<int64_t>(double)
        if recompute_scale_factor or mode == "area":
            scales = [None] * dim
    if min(out_sizes) < 1:
        raise InputShapeError(f"interpolate: output size {tuple(out_sizes)} from input size {tuple(in_sizes)} "
                              "must be at least 1")
    if mode == "area":
        return adaptive_avg_pool(x, spatial, out_sizes)
    for axis, out_size, scale in sorted(zip(spatial, out_sizes, scales), reverse=True):  # W before H
        x = _resize_axis(x, axis, out_size, mode, scale, align_corners)
    return x
