"""ReLU decisions made by rounding: recorded on both sides, replayed into PyTorch where they differ.

A ReLU whose input lies within float32 rounding of zero passes or blocks its gradient on the
last bits of the forward pass. Two correct float32 forwards (PyTorch's and flaxcnn's, or two
kernel variants) can decide it differently, and every gradient upstream then moves by that
element's whole contribution, which can be far above the gradient tolerance
(:mod:`parity.kinks` measures it). The other piecewise activations have the same kinks at
other inputs: ReLU6 and Hardtanh at their two bounds, Hardswish and Hardsigmoid at -3 and 3,
LeakyReLU at 0 (:data:`KINKED`); "ReLU" below stands for all of them, each call decided by the
piece of the function its input falls in. Dropout has the same problem with random streams,
solved by replaying PyTorch's masks (:mod:`parity.dropout`); these decisions are replayed the
same way, in the other direction:

1. record every ReLU input of both train-mode forwards, in call order, with the call's kinks
   (PyTorch: a ``TorchFunctionMode`` sees ``F.relu``, ``torch.relu``, ``nn.ReLU``, ``F.relu6``,
   ``F.hardtanh`` (``nn.ReLU6``), ``F.hardswish``, ``F.hardsigmoid``, ``F.leaky_relu``; Flax:
   each :class:`flaxcnn.models.nn.KinkedActivation` layer's ``tap`` seam reports its concrete
   input through ``jax.debug.callback``, also under ``nnx.value_and_grad``);
2. pair the calls (same count, same shapes after NHWC -> NCHW, same kinks) and find the
   elements the two decided differently. A disagreement is *tolerated* only where both inputs
   are within the layer-level forward tolerance of the same kink, ``atol + rtol * max|PyTorch
   input|`` (the tolerance of :mod:`parity.layers`: ``parity.checks.FORWARD_TOL`` and
   ``RTOL``), i.e. where the two forwards agree to tolerance and only the side of the kink
   differs. A disagreement anywhere else is a real difference and is never replayed;
3. rerun PyTorch with flaxcnn's decision at the tolerated elements (and its own elsewhere), with
   the dropout masks of the recorded run. The gradient check compares against that run.

The replay keeps PyTorch's forward values and changes only the derivative at those elements:
there it is the derivative of the piece flaxcnn's input fell in. The forward checks are made
on the unreplayed run.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import jax
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch.overrides import TorchFunctionMode

from flaxcnn.models.nn import KinkedActivation


@dataclass(frozen=True)
class _Kinked:
    """One PyTorch piecewise activation: its arguments after the input, its kinks, and the
    derivative of each piece (a float or a function of the input), in the order of the kinks."""

    names: tuple[str, ...]
    defaults: dict
    kinks: Callable[[dict], tuple[float, ...]]
    slopes: Callable[[dict], tuple]
    forward: Callable[[torch.Tensor, dict], torch.Tensor]  # out of place


_RELU = _Kinked(("inplace",), {"inplace": False}, lambda a: (0.0,), lambda a: (0.0, 1.0),
                lambda x, a: torch.relu(x))
_HARDTANH = _Kinked(("min_val", "max_val", "inplace"), {"min_val": -1.0, "max_val": 1.0, "inplace": False},
                    lambda a: (float(a["min_val"]), float(a["max_val"])), lambda a: (0.0, 1.0, 0.0),
                    lambda x, a: F.hardtanh(x, a["min_val"], a["max_val"]))
#: every PyTorch function whose calls are recorded and replayed, with what it is
KINKED: dict[Callable, _Kinked] = {
    **{f: _RELU for f in (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)},
    F.relu6: _Kinked(("inplace",), {"inplace": False}, lambda a: (0.0, 6.0), lambda a: (0.0, 1.0, 0.0),
                     lambda x, a: F.hardtanh(x, 0.0, 6.0)),
    F.hardtanh: _HARDTANH,
    F.hardswish: _Kinked(("inplace",), {"inplace": False}, lambda a: (-3.0, 3.0),
                         lambda a: (0.0, lambda x: (2 * x + 3) / 6, 1.0), lambda x, a: F.hardswish(x)),
    F.hardsigmoid: _Kinked(("inplace",), {"inplace": False}, lambda a: (-3.0, 3.0),
                           lambda a: (0.0, 1.0 / 6.0, 0.0), lambda x, a: F.hardsigmoid(x)),
    F.leaky_relu: _Kinked(("negative_slope", "inplace"), {"negative_slope": 0.01, "inplace": False},
                          lambda a: (0.0,), lambda a: (float(a["negative_slope"]), 1.0),
                          lambda x, a: F.leaky_relu(x, a["negative_slope"])),
}


def _bound(spec: _Kinked, args: tuple, kwargs: dict) -> dict:
    return {**spec.defaults, **dict(zip(spec.names, args[1:])), **{k: v for k, v in kwargs.items() if k in spec.names}}


def pieces(x: np.ndarray, kinks: tuple[float, ...]) -> np.ndarray:
    """Per element, the piece of the function its input falls in: how many kinks lie below it."""
    piece = np.zeros(x.shape, np.int8)
    for kink in kinks:
        piece += x > kink
    return piece


class Calls(list):
    """Recorded inputs (numpy, NCHW), one per call, and beside them :attr:`kinks`, each call's kinks."""

    def __init__(self):
        super().__init__()
        self.kinks: list[tuple[float, ...]] = []

    def add(self, x: np.ndarray, kinks: tuple[float, ...]) -> None:
        self.append(x)
        self.kinks.append(tuple(kinks))

    def take(self) -> Calls:
        """The calls so far, moved into a new :class:`Calls` (this one is left empty)."""
        taken = Calls()
        taken.extend(self)
        taken.kinks = list(self.kinks)
        self.clear()
        self.kinks.clear()
        return taken


def _kinks_of(calls: list[np.ndarray]) -> list[tuple[float, ...]]:
    return list(getattr(calls, "kinks", [(0.0,)] * len(calls)))  # a plain list: ReLU calls


class _KinkMode(TorchFunctionMode):
    """Calls ``on_call(spec, args, x)`` for each piecewise activation; its return value (or
    ``None``: the function as is) is the output."""

    def __init__(self, on_call):
        super().__init__()
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        spec = KINKED.get(func)
        if spec is not None:
            replaced = self.on_call(spec, _bound(spec, args, kwargs), args[0])
            if replaced is not None:
                return replaced
        return func(*args, **kwargs)


@contextmanager
def record_torch_relu_inputs():
    """Collect the input of every PyTorch ReLU (and other :data:`KINKED` function) call in the
    block, in call order (NCHW numpy, a :class:`Calls`), copied before the call runs."""
    inputs = Calls()

    def on_call(spec, bound, x):
        inputs.add(x.detach().numpy().copy(), spec.kinks(bound))

    with _KinkMode(on_call):
        yield inputs


@contextmanager
def record_flax_relu_inputs(model: nnx.Module):
    """Collect the input of every ReLU-like layer call of ``model`` in the block, in call order
    (NCHW numpy, a :class:`Calls`).

    The seam is explicit: each :class:`flaxcnn.models.nn.KinkedActivation` of ``model`` gets a
    ``tap`` for the block (put back after it), which reports its concrete input through
    ``jax.debug.callback``; eagerly, under ``nnx.value_and_grad`` and under ``jax.jit`` alike. A
    ReLU written inline as ``jax.nn.relu(x)`` has no seam and is not seen: the calls then do not
    pair and nothing is replayed (:func:`decisions_to_replay` says so).
    """
    inputs = Calls()
    with tapping(model, KinkedActivation, lambda layer: lambda value, kinks=layer.kinks(): inputs.add(value, kinks)):
        yield inputs


def as_nchw(value) -> np.ndarray:
    """A concrete value a tap reported, as numpy: a 4-D NHWC map in NCHW, anything else as it is."""
    value = np.asarray(value)
    return np.transpose(value, (0, 3, 1, 2)) if value.ndim == 4 else value.copy()


@contextmanager
def tapping(model: nnx.Module, layer_type: type, keeper: Callable[[nnx.Module], Callable[[np.ndarray], None]]):
    """Give every ``layer_type`` layer of ``model`` a ``tap`` for the block (the previous one is put
    back after it) that passes its concrete input, in NCHW, to ``keeper(layer)`` through
    ``jax.debug.callback``: eagerly, under ``nnx.value_and_grad`` and under ``jax.jit`` alike."""
    layers = [layer for _, layer in nnx.iter_modules(model) if isinstance(layer, layer_type)]
    saved = [layer.tap for layer in layers]
    for layer in layers:
        keep = keeper(layer)
        layer.tap = lambda x, keep=keep: jax.debug.callback(lambda v: keep(as_nchw(v)), jax.lax.stop_gradient(x),
                                                            ordered=True)
    try:
        yield
        jax.effects_barrier()
    finally:
        for layer, previous in zip(layers, saved):
            layer.tap = previous


@dataclass
class DecisionReplay:
    """Per PyTorch ReLU call, the elements to decide as flaxcnn did and flaxcnn's decision there."""

    where: list[np.ndarray] = field(default_factory=list)
    passes: list[np.ndarray] = field(default_factory=list)  # flaxcnn's piece (:func:`pieces`; ReLU: 1 passes)
    tolerated: int = 0  # decisions that differ within tolerance of a kink: replayed
    beyond_tolerance: int = 0  # decisions that differ elsewhere: a real difference, not replayed
    largest_beyond: float = 0.0  # the largest |PyTorch input| among those
    unpaired: str = ""  # why the calls could not be paired ("" when they were)


def decisions_to_replay(torch_inputs: list[np.ndarray], flax_inputs: list[np.ndarray], *,
                        atol: float, rtol: float) -> DecisionReplay:
    """Compare the two runs' decisions call by call (see the module docstring, step 2); an
    element's band around a kink is ``atol + rtol * max|PyTorch input of that call|``. Inputs
    recorded as :class:`Calls` carry their kinks; a plain list is of ReLU calls (kink 0)."""
    replay = DecisionReplay()
    if len(torch_inputs) != len(flax_inputs):
        replay.unpaired = f"PyTorch made {len(torch_inputs)} ReLU calls, flaxcnn {len(flax_inputs)}"
        return replay
    torch_kinks, flax_kinks = _kinks_of(torch_inputs), _kinks_of(flax_inputs)
    for i, (t, f) in enumerate(zip(torch_inputs, flax_inputs)):
        if t.shape != f.shape:
            replay.unpaired = f"ReLU call {i}: PyTorch input {t.shape}, flaxcnn input {f.shape} (NCHW)"
            return replay
        if torch_kinks[i] != flax_kinks[i]:
            replay.unpaired = (f"ReLU call {i}: PyTorch's activation has kinks at {torch_kinks[i]}, "
                               f"flaxcnn's at {flax_kinks[i]}")
            return replay
    for t, f, kinks in zip(torch_inputs, flax_inputs, torch_kinks):
        band = atol + rtol * (float(np.max(np.abs(t))) if t.size else 0.0)
        t_piece, f_piece = pieces(t, kinks), pieces(f, kinks)
        differ = t_piece != f_piece
        near = np.zeros(t.shape, bool)
        for kink in kinks:
            near |= (np.abs(t - kink) <= band) & (np.abs(f - kink) <= band)
        tolerated = differ & near
        beyond = differ & ~tolerated
        replay.where.append(tolerated)
        replay.passes.append(f_piece)
        replay.tolerated += int(tolerated.sum())
        replay.beyond_tolerance += int(beyond.sum())
        if beyond.any():
            replay.largest_beyond = max(replay.largest_beyond, float(np.max(np.abs(t[beyond]))))
    return replay


def _derivative(slope, x: torch.Tensor) -> torch.Tensor:
    return slope(x) if callable(slope) else torch.full_like(x, slope)


@contextmanager
def replay_torch_relu_decisions(replay: DecisionReplay):
    """Make PyTorch's ReLU (and other :data:`KINKED`) calls, in order, take flaxcnn's decision
    where ``replay`` says so: the same output values, the derivative of flaxcnn's piece."""
    queue = list(zip(replay.where, replay.passes))

    def on_call(spec, bound, x):
        if not queue:
            raise RuntimeError("PyTorch called ReLU more often than in the recorded run")
        where, piece = queue.pop(0)
        if not where.any():
            return None
        out = spec.forward(x, bound)
        slopes = spec.slopes(bound)
        piece_t = torch.as_tensor(piece.astype(np.int64))
        derivative = torch.zeros_like(x)
        for index, slope in enumerate(slopes):
            derivative = torch.where(piece_t == index, _derivative(slope, x), derivative)
        # the value of ``out``, the derivative of flaxcnn's piece: out + (x - x) * derivative
        decided = out.detach() + (x - x.detach()) * derivative.detach()
        return torch.where(torch.as_tensor(where), decided, out)

    with _KinkMode(on_call):
        yield
    if queue:
        raise RuntimeError(f"PyTorch called ReLU {len(queue)} times fewer than in the recorded run")
