"""Reader for ``cifar10`` prepared by tensorflow_datasets, through ``tfds.data_source``.

``tfds.data_source`` reads the ArrayRecord files of a prepared data set with random access and
needs no TensorFlow. tensorflow_datasets is an optional extra, imported only when this source
is used. Nothing is downloaded: ``download=False`` always.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from flaxcnn.data.cifar_raw import RawCifar, class_names_or_default
from flaxcnn.extras import require
from flaxcnn.errors import DataError

TFDS_NAME = "cifar10"
PREPARE_HINT = (
    f"prepare it once with `tfds build {TFDS_NAME} --file_format=array_record --data_dir DIR` "
    "(needs internet)"
)


def default_tfds_dir() -> Path:
    """The folder tfds uses when given no data_dir (same rule as tfds: $TFDS_DATA_DIR or ~)."""
    return Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets"))


def has_tfds_cifar10(data_dir: str | os.PathLike, *, prepared: bool = False) -> bool:
    """Whether ``data_dir`` holds a ``cifar10`` folder (with ``prepared``: a written version)."""
    folder = Path(data_dir) / TFDS_NAME
    if not prepared:
        return folder.is_dir()
    return any(folder.glob("*/dataset_info.json"))


def import_tfds() -> ModuleType:
    """tensorflow_datasets, or a one-line error that says how to install it."""
    return require("tensorflow_datasets", "reading CIFAR-10 from a tensorflow_datasets folder")


def read_tfds(data_dir: str | os.PathLike | None) -> RawCifar:
    """Both splits of tfds ``cifar10`` under ``data_dir`` (None: the tfds default folder)."""
    folder = Path(data_dir) if data_dir is not None else default_tfds_dir()
    if not has_tfds_cifar10(folder):
        raise DataError(f"{folder} holds no tfds {TFDS_NAME} folder; {PREPARE_HINT}")
    tfds = import_tfds()
    train_x, train_y, names = _read_split(tfds, folder, "train")
    test_x, test_y, _ = _read_split(tfds, folder, "test")
    return RawCifar(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        class_names=names,
        kind="tfds",
        origin=f"tensorflow_datasets {TFDS_NAME} in {folder}",
        location=str(folder),
    )


def _read_split(tfds: Any, folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    try:
        source = tfds.data_source(TFDS_NAME, split=split, data_dir=os.fspath(folder), download=False)
    except NotImplementedError as e:  # prepared as TFRecord: no random access
        raise DataError(
            f"tfds {TFDS_NAME} in {folder} is not stored as ArrayRecord, which tfds.data_source "
            f"needs: {PREPARE_HINT} into another folder ({e})"
        ) from e
    except Exception as e:  # noqa: BLE001 - tfds raises many types for a missing/broken folder
        raise DataError(
            f"cannot open tfds {TFDS_NAME} split {split!r} in {folder}: {e}; {PREPARE_HINT}"
        ) from e
    # Each record is a PNG decoded on access; reading them one by one is inherent to the format.
    examples = list(source)
    if not examples:
        raise DataError(f"tfds {TFDS_NAME} split {split!r} in {folder} is empty")
    images = np.stack([np.asarray(ex["image"]) for ex in examples])
    labels = np.asarray([ex["label"] for ex in examples], dtype=np.int64)
    if images.shape[1:] != (32, 32, 3):
        raise DataError(
            f"tfds {TFDS_NAME} in {folder}: images have shape {images.shape[1:]}, "
            "expected (32, 32, 3)"
        )
    names = class_names_or_default(list(source.dataset_info.features["label"].names))
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels, names
