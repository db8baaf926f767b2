"""Reader for the python-pickle release of CIFAR-10 (``cifar-10-batches-py``).

The layout is the one ``torchvision.datasets.CIFAR10(root)`` reads from
``root/cifar-10-batches-py``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and
``batches.meta``. Each batch is a pickled dict with ``data`` (uint8, N x 3072, channel-major:
1024 red, then 1024 green, then 1024 blue values of a 32 x 32 image), ``labels`` (list of int),
``filenames`` and ``batch_label``. Keys are ``bytes`` in files written by Python 3 and ``str``
after a latin1 load of the original Python 2 files; both are accepted.

Every file goes through :mod:`flaxcnn.data.safe_pickle`, so a batch cannot run code.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from flaxcnn.data.cifar_raw import (
    IMAGE_SHAPE,
    RawCifar,
    check_images,
    class_names_or_default,
)
from flaxcnn.data.safe_pickle import load_restricted
from flaxcnn.errors import DataError

PICKLE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
REQUIRED_FILES: tuple[str, ...] = (*TRAIN_FILES, TEST_FILE)


def find_pickle_folder(path: str | os.PathLike) -> Path | None:
    """The ``cifar-10-batches-py`` folder at or directly under ``path``, or None if neither.

    ``path`` counts as the folder itself when it has that name or holds any file of the layout,
    so a partial copy is reported as partial instead of as "not found".
    """
    path = Path(path)
    if (path / PICKLE_FOLDER).is_dir():
        return path / PICKLE_FOLDER
    if path.name == PICKLE_FOLDER or any((path / f).exists() for f in (*REQUIRED_FILES, META_FILE)):
        return path
    return None


def read_pickle_folder(path: str | os.PathLike) -> RawCifar:
    """Read all batches at ``path`` (the folder or its parent) into a :class:`RawCifar`."""
    folder = find_pickle_folder(path) or Path(path)
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"{folder} is not a complete {PICKLE_FOLDER} folder: missing {', '.join(missing)} "
            f"(a complete folder holds {', '.join(REQUIRED_FILES)} and {META_FILE}). Extract "
            "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html again."
        )
    train = [read_batch(folder / f) for f in TRAIN_FILES]
    test_x, test_y = read_batch(folder / TEST_FILE)
    return RawCifar(
        train_x=np.concatenate([x for x, _ in train]),
        train_y=np.concatenate([y for _, y in train]),
        test_x=test_x,
        test_y=test_y,
        class_names=read_class_names(folder / META_FILE),
        kind="pickle",
        origin=f"CIFAR-10 python batches in {folder}",
        location=str(folder),
    )


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 images (N, 3, 32, 32), int64 labels (N,))."""
    return parse_batch(text_keys(load_restricted(path), path), path)


def parse_batch(entry: dict[str, object], path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of an unpickled batch ``entry`` (str keys), checked; ``path`` names it."""
    if "data" not in entry or "labels" not in entry:
        raise DataError(
            f"{path} is not a CIFAR-10 batch: it needs 'data' and 'labels' entries, "
            f"found {sorted(entry)}"
        )
    data, labels = entry["data"], entry["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != int(np.prod(IMAGE_SHAPE)):
        raise DataError(
            f"{path}: 'data' must be a uint8 array of shape (N, 3072), "
            f"got {type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}"
        )
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{path}: 'labels' must be a list of int ({e})") from e
    # Channel-major rows are exactly C x H x W in C order: a reshape, no copy.
    images = data.reshape(-1, *IMAGE_SHAPE)
    check_images(images, y, str(path))
    return images, y


def read_class_names(meta_path: Path) -> tuple[str, ...]:
    """``label_names`` from ``batches.meta``; the standard ten names if the file is absent."""
    if not meta_path.is_file():
        return class_names_or_default(None)
    meta = text_keys(load_restricted(meta_path), meta_path)
    return class_names_or_default(meta.get("label_names"))


def text_keys(obj: object, path: Path) -> dict[str, object]:
    """The unpickled dict of a batch with ``bytes`` keys decoded; DataError if not a dict."""
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR-10 batch")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}
