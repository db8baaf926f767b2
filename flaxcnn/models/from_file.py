"""An NNX model class named as ``path/to/model.py:ClassName`` (a ported or hand-written model).

Used by ``flaxcnn train --model FILE.py:NAME`` and ``flaxcnn tune --model FILE.py:NAME``. The
file is imported under a module name of its own (it never shadows an installed package), and
the class is built with ``dtype`` and ``rngs`` where its ``__init__`` takes them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from flaxcnn.errors import ConfigError


def is_file_spec(name: str) -> bool:
    """Whether ``name`` names a model in a file (``something.py:Name``), not a registered one."""
    path, sep, attr = name.rpartition(":")
    return bool(sep) and path.endswith(".py") and bool(attr)


def load_class(spec: str) -> type:
    """The object ``NAME`` of ``FILE.py:NAME``, imported from that file."""
    path_text, _, name = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"model file {path} not found (expected FILE.py:NAME, e.g. port-out/model.py:ResNet18)")
    module_name = "flaxcnn_user_model_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
        try:
            loader_spec.loader.exec_module(module)
        except Exception as error:  # noqa: BLE001 - the user's file: report it, whatever it raised
            del sys.modules[module_name]
            raise ConfigError(f"importing {path} failed: {type(error).__name__}: {error}") from error
    found = getattr(module, name, None)
    if found is None:
        classes = [n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, nnx.Module)
                   and v.__module__ == module_name]
        raise ConfigError(f"{path} defines no {name!r}; its NNX classes: {', '.join(classes) or 'none'}")
    return found


def build(spec: str, *, seed: int = 0, dtype=jnp.float32) -> nnx.Module:
    """An instance of ``FILE.py:NAME`` (an ``nnx.Module`` class) with fresh parameters."""
    cls = load_class(spec)
    if not (isinstance(cls, type) and issubclass(cls, nnx.Module)):
        raise ConfigError(f"{spec} is a {type(cls).__name__}, not an nnx.Module class")
    params = inspect.signature(cls).parameters
    kwargs = {"rngs": nnx.Rngs(params=seed, dropout=seed + 1)}
    if "dtype" in params:
        kwargs["dtype"] = dtype
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise ConfigError(f"{spec} needs constructor arguments {', '.join(missing)}; give the class defaults "
                          "for them (flaxcnn builds it with only dtype and rngs)")
    return cls(**kwargs)
