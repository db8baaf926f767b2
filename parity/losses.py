"""The losses parity checks differentiate, written once for each framework.

``cross_entropy`` on logits and ``nll`` on log-probabilities (the labs' two losses), both with
integer labels; ``mse`` against a target of the output's shape (a per-pixel output).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax
import torch

Loss = Literal["cross_entropy", "nll", "mse"]
LOSSES: tuple[str, ...] = ("cross_entropy", "nll", "mse")


def check_loss(loss: str) -> Loss:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    return loss  # type: ignore[return-value]


def torch_loss(loss: Loss, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PyTorch's mean loss of ``out`` against ``target`` (labels, or an array for ``mse``)."""
    if loss == "nll":
        return torch.nn.functional.nll_loss(out, target)
    if loss == "mse":
        return torch.nn.functional.mse_loss(out, target)
    return torch.nn.functional.cross_entropy(out, target)


def flax_loss(loss: Loss, out: jax.Array, target: jax.Array) -> jax.Array:
    """The same loss in JAX, equal to :func:`torch_loss` to rounding."""
    if loss == "nll":
        return -jnp.mean(jnp.take_along_axis(out, target[:, None], axis=1))
    if loss == "mse":
        return jnp.mean((out - target) ** 2)
    return optax.softmax_cross_entropy_with_integer_labels(out, target).mean()
