"""``flaxcnn port``: a PyTorch CNN -> a readable Flax NNX module, its weights and a proof.

    result = flaxcnn.port.port(torch_model, example_nchw_batch, out_dir="port-out")
    model = flaxcnn.port.load("port-out")                 # model.py's top class + weights.npz

The model is traced with torch.fx (:mod:`flaxcnn.port.capture`), written as one NNX class per
torch class (:mod:`flaxcnn.port.codegen`), built from that source with the torch weights
(:mod:`flaxcnn.convert`) and proven equal to the torch model in float32 and float64
(:mod:`flaxcnn.port.proof`). ``DIR`` holds ``model.py``, ``weights.npz`` (the torch state dict,
keyed and shaped as torch's, as numpy arrays) and ``parity.json``; it is written into a
temporary folder beside ``DIR`` and renamed at the end, so a failed port leaves nothing behind.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxcnn import convert
from flaxcnn.errors import ConfigError
from flaxcnn.port.errors import TraceControlFlowError, UnsupportedModelError

MODEL_FILE, WEIGHTS_FILE, PARITY_FILE = "model.py", "weights.npz", "parity.json"
#: logsumexp of a log-probability row is 0; the tolerance the proof uses to call an output log-probabilities
LOG_PROBABILITY_TOL = 1e-4


@dataclass
class PortResult:
    module: nnx.Module  # float32, torch weights loaded
    source: str  # model.py text
    class_name: str
    proof: Any | None  # flaxcnn.port.proof.Proof
    out_dir: Path | None
    notes: list[str] = field(default_factory=list)  # e.g. why there is no proof


def _proof_module():
    """flaxcnn.port.proof, or None where this installation has none."""
    if importlib.util.find_spec("flaxcnn.port.proof") is None:
        return None
    return importlib.import_module("flaxcnn.port.proof")


def choose_loss(torch_output) -> str:
    """The proof's rule (``flaxcnn.port.proof.choose_loss``), with the same rule locally where the
    proof module is absent: nll for log-probability rows, cross-entropy for other 2-D outputs,
    mse otherwise."""
    if isinstance(torch_output, (tuple, list)) and torch_output:
        torch_output = torch_output[0]  # a model with several outputs: its first decides
    proof = _proof_module()
    if proof is not None:
        return proof.choose_loss(torch_output)
    import torch

    if not isinstance(torch_output, torch.Tensor) or torch_output.ndim != 2:
        return "mse"
    lse = torch.logsumexp(torch_output.detach().double(), dim=1)
    return "nll" if bool(torch.all(lse.abs() < LOG_PROBABILITY_TOL)) else "cross_entropy"


def exec_source(source: str, filename: str = "<flaxcnn port model.py>") -> dict:
    """The namespace of the generated ``model.py`` source (run in a fresh namespace, not imported)."""
    namespace: dict = {"__name__": "flaxcnn_port_model"}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated source
    return namespace


def _rngs(seed: int = 0) -> nnx.Rngs:
    return nnx.Rngs(params=seed, dropout=seed + 1)


def build(cls: type, dtype, state_dict: Mapping[str, object] | None) -> nnx.Module:
    """``cls(dtype=dtype)`` with ``state_dict`` (torch-keyed) converted into it (cast to ``dtype``).
    Call it inside ``with jax.enable_x64(True):`` for float64."""
    model = cls(dtype=dtype, rngs=_rngs())
    if state_dict is not None:
        convert.load_torch_state_dict(model, state_dict)
    return model


def build_from_source(source: str, class_name: str, dtype=jnp.float32, state_dict=None) -> nnx.Module:
    """An instance of ``class_name`` from generated ``source``, with ``state_dict`` loaded."""
    namespace = exec_source(source)
    if class_name not in namespace:
        raise ConfigError(f"the generated source defines no class {class_name!r}")
    return build(namespace[class_name], dtype, state_dict)


def _numpy_state(torch_module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in torch_module.state_dict().items()}


def _example(example_input) -> np.ndarray:
    if hasattr(example_input, "detach"):
        example_input = example_input.detach().cpu().numpy()
    x = np.asarray(example_input)
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(f"example_input must be one float NCHW batch (N, C, H, W), got shape {x.shape} "
                          f"dtype {x.dtype}")
    return x.astype(np.float32)


def port(torch_module, example_input, *, out_dir: str | os.PathLike | None = None, class_name: str | None = None,
         prove: bool = True) -> PortResult:
    """Port ``torch_module`` (not modified) traced on ``example_input`` (one NCHW batch).

    Raises :class:`UnsupportedModelError` (every unsupported node listed) or
    :class:`TraceControlFlowError` before anything is written. With ``out_dir``, writes
    model.py, weights.npz and parity.json there (replacing an earlier port) and the returned
    module is the one :func:`load` builds from those files.
    """
    from flaxcnn.port import codegen
    from flaxcnn.port.capture import capture

    x = _example(example_input)
    if class_name is not None and not re.fullmatch(r"[A-Za-z_]\w*", class_name):
        raise ConfigError(f"class_name must be a Python identifier, got {class_name!r}")
    captured = capture(torch_module, x)
    name = class_name or type(torch_module).__name__
    source = codegen.generate(captured, class_name=name, loss=choose_loss(captured.torch_output))
    state = _numpy_state(torch_module)
    cls = exec_source(source)[name]

    def build_flax(dtype) -> nnx.Module:
        return build(cls, dtype, state)

    module = build_flax(jnp.float32)
    proof, notes = None, []
    if prove:
        proof_module = _proof_module()
        if proof_module is None:
            notes.append("no proof: flaxcnn.port.proof is not available in this installation")
        else:
            proof = proof_module.prove(torch_module, build_flax, x)
    target = None
    if out_dir is not None:
        target = write(out_dir, source, state, proof)
        module = load(target)
    return PortResult(module, source, name, proof, target, notes)


def write(out_dir: str | os.PathLike, source: str, state: Mapping[str, np.ndarray], proof) -> Path:
    """Write DIR/model.py, weights.npz, parity.json through a temporary folder beside DIR."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = None
    try:
        (tmp / MODEL_FILE).write_text(source)
        np.savez(tmp / WEIGHTS_FILE, **state)
        parity = proof.as_json() if proof is not None else {"passed": None, "note": "no proof was run"}
        (tmp / PARITY_FILE).write_text(json.dumps(parity, indent=2) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.rename(out, old / out.name)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists() and (old / out.name).exists():
            os.rename(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def top_class_name(source: str) -> str:
    """The class of a generated model.py that declares ``input_chw`` (the top class)."""
    found = None
    top = r"^class (\w+)\(nnx\.(?:Module|Sequential)\):\n(?:(?:    .*)?\n)*?    input_chw = "
    for match in re.finditer(top, source, re.M):
        found = match.group(1)
    if found is None:
        raise ConfigError("model.py has no nnx.Module class declaring input_chw (the ported model's top class)")
    return found


def load(out_dir: str | os.PathLike, dtype=jnp.float32) -> nnx.Module:
    """DIR/model.py's top class built in ``dtype`` with DIR/weights.npz (the torch initial or
    given weights). For float64, call it inside ``with jax.enable_x64(True):``."""
    from flaxcnn.models.from_file import load_class

    out = Path(out_dir)
    model_file, weights = out / MODEL_FILE, out / WEIGHTS_FILE
    for path in (model_file, weights):
        if not path.is_file():
            raise ConfigError(f"{path} not found: {out} is not a `flaxcnn port` output folder")
    cls = load_class(f"{model_file}:{top_class_name(model_file.read_text())}")
    with np.load(weights) as arrays:
        return build(cls, dtype, dict(arrays))


__all__ = ["PortResult", "port", "load", "build_from_source", "exec_source", "choose_loss", "write",
           "UnsupportedModelError", "TraceControlFlowError"]
