"""Pixel scaling and per-channel standardisation, as ``ToTensor()`` + ``Normalize(mean, std)``.

The CIFAR-2 lab computes ``imgs.view(3, -1).mean(dim=1)`` and ``.std(dim=1)`` of the
``ToTensor`` images; torch's ``std`` is the unbiased one, so :func:`channel_stats` uses
``ddof=1``. (The lab then trains on the un-normalised tensors anyway; here the statistics are
applied to every split.)
"""

from __future__ import annotations

import numpy as np

from flaxcnn.errors import DataError

_LEVELS = np.arange(256, dtype=np.float64) / 255.0


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and unbiased std of uint8 images (N, C, H, W), in ``[0, 1]`` units.

    Computed exactly from a 256-bin histogram per channel, so memory stays at one byte per
    pixel however large the split is.
    """
    if x.dtype != np.uint8 or x.ndim != 4:
        raise DataError(f"channel_stats needs uint8 images (N, C, H, W), got {x.dtype} {x.shape}")
    count = x.shape[0] * x.shape[2] * x.shape[3]
    if count < 2:
        raise DataError("channel statistics need at least two pixel values per channel")
    hist = np.stack([np.bincount(x[:, c].ravel(), minlength=256) for c in range(x.shape[1])])
    mean = hist @ _LEVELS / count
    var = (hist * (_LEVELS[None, :] - mean[:, None]) ** 2).sum(axis=1) / (count - 1)
    return mean, np.sqrt(var)


def to_unit_float(x: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in ``[0, 1]``, dividing by 255 like ``ToTensor`` (bit-identical)."""
    out = x.astype(np.float32)
    out /= np.float32(255.0)
    return out


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` per channel of float32 NCHW ``x``, in place, in float32 like torch."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x -= np.asarray(mean, dtype=np.float32).reshape(shape)
    x /= np.asarray(std, dtype=np.float32).reshape(shape)
    return x
