"""The one in-memory form every data source produces: whole arrays, NCHW float32, int32 labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SplitArrays:
    """Features and labels of one split, ready for batching.

    ``x`` is float32 in the layout the labs feed their models (N, C, H, W); ``y`` is int32 class
    indices in ``[0, num_classes)``.
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"features have {len(self.x)} rows but labels have {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Dataset:
    """A loaded data set: train and test splits (val optional), class names, provenance."""

    name: str
    train: SplitArrays
    test: SplitArrays
    class_names: tuple[str, ...]
    val: SplitArrays | None = None
    source: str = ""
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])
