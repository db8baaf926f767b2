"""The training pass every parity check compares against, recorded once and replayed once.

Both :func:`parity.checks.check_model` and :func:`parity.layers.compare_layers` need the same
three steps, and get them from here:

1. :func:`torch_train_pass`: PyTorch's train-mode forward and backward on a copy of the
   reference, its dropout masks drawn again exactly (:func:`parity.dropout.record_torch_masks`)
   and its ReLU inputs recorded (:func:`parity.relu_decisions.record_torch_relu_inputs`);
2. :func:`flax_replay`: the Flax side's block, the recorded masks replayed into flaxcnn's
   dropout layers and its ReLU inputs recorded through the layers' ``tap`` seam;
3. :func:`rerun_with_flax_decisions`: where the two sides decided a ReLU differently within
   tolerance of zero, PyTorch's pass again from the same random state (the same masks, drawn
   bit for bit) with flaxcnn's decisions there (:mod:`parity.relu_decisions`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from flax import nnx

from parity.dropout import record_torch_masks, replay_flax_masks
from parity.losses import Loss, torch_loss
from parity.relu_decisions import (
    DecisionReplay,
    decisions_to_replay,
    record_flax_relu_inputs,
    record_torch_relu_inputs,
    replay_torch_relu_decisions,
)

Recorder = Callable[[torch.nn.Module], AbstractContextManager]


@dataclass
class TorchPass:
    """One PyTorch training pass: the model copy that ran it (its ``.grad`` and buffers are the
    pass's), its output, the dropout masks it drew (Flax layout) and its ReLU inputs."""

    model: torch.nn.Module
    output: np.ndarray
    masks: dict[str, list[np.ndarray]]
    relu_inputs: list[np.ndarray]
    rng_state: torch.Tensor


def torch_train_pass(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, loss: Loss, *,
                     rng_state: torch.Tensor | None = None, decisions: DecisionReplay | None = None,
                     record: Recorder | None = None) -> TorchPass:
    """Forward and backward of ``loss`` on a train-mode copy of ``model`` (``model`` is not changed).

    ``rng_state``: PyTorch's random state to start from (default: the current one), so a second
    pass draws the same masks; ``decisions``: ReLU decisions to take instead of recording the
    inputs; ``record``: extra hooks for the pass, ``record(model_copy)`` entered around the forward.
    """
    model = copy.deepcopy(model)
    model.train()
    model.zero_grad()
    if rng_state is None:
        rng_state = torch.get_rng_state()
    else:
        torch.set_rng_state(rng_state)
    relus = record_torch_relu_inputs() if decisions is None else replay_torch_relu_decisions(decisions)
    hooks = record(model) if record is not None else nullcontext()
    with hooks, record_torch_masks(model) as masks, relus as relu_inputs:
        out = model(x)
    torch_loss(loss, out, target).backward()
    return TorchPass(model, out.detach().numpy(), dict(masks), relu_inputs or [], rng_state)


@contextmanager
def flax_replay(model: nnx.Module, masks: Mapping[str, list[np.ndarray]],
                rename: Mapping[str, str] | None = None) -> Iterator[list[np.ndarray]]:
    """For the block: ``model``'s dropout layers replay ``masks``; yields its ReLU inputs, recorded."""
    with replay_flax_masks(model, masks, rename), record_flax_relu_inputs(model) as relu_inputs:
        yield relu_inputs


def rerun_with_flax_decisions(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, loss: Loss,
                              first: TorchPass, flax_relu_inputs: list[np.ndarray], *, atol: float,
                              rtol: float, record: Recorder | None = None) -> tuple[DecisionReplay, TorchPass]:
    """The decisions to replay, and the pass to compare gradients and buffers against: ``first``
    when no ReLU was decided differently by rounding, else PyTorch's pass again with flaxcnn's
    decisions at those elements."""
    decisions = decisions_to_replay(first.relu_inputs, flax_relu_inputs, atol=atol, rtol=rtol)
    if not decisions.tolerated:
        return decisions, first
    return decisions, torch_train_pass(model, x, target, loss, rng_state=first.rng_state,
                                       decisions=decisions, record=record)
