"""Load pickled numpy containers without letting the file run code.

``pickle.load`` calls whatever module-level name a file names (``os.system``, ``builtins.exec``, ...), so a
downloaded CIFAR batch could execute anything. :class:`RestrictedUnpickler` resolves only the
globals that pickled numpy arrays need; plain dicts, lists, bytes, str and int use dedicated
opcodes and never reach ``find_class``. Any other name is refused *before* it is called.
"""

from __future__ import annotations

import _codecs
import importlib
import io
import os
import pickle
from typing import Any, Callable

import numpy as np

from flaxcnn.errors import DataError


def _numpy_internal(submodule: str, name: str) -> Callable[..., Any]:
    """``numpy._core.<submodule>.<name>`` (numpy 2) or ``numpy.core...`` (numpy 1)."""
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {submodule}.{name}")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Every (module, name) a pickled numpy array can reference, mapped to the real object.

    Files written by numpy 1.x name ``numpy.core``, numpy 2.x ``numpy._core``: both are mapped
    to the installed functions without importing the deprecated alias. ``_codecs.encode`` is
    how Python 3 writes ``bytes`` at pickle protocol 2; it only re-encodes a string.
    """
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,
    }
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = _numpy_internal("multiarray", "_reconstruct")
        table[(f"{package}.multiarray", "scalar")] = _numpy_internal("multiarray", "scalar")
        table[(f"{package}.numeric", "_frombuffer")] = _numpy_internal("numeric", "_frombuffer")
    return table


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy array reconstruction globals.

    ``source`` names the file in error messages.
    """

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def __init__(self, file: io.BufferedIOBase, *, source: str, encoding: str = "latin1") -> None:
        # latin1 is what torchvision uses: it turns Python 2 ``str`` (the original CIFAR
        # release) into ``str`` and keeps Python 3 ``bytes`` as ``bytes``.
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = RestrictedUnpickler._ALLOWED
        if allowed is None:
            allowed = RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"refused to load {self.source}: it references {module}.{name}, "
                "which a CIFAR batch never needs (only numpy arrays, dicts, lists, bytes, str "
                "and int are accepted). The file is corrupt or was built to run code; "
                "replace it with a copy from the original CIFAR-10 release."
            ) from None


def load_restricted(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`; every failure is a DataError naming it."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, source=path).load()
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise DataError(
            f"{path} is not a readable pickle ({type(e).__name__}: {e}); the file is truncated "
            "or damaged: replace it with a fresh copy of the CIFAR-10 python release."
        ) from e
