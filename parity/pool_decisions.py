"""Max-pool window choices made by rounding: recorded on both sides, replayed into PyTorch where they differ.

A max-pool sends each window's gradient to the window's maximum (PyTorch: the first one in
row-major order). Where the two largest values of a window are within rounding of each other,
two correct float32 forwards can pick different elements, and the gradient then reaches a
different input. The common case follows a ReLU decided by rounding (:mod:`parity.relu_decisions`):
PyTorch's side blocks an element, so its window holds only zeros and its gradient goes to the
first of them, while flaxcnn's tiny positive value wins the window and passes it (full-size
VGG-11-BN, float32, AMD EPYC: 1.1e-2 on a BatchNorm's gradient without this replay). So, as
for ReLU decisions:

1. record every max-pool input of both train-mode forwards, in call order, with the pool's
   settings (PyTorch: a ``TorchFunctionMode`` sees ``F.max_pool2d``, which ``nn.MaxPool2d``
   calls; flaxcnn: each :class:`flaxcnn.models.nn.MaxPool2d`'s ``tap`` seam, through
   ``jax.debug.callback``);
2. pair the calls (same count and shapes) and find each side's chosen element per window
   (PyTorch's rule, applied to each side's own input). A differing choice is *tolerated* only
   where the two candidates are within the band of each other on both sides (``rtol *
   max|PyTorch input|`` of the call): a near tie, decided by rounding. Any other difference is
   real and never replayed;
3. rerun PyTorch with flaxcnn's choice in the tolerated windows: the same output values, the
   gradient sent to flaxcnn's element.

The values are kept: changing PyTorch's forward by a band, even at a few elements, moves an
ill-conditioned network's float32 gradients (MobileNetV2's by 4e-2 when ReLU replays took
flaxcnn's values), while a window's routing is a choice, not a value.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch.overrides import TorchFunctionMode

from flaxcnn.models.nn import MaxPool2d
from parity.relu_decisions import tapping

_NAMES = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}


def _settings(args: tuple, kwargs: dict) -> dict:
    bound = {**_DEFAULTS, **dict(zip(_NAMES, args[1:])), **{k: v for k, v in kwargs.items() if k in _NAMES}}
    if bound["stride"] is None or bound["stride"] == []:
        bound["stride"] = bound["kernel_size"]
    return bound


def window_choices(x: np.ndarray, settings: dict) -> np.ndarray:
    """Per window, the flat index (``h * W + w`` of its plane) of the element PyTorch's rule picks."""
    with torch.no_grad():
        _, index = F.max_pool2d(torch.from_numpy(np.asarray(x, np.float64)), settings["kernel_size"],
                                settings["stride"], settings["padding"], settings["dilation"],
                                ceil_mode=settings["ceil_mode"], return_indices=True)
    return index.numpy()


class PoolCalls(list):
    """Recorded max-pool inputs (numpy, NCHW), one per call, with each call's settings in :attr:`settings`."""

    def __init__(self):
        super().__init__()
        self.settings: list[dict] = []

    def add(self, x: np.ndarray, settings: dict) -> None:
        self.append(x)
        self.settings.append(settings)

    def take(self) -> PoolCalls:
        """The calls so far, moved into a new :class:`PoolCalls` (this one is left empty)."""
        taken = PoolCalls()
        taken.extend(self)
        taken.settings = list(self.settings)
        self.clear()
        self.settings.clear()
        return taken


class _PoolMode(TorchFunctionMode):
    """Calls ``on_call(settings, x)`` for each ``F.max_pool2d``; its return value (or ``None``: the
    function as is) is the output."""

    def __init__(self, on_call):
        super().__init__()
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.max_pool2d or func is F.max_pool2d_with_indices:
            replaced = self.on_call(_settings(args, kwargs), args[0])
            if replaced is not None:
                return replaced
        return func(*args, **kwargs)


@contextmanager
def record_torch_pool_inputs():
    """Collect the input of every PyTorch max-pool in the block, in call order (a :class:`PoolCalls`)."""
    inputs = PoolCalls()

    def on_call(settings, x):
        inputs.add(x.detach().numpy().copy(), settings)

    with _PoolMode(on_call):
        yield inputs


@contextmanager
def record_flax_pool_inputs(model: nnx.Module):
    """Collect the input of every :class:`flaxcnn.models.nn.MaxPool2d` call of ``model`` in the
    block, in call order (NCHW numpy), through each layer's ``tap`` (put back after the block);
    eagerly and under ``jax.jit`` alike (see :func:`parity.relu_decisions.record_flax_relu_inputs`)."""
    inputs: list[np.ndarray] = []
    with tapping(model, MaxPool2d, lambda layer: inputs.append):
        yield inputs


@dataclass
class PoolReplay:
    """Per PyTorch max-pool call, the windows to route as flaxcnn did, and flaxcnn's choices."""

    where: list[np.ndarray] = field(default_factory=list)
    choices: list[np.ndarray] = field(default_factory=list)  # flaxcnn's element per window
    tolerated: int = 0  # near ties chosen differently: replayed
    beyond_tolerance: int = 0  # choices that differ with no near tie: a real difference, not replayed
    unpaired: str = ""  # why the calls could not be paired ("" when they were)


def _values_at(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    n, c = x.shape[:2]
    return np.take_along_axis(x.reshape(n, c, -1), index.reshape(n, c, -1), axis=2).reshape(index.shape)


def pool_choices_to_replay(torch_inputs: PoolCalls, flax_inputs: list[np.ndarray], *, rtol: float) -> PoolReplay:
    """Compare the two runs' window choices call by call (the module docstring, step 2)."""
    replay = PoolReplay()
    if len(torch_inputs) != len(flax_inputs):
        replay.unpaired = f"PyTorch made {len(torch_inputs)} max-pool calls, flaxcnn {len(flax_inputs)}"
        return replay
    for i, (t, f) in enumerate(zip(torch_inputs, flax_inputs)):
        if t.shape != f.shape or t.ndim != 4:
            replay.unpaired = f"max-pool call {i}: PyTorch input {t.shape}, flaxcnn input {f.shape} (NCHW)"
            return replay
    for t, f, settings in zip(torch_inputs, flax_inputs, getattr(torch_inputs, "settings", [])):
        t64, f64 = t.astype(np.float64), f.astype(np.float64)
        t_choice, f_choice = window_choices(t64, settings), window_choices(f64, settings)
        band = rtol * (float(np.max(np.abs(t64))) if t.size else 0.0)
        differ = t_choice != f_choice
        near = ((np.abs(_values_at(t64, t_choice) - _values_at(t64, f_choice)) <= band)
                & (np.abs(_values_at(f64, t_choice) - _values_at(f64, f_choice)) <= band))
        tolerated = differ & near
        replay.where.append(tolerated)
        replay.choices.append(f_choice)
        replay.tolerated += int(tolerated.sum())
        replay.beyond_tolerance += int((differ & ~near).sum())
    return replay


@contextmanager
def replay_torch_pool_choices(replay: PoolReplay):
    """Make PyTorch's max-pool calls, in order, send the gradient of the windows ``replay`` names
    to flaxcnn's element; every output value stays PyTorch's."""
    queue = list(zip(replay.where, replay.choices))

    def on_call(settings, x):
        if not queue:
            raise RuntimeError("PyTorch called max_pool2d more often than in the recorded run")
        where, choice = queue.pop(0)
        if not where.any() or settings["return_indices"]:
            return None
        out, own = F.max_pool2d(x, settings["kernel_size"], settings["stride"], settings["padding"],
                                settings["dilation"], ceil_mode=settings["ceil_mode"], return_indices=True)
        index = torch.where(torch.from_numpy(where), torch.from_numpy(choice), own)
        n, c = x.shape[:2]
        routed = torch.gather(x.reshape(n, c, -1), 2, index.reshape(n, c, -1)).reshape(out.shape)
        return out.detach() + (routed - routed.detach())  # PyTorch's value, flaxcnn's element's gradient

    with _PoolMode(on_call):
        yield
    if queue:
        raise RuntimeError(f"PyTorch called max_pool2d {len(queue)} times fewer than in the recorded run")
