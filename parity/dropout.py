"""Dropout equivalence by mask replay.

PyTorch and JAX draw different random numbers, so equal outputs in training mode are proven by
letting PyTorch run its real ``nn.Dropout``/``nn.Dropout2d`` layers, recovering each keep-mask
from what the layer did, and replaying those masks through flaxcnn's dropout layers, whose only
random part (``keep_mask``) is replaced. Recovery also checks PyTorch's behaviour: kept values
must equal ``x / (1 - p)`` and dropped ones 0, and a 4-D ``Dropout2d`` mask must be constant over
H and W (channel dropout). The Flax layer then asks for a mask of the shape *its* semantics say
(``mask_shape``); a replayed mask of another shape fails the check.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import numpy as np
import torch
from flax import nnx

from flaxcnn.convert import named_layers
from flaxcnn.models.layers import Dropout


class DropoutMismatch(AssertionError):
    pass


@contextmanager
def forward_hooks(hooks: Iterable[tuple[torch.nn.Module, Callable]]):
    """Each ``(module, hook)`` registered as a forward hook for the block, then removed."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def dropout_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every ``nn.Dropout``/``nn.Dropout2d`` of ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d))]


@contextmanager
def record_torch_masks(model: torch.nn.Module):
    """Collect {module name: [keep-mask in Flax layout, ...]} from every dropout call."""
    masks: dict[str, list[np.ndarray]] = defaultdict(list)

    def hook_for(name: str, module: torch.nn.Module):
        def hook(_module, inputs, output):
            x = inputs[0].detach().numpy()
            y = output.detach().numpy()
            p = module.p
            keep = y != 0
            known = x != 0  # where x is exactly 0 (e.g. after ReLU) the mask changes nothing
            if not np.allclose(y[keep], x[keep] / (1 - p), rtol=1e-6, atol=0):
                raise DropoutMismatch(f"{name}: kept values are not x / (1 - p)")
            if y.ndim == 4 and isinstance(module, torch.nn.Dropout2d):
                seen = known.any(axis=(2, 3))
                per_channel = np.where(seen, (keep & known).any(axis=(2, 3)), True)
                full = np.broadcast_to(per_channel[:, :, None, None], keep.shape)
                if not np.array_equal(keep[known], full[known]):
                    raise DropoutMismatch(f"{name}: Dropout2d mask is not constant over H, W")
                masks[name].append(per_channel[:, None, None, :])  # NHWC mask (N, 1, 1, C)
            else:
                keep = np.where(known, keep, True)
                masks[name].append(np.transpose(keep, (0, 2, 3, 1)) if y.ndim == 4 else keep)

        return hook

    with forward_hooks((module, hook_for(name, module)) for name, module in dropout_modules(model)):
        yield masks


def torch_layout(mask: np.ndarray) -> np.ndarray:
    """A recorded mask (Flax layout) in PyTorch's: NHWC -> NCHW; (N, 1, 1, C) -> (N, C, 1, 1)."""
    return np.transpose(mask, (0, 3, 1, 2)) if mask.ndim == 4 else mask


@contextmanager
def replay_torch_masks(model: torch.nn.Module, masks: dict[str, list[np.ndarray]]):
    """Make every dropout module of ``model`` (a PyTorch reference) apply the recorded masks, in
    call order, as ``x * mask / (1 - p)``: the network function of the run they came from."""
    queues = {name: list(recorded) for name, recorded in masks.items()}

    def hook_for(name: str, module: torch.nn.Module):
        def hook(_module, inputs, _output):
            if not queues.get(name):
                raise DropoutMismatch(f"{name}: called more often than in the recorded run")
            x = inputs[0]
            mask = torch.as_tensor(torch_layout(queues[name].pop(0)), dtype=x.dtype)
            return x * mask / (1 - module.p)

        return hook

    with forward_hooks((module, hook_for(name, module)) for name, module in dropout_modules(model)):
        yield


@contextmanager
def replay_flax_masks(model: nnx.Module, masks: dict[str, list[np.ndarray]]):
    """Make every flaxcnn dropout layer of ``model`` use the recorded masks, in call order.

    Layers are named as PyTorch names them (:func:`flaxcnn.convert.named_layers`: ``drop1``,
    ``classifier.3`` for the fourth element of an ``nnx.Sequential``).
    """
    names = {id(layer): name for name, layer in named_layers(model)}
    patched = []
    for path, layer in nnx.iter_modules(model):
        if not isinstance(layer, Dropout):
            continue
        name = names.get(id(layer), ".".join(str(p) for p in path))
        queue = list(masks.get(name, []))

        def keep_mask(key, shape, _queue=queue, _name=name):
            if not _queue:
                raise DropoutMismatch(f"{_name}: Flax called dropout more often than PyTorch")
            mask = _queue.pop(0)
            if tuple(mask.shape) != tuple(shape):
                raise DropoutMismatch(
                    f"{_name}: Flax draws a mask of shape {tuple(shape)}, PyTorch used {mask.shape}"
                )
            return mask

        object.__setattr__(layer, "keep_mask", keep_mask)
        patched.append((layer, queue, name))
    try:
        yield
        leftovers = [name for _, queue, name in patched if queue]
        if leftovers:
            raise DropoutMismatch("PyTorch called dropout more often than Flax in: " + ", ".join(leftovers))
    finally:
        for layer, _, _ in patched:
            object.__delattr__(layer, "keep_mask")
