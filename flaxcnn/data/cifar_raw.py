"""What every CIFAR-10 reader hands over before class selection: uint8 NCHW images, original ids."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flaxcnn.errors import DataError

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

IMAGE_SHAPE: tuple[int, int, int] = (3, 32, 32)


@dataclass(frozen=True)
class RawCifar:
    """Both splits as stored: ``x`` uint8 (N, 3, 32, 32), ``y`` int64 original label ids 0..9.

    ``kind`` is one of ``"pickle"``, ``"tfds"``, ``"sample"``; ``origin`` is a phrase saying
    where the images came from and ``note`` an optional remark, both for ``Dataset.source``;
    ``location`` is the folder or file read.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: tuple[str, ...]
    kind: str
    origin: str
    location: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            check_images(x, y, f"{self.origin} ({split} split)")


def check_images(x: np.ndarray, y: np.ndarray, where: str) -> None:
    """Raise DataError unless ``x`` is uint8 (N, 3, 32, 32) and ``y`` holds N ids in 0..9."""
    if x.dtype != np.uint8 or x.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{where}: images must be uint8 of shape (N, 3, 32, 32), got {x.dtype} {x.shape}"
        )
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{where}: expected {len(x)} integer labels for {len(x)} images, "
            f"got {y.dtype} of shape {y.shape}"
        )
    if len(y) and (y.min() < 0 or y.max() >= len(CIFAR10_CLASSES)):
        raise DataError(
            f"{where}: labels must be CIFAR-10 ids 0..9, found values in [{y.min()}, {y.max()}]"
        )


def class_names_or_default(names: object) -> tuple[str, ...]:
    """Ten class names as ``str``; anything else (missing, wrong length, digits only) -> defaults."""
    if not isinstance(names, (list, tuple)) or len(names) != len(CIFAR10_CLASSES):
        return CIFAR10_CLASSES
    text = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    if text == tuple(str(i) for i in range(len(text))):  # placeholder names, e.g. tfds mocks
        return CIFAR10_CLASSES
    return text
