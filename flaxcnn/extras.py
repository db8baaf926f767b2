"""Optional dependencies, imported where a command needs them, with one clear line when missing.

flaxcnn's core (training, the CLI, the data readers) needs only jax, flax, optax, orbax and
numpy. PyTorch (``flaxcnn[torch]``: export, parity, port) and tensorflow-datasets
(``flaxcnn[tfds]``: CIFAR-10 from a tfds folder) are extras; a command that needs one asks
:func:`require`, which names the extra to install instead of ending in a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from flaxcnn.errors import FlaxcnnError

#: import name -> (extra, distribution) of each optional dependency
EXTRAS: dict[str, tuple[str, str]] = {
    "torch": ("torch", "PyTorch"),
    "tensorflow_datasets": ("tfds", "tensorflow-datasets"),
}


class MissingExtraError(FlaxcnnError, ImportError):
    """An optional dependency that a command needs is not installed."""


def require(module: str, needed_for: str) -> ModuleType:
    """``import module``, or a :class:`MissingExtraError` naming what needs it and the extra to install.

    ``needed_for``: what the user asked for, as the message's subject (``"flaxcnn export"``).
    """
    extra, distribution = EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(f"{needed_for} needs {distribution}, which is not installed: "
                                f"pip install 'flaxcnn[{extra}]'") from error
