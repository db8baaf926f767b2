"""Data sources for both labs -> one in-memory :class:`~flaxcnn.data.arrays.Dataset`.

``load_dataset`` is what the engine and CLI call; the per-source readers live in
``cifar*.py`` / ``tfds_cifar.py`` (CIFAR) and ``speech.py`` / ``wav.py`` / ``logfbank.py``
/ ``tfds_speech.py`` (speech), batching in ``batching.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from flaxcnn.data.arrays import Dataset, SplitArrays
from flaxcnn.errors import ConfigError

DATASETS = ("cifar2", "cifar10", "cifar", "speech")

__all__ = ["DATASETS", "Dataset", "SplitArrays", "load_dataset", "dataset_domain"]


def dataset_domain(name: str) -> str:
    """"cifar" or "speech": which family of models fits the data set."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return "speech" if name == "speech" else "cifar"


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    classes: Sequence[int] | None = None,
    split: str = "lab",
    val_fraction: float = 0.0,
    split_seed: int = 42,
    source: str = "auto",
) -> Dataset:
    """Load a data set by name.

    ``cifar2``: airplane/bird (ids 0, 2) unless ``classes`` says otherwise; ``cifar10``: all ten
    classes; ``cifar``: exactly ``classes``. ``speech``: the speech lab's features from
    ``data_dir`` (required) with ``split`` lab / speaker / official.
    ``split_seed`` fixes every split and hold-out (42, the lab's ``random_state``), so runs
    with different training seeds are scored on the same examples.
    """
    domain = dataset_domain(name)
    if domain == "speech":
        if data_dir is None:
            raise ConfigError(
                "the speech data set needs --data-dir: a folder with melspec_feats.npy + labels.npy "
                "(the lab's files) or a Speech Commands folder of <word>/*.wav clips"
            )
        if classes is not None:
            raise ConfigError("--classes applies to CIFAR data sets only")
        from flaxcnn.data.speech import load_speech

        return load_speech(data_dir, split=split, source=source, seed=split_seed)
    from flaxcnn.data.cifar import load_cifar

    if classes is None:
        if name == "cifar":
            raise ConfigError("dataset 'cifar' needs --classes, e.g. --classes 3,5")
        classes = tuple(range(10)) if name == "cifar10" else (0, 2)
    return load_cifar(data_dir, classes, source=source, val_fraction=val_fraction, seed=split_seed)
