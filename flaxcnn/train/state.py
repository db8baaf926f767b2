"""The pure training state: what ``jax.jit`` sees instead of an NNX module.

Following Flax's performance guidance, the model is split once into a static graph definition
and pure state (``params``: every ``nnx.Param``; ``rest``: BatchNorm statistics and the dropout
RNG streams), and jitted functions ``nnx.merge`` inside. A module is rebuilt with
:func:`to_model` only when a user needs one (export, evaluation from Python).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

@struct.dataclass
class Sums:
    """What the jitted steps add up, read once per epoch (or per evaluated split); each field
    float32 (one value per stacked model when K models train at once)."""

    objective: jax.Array  # sum of the batches' objectives: data loss + L2 penalty (the lab's printed loss)
    loss: jax.Array  # sum of per-example losses
    correct: jax.Array  # examples classified correctly
    count: jax.Array  # examples

    @classmethod
    def zeros(cls) -> "Sums":
        return cls(*(jnp.zeros((), jnp.float32) for _ in range(4)))

    def __add__(self, other: "Sums") -> "Sums":
        return jax.tree.map(jnp.add, self, other)

    def reset(self) -> "Sums":
        return jax.tree.map(jnp.zeros_like, self)

    def to_host(self) -> dict[str, np.ndarray]:
        """The sums as NumPy values by name (blocks until they are computed)."""
        return {name: np.asarray(value) for name, value in vars(self).items()}


@struct.dataclass
class TrainState:
    params: Any
    rest: Any
    opt_state: Any
    step: jax.Array
    metrics: Sums  # reset at each epoch
    #: ``jax.random.key(seed)``: the augmentation stream draws ``fold_in(augment_key, step)``. A
    #: field of the state, not of the step, so that K stacked models each keep their own seed's.
    augment_key: jax.Array | None = None


@dataclass(frozen=True)
class Graphs:
    """Static graph definitions of the same model in training and evaluation mode."""

    train: Any
    eval: Any


def split_model(model: nnx.Module) -> tuple[Graphs, Any, Any]:
    model.eval()
    eval_graph, _, _ = nnx.split(model, nnx.Param, ...)
    model.train()
    train_graph, params, rest = nnx.split(model, nnx.Param, ...)
    return Graphs(train_graph, eval_graph), params, rest


def create_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int = 0) -> tuple[Graphs, TrainState]:
    graphs, params, rest = split_model(model)
    state = TrainState(
        params=params, rest=rest, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
        metrics=Sums.zeros(), augment_key=jax.random.key(seed),
    )
    return graphs, state


def stack(states: Sequence[TrainState]) -> TrainState:
    """K states of the same layout as one, every leaf stacked along a new leading axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def unstack(stacked: TrainState, k: int) -> TrainState:
    """Member ``k`` of a :func:`stack`-ed state."""
    return jax.tree.map(lambda leaf: leaf[k], stacked)


def to_model(graphs: Graphs, state: TrainState, *, train: bool = False) -> nnx.Module:
    """A standalone NNX module holding a copy of the state (evaluation mode unless ``train``)."""
    params, rest = jax.tree.map(lambda a: a, (state.params, state.rest))
    return nnx.merge(graphs.train if train else graphs.eval, params, rest)
