"""The array operations the models are built from, in the formulation that runs fastest.

Each function computes exactly the mathematical operation its name says (the parity suite
checks every model against PyTorch on the path that uses these), but *how* it is expressed is
chosen for XLA's CPU and GPU backends; see the notes on each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

#: drop-in for ``lax.conv_general_dilated`` handed to ``nnx.Conv``.
conv_general_dilated = lax.conv_general_dilated


def max_pool(x: jax.Array, k: int) -> jax.Array:
    """``F.max_pool2d(x, k)`` (stride k, floor mode) on an NHWC batch.

    Written as crop + reshape + max instead of ``lax.reduce_window``: the same values, but the
    gradient is a cheap compare-and-select instead of XLA's select-and-scatter.
    """
    n, h, w, c = x.shape
    ho, wo = h // k, w // k
    x = x[:, : ho * k, : wo * k, :]
    return jnp.max(x.reshape(n, ho, k, wo, k, c), axis=(2, 4))


def global_avg_pool(x: jax.Array) -> jax.Array:
    """``F.adaptive_avg_pool2d(x, 1).flatten(1)`` on an NHWC batch: (N, H, W, C) -> (N, C)."""
    return jnp.mean(x, axis=(1, 2))
