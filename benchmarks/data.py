"""The arrays both frameworks train on: synthetic data of a model's input shape, or real data.

Each worker process rebuilds the same arrays from the same arguments (the generator is seeded),
so the frameworks see identical inputs without shipping arrays between processes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

from flaxcnn.errors import ConfigError
from flaxcnn.models.registry import ModelSpec


@dataclass(frozen=True)
class BenchData:
    """Training arrays (NCHW float32, int32 labels) and the split evaluated for eval throughput."""

    x: np.ndarray
    y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    source: str


def num_classes(spec: ModelSpec) -> int:
    """The model's default number of outputs (the lab's: 2 for CIFAR-2, 35 for speech commands)."""
    if "num_classes" in spec.kwargs:
        return int(spec.kwargs["num_classes"])
    return int(inspect.signature(spec.flax_class.__init__).parameters["num_classes"].default)


def synthetic(spec: ModelSpec, samples: int, seed: int) -> BenchData:
    """Standard-normal images and uniform labels; the eval split is the training array itself."""
    rng = np.random.default_rng([seed, samples])
    x = rng.standard_normal(spec.example_shape(samples), dtype=np.float32)
    y = rng.integers(0, num_classes(spec), samples).astype(np.int32)
    return BenchData(x, y, x, y, f"synthetic N(0, 1), seed {seed}")


def real(spec: ModelSpec, data_dir: str, samples: int) -> BenchData:
    """The first ``samples`` training examples of the real data set (normalized by flaxcnn's
    loader) and its whole test split for evaluation."""
    from flaxcnn.data import load_dataset

    dataset = load_dataset("cifar2" if spec.domain == "cifar" else "speech", data_dir)
    if dataset.input_shape != tuple(spec.input_chw):
        raise ConfigError(f"{data_dir} holds inputs of shape {dataset.input_shape}, model {spec.name!r} "
                          f"takes {tuple(spec.input_chw)}")
    train = dataset.train
    n = min(samples, len(train))
    return BenchData(train.x[:n], train.y[:n], dataset.test.x, dataset.test.y, dataset.source)


def bench_data(spec: ModelSpec, samples: int, seed: int, data_dirs: dict[str, str | None]) -> BenchData:
    """Real data when a folder is given for the model's domain (``cifar`` / ``speech``), else synthetic."""
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    folder = data_dirs.get(spec.domain)
    return real(spec, folder, samples) if folder else synthetic(spec, samples, seed)
