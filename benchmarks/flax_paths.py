"""The flaxcnn side, built from the engine's public pieces exactly as ``flaxcnn train`` builds it.

``create_state`` + ``sgd`` + ``make_train_step`` + ``EpochRunner(train_step, path)`` +
``Evaluator``: whatever those do by default is what gets benchmarked. Paths are the engine's
``--path`` values (see :mod:`flaxcnn.train.steps`): ``step`` (one jitted call per batch) and
``scan`` (the epoch in one ``lax.scan``), each with the CPU implementations dispatch measured
fastest (``--conv-impl auto``, the default; on ``step`` also the fastest whole-step variant,
:mod:`flaxcnn.train.step_choice`, always timed here: the benchmark stands for long runs); ``step-xla`` and ``step-kernels`` are the ``step``
path with ``--conv-impl xla`` (XLA's formulations only: flaxcnn as plain JAX) and ``kernels``
(the C++ kernels wherever they apply). This module never imports torch, so the process running
it has its own peak RSS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.data import BenchData
from benchmarks.timing import EVAL_BATCH
from flaxcnn.convert import load_torch_state_dict
from flaxcnn.data.batching import epoch_permutation
from flaxcnn.errors import ConfigError
from flaxcnn.models import dispatch
from flaxcnn.models.registry import ModelSpec
from flaxcnn.train.optim import sgd
from flaxcnn.train.state import create_state
from flaxcnn.train.steps import EpochRunner, Evaluator, default_path, make_train_step

#: benchmark path -> (the engine's --path, the --conv-impl setting)
PATHS = {"step": ("step", "auto"), "scan": ("scan", "auto"), "step-xla": ("step", "xla"),
         "step-kernels": ("step", "kernels")}


def setup_jax(device: str) -> None:
    """``gpu``: full float32 matmuls (no TF32) and a GPU backend, or a ConfigError."""
    if device == "gpu":
        jax.config.update("jax_default_matmul_precision", "highest")
        if jax.default_backend() != "gpu":
            raise ConfigError(f"--device gpu: JAX {jax.__version__} has no GPU backend "
                              f"(default backend: {jax.default_backend()}); use --device cpu")


def jax_info() -> dict[str, Any]:
    import os

    import flax

    return {"jax": jax.__version__, "flax": flax.__version__, "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()], "flaxcnn_default_path": default_path(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "flaxcnn_cpu_dispatch": dispatch.summary(),
            "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision)}


def init_weights(spec: ModelSpec, seed: int, init_dir: Path | None):
    """The model with the PyTorch process's saved init when there is one, else flaxcnn's
    torch-style init under ``seed``; returns the model and which init it got."""
    model = spec.build(seed=seed, init="torch")
    saved = Path(init_dir) / f"{spec.name}.npz" if init_dir is not None else None
    if saved is not None and saved.exists():
        with np.load(saved) as arrays:
            load_torch_state_dict(model, dict(arrays))
        return model, "the PyTorch process's init"
    return model, "flaxcnn's torch-style init (no PyTorch init saved)"


class FlaxTrainer:
    """One model trained by the engine's ``EpochRunner`` in one of :data:`PATHS`."""

    def __init__(self, spec: ModelSpec, path: str, data: BenchData, batch_size: int, *, lr: float,
                 momentum: float, seed: int, init_dir: Path | None = None):
        if path not in PATHS:
            raise ConfigError(f"unknown flaxcnn path {path!r}; accepted: {', '.join(PATHS)}")
        self.path, self.batch_size, self.seed = path, batch_size, seed
        engine_path, self.conv_impl = PATHS[path]
        model, self.init = init_weights(spec, seed, init_dir)
        tx = sgd(lr, momentum)
        graphs, self.state = create_state(model, tx)
        self.runner = EpochRunner(make_train_step(graphs, spec.loss, tx), engine_path)
        self.evaluator = Evaluator(graphs, spec.loss, EVAL_BATCH)
        self.x, self.y = jnp.asarray(data.x), jnp.asarray(data.y, jnp.int32)

    def train_epoch(self, epoch: int) -> float:
        # this row's setting, in force while its steps are traced (rows are timed interleaved);
        # the record of what it uses starts with its first epoch
        dispatch.set_mode(self.conv_impl)
        if epoch == 0:
            dispatch.reset_used()
        order = epoch_permutation(self.seed, epoch, len(self.y))
        self.state = self.runner.run(self.state, self.x, self.y, order, self.batch_size)
        return float(np.asarray(self.state.metrics)[0])  # blocks until the epoch is done

    def dispatch_record(self) -> dict[str, Any]:
        """The CPU implementation setting and every layer's choices while this row ran."""
        return dispatch.summary()

    def evaluate(self, x, y) -> dict[str, float]:
        dispatch.set_mode(self.conv_impl)
        return self.evaluator(self.state, x, y)

    def eval_arrays(self, data: BenchData):
        return jnp.asarray(data.eval_x), jnp.asarray(data.eval_y, jnp.int32)
