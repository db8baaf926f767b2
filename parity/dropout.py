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
from contextlib import contextmanager

import numpy as np
import torch
from flax import nnx

from flaxcnn.convert import named_layers
from flaxcnn.models.layers import Dropout


class DropoutMismatch(AssertionError):
    pass


@contextmanager
def record_torch_masks(model: torch.nn.Module):
    """Collect {module name: [keep-mask in Flax layout, ...]} from every dropout call."""
    masks: dict[str, list[np.ndarray]] = defaultdict(list)
    handles = []

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

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Dropout, torch.nn.Dropout2d)):
            handles.append(module.register_forward_hook(hook_for(name, module)))
    try:
        yield masks
    finally:
        for handle in handles:
            handle.remove()


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
