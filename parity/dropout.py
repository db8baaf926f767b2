"""Dropout equivalence by mask replay: the one record-and-replay flow of the parity checks.

PyTorch and JAX draw different random numbers, so equal outputs in training mode are proven by
letting PyTorch run its real ``nn.Dropout``/``nn.Dropout2d`` layers, drawing each keep-mask again
exactly (:func:`record_torch_masks`), and replaying those masks through flaxcnn's dropout layers,
whose only random part (``keep_mask``) is replaced for the block (:func:`replay_flax_masks`), or
through PyTorch's layers for a second PyTorch run (:func:`replay_torch_masks`). The Flax layer
asks for a mask of the shape *its* semantics say (``mask_shape``: a ``Dropout2d`` mask is one
value per channel); a replayed mask of another shape fails the check.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from flax import nnx

from flaxcnn.convert import named_layers
from flaxcnn.models.layers import Dropout


class DropoutMismatch(AssertionError):
    pass


def renamed(name: str, rename: Mapping[str, str]) -> str:
    """``name`` with its longest prefix found in ``rename`` replaced (whole dotted parts only)."""
    for prefix in sorted(rename, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return rename[prefix] + name[len(prefix):]
    return name


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
    """Collect {module name: [keep-mask in Flax layout, ...]} of every dropout call, exactly.

    A mask read off the layer's output cannot tell a dropped zero from a kept one (the forward
    pass does not care, the gradient with respect to the dropout's input does). So each mask is
    drawn again: after the real call, the layer's forward (without hooks) runs on ones from the
    random state the call started from (same shape, same generator: the same draw on CPU), and
    the generator is then put back where the real call left it.
    """
    masks: dict[str, list[np.ndarray]] = defaultdict(list)
    started: dict[str, torch.Tensor] = {}
    handles = []

    def pre_hook_for(name: str):
        def pre_hook(_module, _inputs):
            started[name] = torch.get_rng_state()

        return pre_hook

    def hook_for(name: str):
        def hook(module, inputs, _output):
            after = torch.get_rng_state()
            torch.set_rng_state(started.pop(name))
            with torch.no_grad():
                keep = (module.forward(torch.ones_like(inputs[0])) != 0).numpy()  # no hooks
            torch.set_rng_state(after)
            if keep.ndim == 4 and isinstance(module, torch.nn.Dropout2d):
                masks[name].append(keep[:, :, 0, 0][:, None, None, :])  # channel mask, NHWC (N, 1, 1, C)
            else:
                masks[name].append(keep.transpose(0, 2, 3, 1) if keep.ndim == 4 else keep)

        return hook

    for name, module in dropout_modules(model):
        handles.append(module.register_forward_pre_hook(pre_hook_for(name)))
        handles.append(module.register_forward_hook(hook_for(name)))
    try:
        yield masks
    finally:
        for handle in handles:
            handle.remove()


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
            return x * (mask / (1 - module.p))  # PyTorch's order: the mask is scaled, then applied

        return hook

    with forward_hooks((module, hook_for(name, module)) for name, module in dropout_modules(model)):
        yield


@contextmanager
def replay_flax_masks(model: nnx.Module, masks: Mapping[str, list[np.ndarray]],
                      rename: Mapping[str, str] | None = None):
    """Make every flaxcnn dropout layer of ``model`` use the recorded masks, in call order.

    Layers are named as PyTorch names them (:func:`flaxcnn.convert.named_layers`: ``drop1``,
    ``classifier.3`` for the fourth element of an ``nnx.Sequential``); ``rename`` maps a Flax
    name or prefix to PyTorch's where they differ (as :func:`parity.layers.compare_layers` takes it).
    """
    names = {id(layer): renamed(name, rename or {}) for name, layer in named_layers(model)}
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
