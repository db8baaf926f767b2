"""flaxcnn: the CIFAR-2 and speech-commands CNN labs in JAX/Flax NNX, proven equal to PyTorch.

The public Python API, importable from the package itself (each name is loaded on first use,
so ``import flaxcnn`` stays light and changes nothing in the process):

* models: :func:`get_model` (a registered network's spec: ``build()`` the NNX module,
  ``build_torch()`` its PyTorch reference), :data:`MODELS`;
* data: :func:`load_dataset` (``"cifar2"``, ``"cifar10"``, ``"speech"``; ``source="sample"`` is the
  bundled CIFAR-2 sample);
* PyTorch weights: :func:`load_torch_state_dict` (into an NNX module, strict), :func:`to_torch_state_dict`,
  :func:`load_pt` (a ``.pt`` file, ``weights_only``);
* training: :func:`sgd` (PyTorch's SGD as an optax transformation), :func:`per_example_loss`
  (the labs' losses), :class:`TrainConfig` and :func:`fit` (the engine behind ``flaxcnn train``);
* porting: ``flaxcnn.port.port`` (a PyTorch CNN in; an NNX module, its source and its proof out)
  and ``flaxcnn.port.load``.

The parity checks live in the sibling package ``parity`` (``parity.layers.compare_layers``,
``parity.checks.check_model``). A training script of one's own that wants the allocator
setting the ``flaxcnn`` commands use calls ``flaxcnn.cpu_memory.keep_freed_memory()`` first
(see :mod:`flaxcnn.cpu_memory`: a step that page-faults its buffers runs up to 2x slower).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_API = {
    "get_model": "flaxcnn.models.registry",
    "MODELS": "flaxcnn.models.registry",
    "load_dataset": "flaxcnn.data",
    "load_torch_state_dict": "flaxcnn.convert",
    "to_torch_state_dict": "flaxcnn.convert",
    "load_pt": "flaxcnn.convert",
    "sgd": "flaxcnn.train.optim",
    "per_example_loss": "flaxcnn.train.optim",
    "TrainConfig": "flaxcnn.train.config",
    "fit": "flaxcnn.train.loop",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'flaxcnn' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
