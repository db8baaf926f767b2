"""``flaxcnn port FILE.py:NAME --input-shape C,H,W --out DIR``: the command behind the Python API.

NAME is an ``nn.Module`` class or a function returning a module, built with ``--kwargs`` (a JSON
object); ``--state-dict`` loads weights saved with ``torch.save(model.state_dict(), path)`` (read
with ``weights_only=True``: nothing in the file runs); without it the module keeps its own initial
weights. The example batch is ``--batch`` standard-normal NCHW images (seed 0).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from flaxcnn.errors import ConfigError

#: the example batch's seed: the port and its proof are reproducible run to run
EXAMPLE_SEED = 0


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape takes C,H,W (three positive integers, e.g. 3,32,32), got {text!r}")
    return shape  # type: ignore[return-value]


def parse_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--kwargs is not valid JSON ({error.msg} at character {error.pos}): {text!r}; "
                          'give an object, e.g. --kwargs \'{"num_classes": 10}\'') from None
    if not isinstance(value, dict):
        raise ConfigError(f"--kwargs must be a JSON object of constructor arguments, got {type(value).__name__}")
    return value


def load_torch_model(spec: str, kwargs: dict):
    """The ``nn.Module`` that ``FILE.py:NAME`` builds with ``kwargs``."""
    import torch

    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text.endswith(".py") or not name:
        raise ConfigError(f"expected FILE.py:NAME (a torch nn.Module class or a function returning one), got {spec!r}")
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"model file {path} not found")
    module_name = "flaxcnn_torch_model_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        loader_spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - the user's file: report whatever it raised
        del sys.modules[module_name]
        raise ConfigError(f"importing {path} failed: {type(error).__name__}: {error}") from error
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        found = [n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, torch.nn.Module)
                 and v.__module__ == module_name]
        raise ConfigError(f"{path} defines no class or function {name!r}; its nn.Module classes: "
                          f"{', '.join(found) or 'none'}")
    try:
        model = factory(**kwargs)
    except TypeError as error:
        raise ConfigError(f"{name}(**{kwargs!r}) failed: {error}") from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{name}(...) returned a {type(model).__name__}, not a torch nn.Module")
    return model


def load_weights(model, path: str) -> None:
    from flaxcnn import convert

    state = convert.load_pt(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ConfigError(f"--state-dict {path} does not fit {type(model).__name__}: {error}") from None


def run(model_spec: str, input_shape: str, out: str, *, kwargs: str | None = None, state_dict: str | None = None,
        batch: int = 4, class_name: str | None = None) -> int:
    """Port, print the proof's report and where the files went; 1 when the proof fails."""
    from flaxcnn.port import port

    chw = parse_shape(input_shape)
    if batch < 2:
        raise ConfigError(f"--batch must be at least 2 (BatchNorm in training mode needs two examples), got {batch}")
    model = load_torch_model(model_spec, parse_kwargs(kwargs))
    if state_dict:
        load_weights(model, state_dict)
    x = np.random.RandomState(EXAMPLE_SEED).standard_normal((batch, *chw)).astype(np.float32)
    result = port(model, x, out_dir=out, class_name=class_name)
    if result.proof is not None:
        print(result.proof.format())
    for note in result.notes:
        print(note)
    print(f"wrote {out}/model.py (class {result.class_name}), {out}/weights.npz, {out}/parity.json")
    print(f"load it with: flaxcnn.port.load({str(out)!r}); train it with: "
          f"flaxcnn train --model {out}/model.py:{result.class_name}")
    if result.proof is not None and not result.proof.passed:
        print("the proof FAILED: the port differs from the torch model (see the table above and parity.json)")
        return 1
    return 0
