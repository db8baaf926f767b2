"""The array operations the models are built from, in the formulation that runs fastest.

Each function computes exactly the mathematical operation its name says (the parity suite
checks every model against PyTorch on the path that uses these), but *how* it is expressed is
chosen for XLA's CPU and GPU backends; see the notes on each.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

#: drop-in for ``lax.conv_general_dilated`` handed to ``nnx.Conv``.
conv_general_dilated = lax.conv_general_dilated


def max_pool(x: jax.Array, k: int) -> jax.Array:
    """``F.max_pool2d(x, k)`` (stride k, floor mode) on an NHWC batch.

    Forward: the elementwise maximum of the k*k strided sub-grids ("taps") of the cropped input.
    Backward (:func:`_pool_taps_bwd`): each window's gradient goes to the *first* tap, in
    row-major window order, that equals the maximum -- PyTorch's rule on ties; plain autodiff of
    a max would split it between tied elements. Why a custom VJP: XLA's CPU backend lowers the
    gradient of ``reduce_window`` to select-and-scatter and that of reshape+max to a slow
    reduction; elementwise masks on strided views were measured 2-3x faster for the pool
    gradient (the largest avoidable cost of the lab networks' training step on CPU).
    """
    n, h, w, c = x.shape
    ho, wo = h // k, w // k
    if (ho * k, wo * k) != (h, w):
        x = x[:, : ho * k, : wo * k, :]
    return _pool_taps(x, k)


def _taps(x: jax.Array, k: int) -> list[jax.Array]:
    """The k*k strided sub-grids of x in row-major window order, each (N, H/k, W/k, C)."""
    return [x[:, i::k, j::k, :] for i in range(k) for j in range(k)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pool_taps(x: jax.Array, k: int) -> jax.Array:
    return functools.reduce(jnp.maximum, _taps(x, k))


def _pool_taps_fwd(x: jax.Array, k: int):
    y = _pool_taps(x, k)
    return y, (x, y)


def _pool_taps_bwd(k: int, residuals, g: jax.Array):
    x, y = residuals
    n, h, w, c = x.shape
    taken = jnp.zeros(y.shape, bool)
    parts = []
    for tap in _taps(x, k):
        first = (tap == y) & ~taken
        taken = taken | first
        parts.append(jnp.where(first, g, 0.0))
    dx = jnp.stack(parts, axis=3).reshape(n, h // k, w // k, k, k, c)
    return (dx.transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, c),)


_pool_taps.defvjp(_pool_taps_fwd, _pool_taps_bwd)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """``F.adaptive_avg_pool2d(x, 1).flatten(1)`` on an NHWC batch: (N, H, W, C) -> (N, C)."""
    return jnp.mean(x, axis=(1, 2))
