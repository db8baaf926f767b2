"""Train a PyTorch model and its Flax port side by side, step by step, on the same batches.

Plain SGD on both sides (``torch.optim.SGD`` and ``p - lr * g`` on every ``nnx.Param``), the
same loss, dropout masks drawn by PyTorch and replayed in Flax (:func:`parity.dropout.replay_flax_masks`),
BatchNorm in training mode. After each step: both losses and the largest difference between
any parameter or buffer, compared in PyTorch's layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from flaxcnn import convert
from parity.dropout import record_torch_masks, replay_flax_masks


@dataclass(frozen=True)
class Step:
    step: int
    torch_loss: float
    flax_loss: float
    max_abs_diff: float  # over every parameter and buffer after the step


def train_side_by_side(torch_model: torch.nn.Module, flax_model: nnx.Module,
                       batches: Iterable[tuple[np.ndarray, np.ndarray]], *, lr: float = 0.05) -> list[Step]:
    """Train both models in place (cross entropy, SGD at ``lr``), one row per batch."""
    optimizer = torch.optim.SGD(torch_model.parameters(), lr=lr)
    torch_model.train()
    flax_model.train()
    rows = []

    def loss_fn(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    for i, (x, y) in enumerate(batches, start=1):
        optimizer.zero_grad()
        with record_torch_masks(torch_model) as masks:
            loss_t = torch.nn.functional.cross_entropy(torch_model(torch.from_numpy(x)), torch.from_numpy(y).long())
        loss_t.backward()
        optimizer.step()
        with replay_flax_masks(flax_model, masks):
            loss_f, grads = nnx.value_and_grad(loss_fn)(flax_model, jnp.asarray(x), jnp.asarray(y, jnp.int32))
        params = nnx.state(flax_model, nnx.Param)
        nnx.update(flax_model, jax.tree.map(lambda p, g: p - lr * g, params, grads))
        ours = convert.to_numpy_state_dict(flax_model)
        diff = max(float(np.max(np.abs(ours[k].astype(np.float64) - v.numpy().astype(np.float64))))
                   for k, v in torch_model.state_dict().items())
        rows.append(Step(i, loss_t.item(), float(loss_f), diff))
    return rows
