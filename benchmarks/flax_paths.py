"""The flaxcnn side, built from the engine's public pieces exactly as ``flaxcnn train`` builds it.

``create_state`` + ``sgd`` + ``make_train_step`` + ``EpochRunner(train_step, path)`` +
``Evaluator``: whatever those do by default is what gets benchmarked. Paths are the engine's
``--path`` values (see :mod:`flaxcnn.train.steps`) under a convolution policy
(:mod:`flaxcnn.models.conv_policy`): ``step`` (one jitted call per batch) and ``scan`` (the
epoch in one ``lax.scan``) under the default rule; ``step-xla``, the ``step`` path on XLA's
formulations alone (flaxcnn as plain JAX); ``step-tuned``, the ``step`` path under a policy file
written by ``flaxcnn tune`` (``--conv-policy FILE``). This module never imports torch, so the
process running it has its own peak RSS.
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
from flaxcnn import cpu_memory
from flaxcnn.models import conv_policy
from flaxcnn.models.registry import ModelSpec
from flaxcnn.train.optim import sgd
from flaxcnn.train.state import create_state
from flaxcnn.train.steps import EpochRunner, Evaluator, default_path, make_train_step

#: benchmark path -> (the engine's --path, the conv policy: a setting of conv_policy.from_setting,
#: or "tuned" for the file given as --conv-policy)
PATHS = {"step": ("step", "default"), "scan": ("scan", "default"), "step-xla": ("step", "xla"),
         "step-tuned": ("step", "tuned")}


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
            "freed_memory": cpu_memory.keep_freed_memory(),  # applied at process start: this reports it
            "flaxcnn_conv_policy": conv_policy.DEFAULT.describe(),
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
                 momentum: float, seed: int, init_dir: Path | None = None, policy_file: str | None = None):
        if path not in PATHS:
            raise ConfigError(f"unknown flaxcnn path {path!r}; accepted: {', '.join(PATHS)}")
        self.path, self.batch_size, self.seed = path, batch_size, seed
        engine_path, setting = PATHS[path]
        if setting == "tuned" and not policy_file:
            raise ConfigError("path step-tuned needs a policy file (--conv-policy FILE, from `flaxcnn tune`)")
        self.policy = conv_policy.from_setting(policy_file if setting == "tuned" else setting)
        model, self.init = init_weights(spec, seed, init_dir)
        conv_policy.apply(model, self.policy)
        self.record = {**self.policy.describe(),
                       "layers": conv_policy.explain(model, (batch_size, *spec.input_chw))}
        tx = sgd(lr, momentum)
        graphs, self.state = create_state(model, tx)
        self.runner = EpochRunner(make_train_step(graphs, spec.loss, tx), engine_path)
        self.evaluator = Evaluator(graphs, spec.loss, EVAL_BATCH)
        self.x, self.y = jnp.asarray(data.x), jnp.asarray(data.y, jnp.int32)

    def train_epoch(self, epoch: int) -> float:
        order = epoch_permutation(self.seed, epoch, len(self.y))
        self.state = self.runner.run(self.state, self.x, self.y, order, self.batch_size)
        return float(np.asarray(self.state.metrics.objective))  # blocks until the epoch is done

    def policy_record(self) -> dict[str, Any]:
        """The row's conv policy and what it runs for each convolution and pool of the model."""
        return self.record

    def evaluate(self, x, y) -> dict[str, float]:
        return self.evaluator(self.state, x, y)

    def eval_arrays(self, data: BenchData):
        return jnp.asarray(data.eval_x), jnp.asarray(data.eval_y, jnp.int32)
