"""An NNX model class named as ``path/to/model.py:ClassName`` (a ported or hand-written model).

Used by ``flaxcnn train --model FILE.py:NAME`` and ``flaxcnn tune FILE.py:NAME``: the registry
(:func:`flaxcnn.models.registry.get_model`) gives a :class:`FileModelSpec` for such a name, which
trains like a registered model. The file is imported under a module name of its own (it never
shadows an installed package), and the class is built with ``dtype`` and ``rngs`` where its
``__init__`` takes them. What the engine needs from the class, and how it finds it:

* the input it takes: the class attribute ``input_chw = (C, H, W)`` (``flaxcnn port`` writes it);
* its loss, from its output as in the port's proof: the class attribute ``loss``
  (``"cross_entropy"`` or ``"nll"``) when it has one, else ``nll`` when every row of its output on
  a random batch is a log-probability vector (``logsumexp == 0``), else cross-entropy on logits;
  an output that is not (N, classes) -- a segmentation map -- cannot train on these data sets;
* its initial weights: ``weights.npz`` beside the file (a PyTorch-keyed state dict, as ``flaxcnn
  port`` writes it: the torch model's own initial weights) unless ``--init flax``, which keeps the
  NNX class's own draw under ``--seed``. A torch ``__init__`` that sets weights by hand is not
  traced by the port: only the weights file carries them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxcnn import convert
from flaxcnn.errors import ConfigError
from flaxcnn.models.conv_policy import DEFAULT, ConvPolicy, apply


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


#: the PyTorch-keyed initial weights ``flaxcnn port`` writes beside model.py
WEIGHTS_FILE = "weights.npz"


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


@dataclass(frozen=True)
class FileModelSpec:
    """A model from a file, with the part of :class:`flaxcnn.models.registry.ModelSpec`'s interface
    the engine uses (``name``, ``input_chw``, ``loss``, ``domain``, ``build``)."""

    name: str  # FILE.py:NAME
    input_chw: tuple[int, int, int]
    loss: str
    num_outputs: int
    domain: None = None  # trains on any data set whose examples have shape input_chw
    torch_reference: str = ""
    description: str = ""

    def build(self, num_classes: int | None = None, *, seed: int = 0, init: str = "torch",
              conv_policy: ConvPolicy = DEFAULT) -> nnx.Module:
        if num_classes is not None and num_classes != self.num_outputs:
            raise ConfigError(f"{self.name} has {self.num_outputs} outputs but the data set has {num_classes} "
                              f"classes; port the model with {num_classes} outputs (or train on --classes that fit)")
        model = build(self.name, seed=seed)
        weights = Path(self.name.rpartition(":")[0]).with_name(WEIGHTS_FILE)
        if init == "torch":
            if not weights.is_file():
                raise ConfigError(f"{weights} not found: --init torch starts {self.name} from the weights file "
                                  f"`flaxcnn port` writes beside model.py; use --init flax for the class's own draw")
            with np.load(weights) as arrays:
                convert.load_torch_state_dict(model, dict(arrays))
        elif init != "flax":
            raise ConfigError(f"--init must be torch (the weights in {WEIGHTS_FILE}) or flax, got {init!r}")
        return apply(model, conv_policy) if conv_policy != DEFAULT else model

    def check_fits(self, example_shape: tuple[int, ...], num_classes: int) -> None:
        """A clear error when the data set's examples or classes do not fit the model."""
        if tuple(example_shape) != self.input_chw:
            raise ConfigError(f"{self.name} takes inputs of shape {self.input_chw} (C, H, W); the data set's "
                              f"examples have shape {tuple(example_shape)}")
        if num_classes != self.num_outputs:
            raise ConfigError(f"{self.name} has {self.num_outputs} outputs; the data set has {num_classes} classes")


def file_spec(spec: str) -> FileModelSpec:
    """The :class:`FileModelSpec` of ``FILE.py:NAME``: its input, outputs and loss, read from the
    class (see the module docstring)."""
    cls = load_class(spec)
    chw = getattr(cls, "input_chw", None)
    if chw is None or len(tuple(chw)) != 3:
        raise ConfigError(f"{spec} declares no input_chw = (C, H, W) class attribute (flaxcnn port writes one; "
                          "add it to a hand-written class)")
    chw = tuple(int(v) for v in chw)
    model = build(spec)
    model.eval()
    x = jax.random.normal(jax.random.key(0), (4, *chw), jnp.float32)
    out = model(x)
    if out.ndim != 2:
        raise ConfigError(f"{spec} outputs shape {tuple(out.shape)} per batch, not (N, classes): a model with a "
                          "per-pixel or other non-class output cannot train on these classification data sets")
    loss = getattr(cls, "loss", None)
    if loss is None:
        log_probabilities = bool(jnp.all(jnp.abs(jax.nn.logsumexp(out, axis=1)) < 1e-4))
        loss = "nll" if log_probabilities else "cross_entropy"
    if loss not in ("cross_entropy", "nll"):
        raise ConfigError(f"{spec}.loss is {loss!r}; accepted: cross_entropy (logits), nll (log_softmax output)")
    return FileModelSpec(spec, chw, loss, int(out.shape[1]), description=f"{cls.__name__} from {spec.rpartition(':')[0]}")
