"""Random draws made equal on both sides of a proof: drawn by PyTorch's pass, replayed by the port's.

PyTorch and JAX draw different random numbers, so train-mode equality is proven by letting one
side draw and the other replay. :class:`TorchDraws` is a ``TorchFunctionMode`` around PyTorch's
forward pass: it takes over ``F.dropout``, ``F.dropout2d`` (what ``nn.Dropout``/``nn.Dropout2d``
call), ``torch.bernoulli`` and ``Tensor.bernoulli(_)`` (stochastic depth's draw), draws each mask
itself from the proof's own ``torch.Generator`` (torch's default generator is neither read nor
advanced), returns exactly what PyTorch's CPU kernels return (``x * (mask / (1 - p))``; the
filled tensor) and records the masks in call order. Random draws it cannot replay
(``torch.rand``, ``F.alpha_dropout``, ...) are refused in one clear error.

:func:`replaying` is the NNX side: it gives every flaxcnn ``Dropout``/``Dropout2d``/``Bernoulli``
instance of a model a ``keep_mask`` that returns the next recorded mask, in call order (the
port calls its random layers in the torch graph's order). It runs inside a traced function
whose *arguments* are the masks, so a jitted training step gets fresh masks at every call; a
mask fixed at trace time would repeat the first step's draw.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch.overrides import TorchFunctionMode

from flaxcnn.convert import named_layers
from flaxcnn.errors import ConfigError
from flaxcnn.models.nn import Bernoulli, Dropout


class UnreplayableDrawError(ConfigError):
    """The PyTorch module draws random numbers in a way the proof cannot replay on the NNX side."""


class DrawMismatchError(ConfigError):
    """The port's random layers ask for draws that PyTorch's pass did not make (count or shape)."""


#: functions that take over a draw, and what they record it as
REPLAYED = ("F.dropout", "F.dropout2d", "torch.bernoulli", "Tensor.bernoulli", "Tensor.bernoulli_")

#: random functions a forward pass may not call: nothing on the NNX side replays them
_UNREPLAYABLE: dict[Callable, str] = {
    F.dropout1d: "F.dropout1d", F.dropout3d: "F.dropout3d", F.alpha_dropout: "F.alpha_dropout",
    F.feature_alpha_dropout: "F.feature_alpha_dropout", torch.rand: "torch.rand",
    torch.rand_like: "torch.rand_like", torch.randn: "torch.randn", torch.randn_like: "torch.randn_like",
    torch.randint: "torch.randint", torch.randint_like: "torch.randint_like", torch.randperm: "torch.randperm",
    torch.normal: "torch.normal", torch.multinomial: "torch.multinomial", torch.poisson: "torch.poisson",
    torch.Tensor.uniform_: "Tensor.uniform_", torch.Tensor.normal_: "Tensor.normal_",
    torch.Tensor.random_: "Tensor.random_", torch.Tensor.exponential_: "Tensor.exponential_",
    torch.Tensor.geometric_: "Tensor.geometric_", torch.Tensor.cauchy_: "Tensor.cauchy_",
    torch.Tensor.log_normal_: "Tensor.log_normal_",
}


@dataclass(frozen=True)
class Draw:
    """One random draw of PyTorch's pass: its keep mask (bool, PyTorch's layout) and what made it."""

    source: str  # one of REPLAYED
    mask: np.ndarray

    def nnx_layout(self) -> np.ndarray:
        """The mask as the NNX side sees it: a 4-D mask NHWC (a Dropout2d one (N, 1, 1, C))."""
        return np.ascontiguousarray(self.mask.transpose(0, 2, 3, 1)) if self.mask.ndim == 4 else self.mask


def _bind(func: Callable, args: tuple, kwargs: dict) -> dict:
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


class TorchDraws(TorchFunctionMode):
    """Around a PyTorch forward pass: every dropout and Bernoulli draw made from ``generator``,
    with PyTorch's exact result, and recorded in call order (:attr:`draws`)."""

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.generator = generator
        self.draws: list[Draw] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout or func is F.dropout2d:
            return self._dropout(func, args, kwargs, feature=func is F.dropout2d)
        if func is torch.bernoulli or func is torch.Tensor.bernoulli or func is torch.Tensor.bernoulli_:
            out = func(*args, **{**kwargs, "generator": self.generator})
            name = {torch.bernoulli: "torch.bernoulli", torch.Tensor.bernoulli: "Tensor.bernoulli"}.get(
                func, "Tensor.bernoulli_")
            self.draws.append(Draw(name, (out != 0).detach().cpu().numpy()))
            return out
        if func in _UNREPLAYABLE:
            raise UnreplayableDrawError(
                f"the forward pass calls {_UNREPLAYABLE[func]}, a random draw the proof cannot replay on the "
                f"NNX side; replayed draws: {', '.join(REPLAYED)} (nn.Dropout, nn.Dropout2d, stochastic depth "
                "with torch.empty(...).bernoulli_(p))")
        return func(*args, **kwargs)

    def _dropout(self, func: Callable, args: tuple, kwargs: dict, *, feature: bool):
        a = _bind(func, args, kwargs)
        x, p, training, inplace = a["input"], a["p"], a["training"], a["inplace"]
        if not training or not 0.0 < p < 1.0 or x.numel() == 0 or (feature and x.dim() < 2):
            return func(*args, **kwargs)  # nothing drawn (or PyTorch's own error)
        # PyTorch's _dropout_impl: a Bernoulli(1 - p) noise of the input's dtype, (N, C, 1, ...)
        # for feature dropout (element-wise on a 2-D input), divided by 1 - p, then multiplied in
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2) if feature else tuple(x.shape)
        noise = torch.empty(shape, dtype=x.dtype).bernoulli_(1.0 - p, generator=self.generator)
        self.draws.append(Draw("F.dropout2d" if feature else "F.dropout", (noise != 0).numpy()))
        noise.div_(1.0 - p)
        return x.mul_(noise) if inplace else x * noise


# ------------------------------------------------------------------------------- NNX side


def random_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """(torch-style name, layer) of every flaxcnn Dropout/Dropout2d/Bernoulli of ``model``."""
    names = {id(layer): name for name, layer in named_layers(model)}
    return [(names.get(id(layer), ".".join(str(p) for p in path)), layer)
            for path, layer in nnx.iter_modules(model) if isinstance(layer, (Dropout, Bernoulli))]


class Replay:
    """The recorded masks of one pass, handed out in call order; :attr:`used` counts them."""

    def __init__(self, masks: Sequence[jax.Array]):
        self.masks = list(masks)
        self.used = 0

    def next(self, name: str, layer: nnx.Module, shape: tuple[int, ...]) -> jax.Array:
        kind = type(layer).__name__
        if self.used >= len(self.masks):
            raise DrawMismatchError(
                f"{name} ({kind}) asks for random draw {self.used + 1}, but PyTorch's pass drew "
                f"{len(self.masks)}: the port calls random layers that the torch module does not")
        mask = self.masks[self.used]
        self.used += 1
        if tuple(mask.shape) == tuple(shape):
            return mask
        if isinstance(layer, Bernoulli) and mask.ndim == 4 and mask.transpose(0, 3, 1, 2).shape == tuple(shape):
            return jnp.transpose(mask, (0, 3, 1, 2))  # a draw made in torch's layout, not NHWC
        raise DrawMismatchError(
            f"{name} ({kind}): random draw {self.used} has shape {tuple(shape)} on the NNX side, but PyTorch's "
            f"draw {self.used} has shape {tuple(mask.shape)} (NHWC for a 4-D mask; a Dropout2d mask is "
            "(N, 1, 1, C)): the random layers are called in another order or on other tensors")


@contextmanager
def replaying(model: nnx.Module, masks: Sequence[jax.Array]) -> Iterator[Replay]:
    """For the block, every random layer of ``model`` returns the next of ``masks`` (NNX layout)."""
    replay = Replay(masks)
    layers = random_layers(model)
    for name, layer in layers:
        if isinstance(layer, Bernoulli):
            def keep_mask(key, shape, p, _name=name, _layer=layer):
                return replay.next(_name, _layer, tuple(shape))
        else:
            def keep_mask(key, shape, _name=name, _layer=layer):
                return replay.next(_name, _layer, tuple(shape))
        object.__setattr__(layer, "keep_mask", keep_mask)
    try:
        yield replay
    finally:
        for _, layer in layers:
            object.__delattr__(layer, "keep_mask")
