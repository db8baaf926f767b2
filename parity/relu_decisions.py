"""ReLU decisions made by rounding: recorded on both sides, replayed into PyTorch where they differ.

A ReLU whose input lies within float32 rounding of zero passes or blocks its gradient on the
last bits of the forward pass. Two correct float32 forwards (PyTorch's and flaxcnn's, or two
kernel variants) can decide it differently, and every gradient upstream then moves by that
element's whole contribution, which can be far above the gradient tolerance
(:mod:`parity.kinks` measures it). Dropout has the same problem with random streams, solved by
replaying PyTorch's masks (:mod:`parity.dropout`); ReLU decisions are replayed the same way,
in the other direction:

1. record every ReLU input of both train-mode forwards, in call order (PyTorch: a
   ``TorchFunctionMode`` sees ``F.relu``, ``torch.relu`` and ``nn.ReLU``; Flax: each
   :class:`flaxcnn.models.nn.ReLU` layer's ``tap`` seam reports its concrete input through
   ``jax.debug.callback``, also under ``nnx.value_and_grad``);
2. pair the calls (same count, same shapes after NHWC -> NCHW) and find the elements the two
   decided differently. A disagreement is *tolerated* only where both inputs are within the
   layer-level forward tolerance of zero, ``atol + rtol * max|PyTorch input|`` (the tolerance
   of :mod:`parity.layers`: ``parity.checks.FORWARD_TOL`` and ``RTOL``), i.e. where the two
   forwards agree to tolerance and only the sign differs. A disagreement anywhere else is a
   real difference and is never replayed;
3. rerun PyTorch with flaxcnn's decision at the tolerated elements (and its own elsewhere), with
   the dropout masks of the recorded run. The gradient check compares against that run.

The replay changes PyTorch's forward by less than the tolerance at those elements (a value
within tolerance of zero passed instead of 0, or 0 instead of it); the forward checks are made
on the unreplayed run.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import jax
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch.overrides import TorchFunctionMode

from flaxcnn.models.nn import ReLU

_TORCH_RELUS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class _ReluMode(TorchFunctionMode):
    """Calls ``on_relu(x)`` for each ReLU; its return value (or ``None``: the ReLU as is) is the output."""

    def __init__(self, on_relu):
        super().__init__()
        self.on_relu = on_relu

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _TORCH_RELUS:
            replaced = self.on_relu(args[0])
            if replaced is not None:
                return replaced
        return func(*args, **kwargs)


@contextmanager
def record_torch_relu_inputs():
    """Collect the input of every PyTorch ReLU call in the block, in call order (NCHW numpy)."""
    inputs: list[np.ndarray] = []

    def on_relu(x):
        inputs.append(x.detach().numpy().copy())

    with _ReluMode(on_relu):
        yield inputs


@contextmanager
def record_flax_relu_inputs(model: nnx.Module):
    """Collect the input of every ReLU layer call of ``model`` in the block, in call order (NCHW numpy).

    The seam is explicit: each :class:`flaxcnn.models.nn.ReLU` of ``model`` gets a ``tap`` for
    the block (put back after it), which reports its concrete input through
    ``jax.debug.callback``; eagerly, under ``nnx.value_and_grad`` and under ``jax.jit`` alike. A
    ReLU written inline as ``jax.nn.relu(x)`` has no seam and is not seen: the calls then do not
    pair and nothing is replayed (:func:`decisions_to_replay` says so).
    """
    inputs: list[np.ndarray] = []

    def keep(value) -> None:
        value = np.asarray(value)
        inputs.append(np.transpose(value, (0, 3, 1, 2)) if value.ndim == 4 else value.copy())

    def tap(x: jax.Array) -> None:
        jax.debug.callback(keep, jax.lax.stop_gradient(x), ordered=True)

    relus = [layer for _, layer in nnx.iter_modules(model) if isinstance(layer, ReLU)]
    saved = [layer.tap for layer in relus]
    for layer in relus:
        layer.tap = tap
    try:
        yield inputs
        jax.effects_barrier()
    finally:
        for layer, previous in zip(relus, saved):
            layer.tap = previous


@dataclass
class DecisionReplay:
    """Per PyTorch ReLU call, the elements to decide as flaxcnn did and flaxcnn's decision there."""

    where: list[np.ndarray] = field(default_factory=list)
    passes: list[np.ndarray] = field(default_factory=list)
    tolerated: int = 0  # decisions that differ within tolerance of zero: replayed
    beyond_tolerance: int = 0  # decisions that differ elsewhere: a real difference, not replayed
    largest_beyond: float = 0.0  # the largest |PyTorch input| among those
    unpaired: str = ""  # why the calls could not be paired ("" when they were)


def decisions_to_replay(torch_inputs: list[np.ndarray], flax_inputs: list[np.ndarray], *,
                        atol: float, rtol: float) -> DecisionReplay:
    """Compare the two runs' ReLU decisions call by call (see the module docstring, step 2); an
    element's band of zero is ``atol + rtol * max|PyTorch input of that call|``."""
    replay = DecisionReplay()
    if len(torch_inputs) != len(flax_inputs):
        replay.unpaired = f"PyTorch made {len(torch_inputs)} ReLU calls, flaxcnn {len(flax_inputs)}"
        return replay
    for i, (t, f) in enumerate(zip(torch_inputs, flax_inputs)):
        if t.shape != f.shape:
            replay.unpaired = f"ReLU call {i}: PyTorch input {t.shape}, flaxcnn input {f.shape} (NCHW)"
            return replay
    for t, f in zip(torch_inputs, flax_inputs):
        band = atol + rtol * (float(np.max(np.abs(t))) if t.size else 0.0)
        differ = (t > 0) != (f > 0)
        tolerated = differ & (np.abs(t) <= band) & (np.abs(f) <= band)
        beyond = differ & ~tolerated
        replay.where.append(tolerated)
        replay.passes.append(f > 0)
        replay.tolerated += int(tolerated.sum())
        replay.beyond_tolerance += int(beyond.sum())
        if beyond.any():
            replay.largest_beyond = max(replay.largest_beyond, float(np.max(np.abs(t[beyond]))))
    return replay


@contextmanager
def replay_torch_relu_decisions(replay: DecisionReplay):
    """Make PyTorch's ReLU calls, in order, take flaxcnn's decision where ``replay`` says so."""
    queue = list(zip(replay.where, replay.passes))

    def on_relu(x):
        if not queue:
            raise RuntimeError("PyTorch called ReLU more often than in the recorded run")
        where, passes = queue.pop(0)
        if not where.any():
            return None
        where_t = torch.as_tensor(where)
        decided = torch.where(torch.as_tensor(passes), x, torch.zeros_like(x))
        return torch.where(where_t, decided, torch.relu(x))

    with _ReluMode(on_relu):
        yield
    if queue:
        raise RuntimeError(f"PyTorch called ReLU {len(queue)} times fewer than in the recorded run")
