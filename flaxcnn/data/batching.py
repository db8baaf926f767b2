"""Shuffled mini-batches over whole in-memory arrays.

Semantics follow ``torch.utils.data.DataLoader(shuffle=True, drop_last=False)``: every index
once per epoch, the last batch may be smaller. The order is a pure function of
``(seed, epoch)``, so a resumed run sees the same batches. :func:`stack_epoch` lays an epoch out
as ``(n // B, B, ...)`` full batches plus the remainder, so a jitted step (or ``lax.scan``) sees
one static batch shape and the partial batch is handled by one extra call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from flaxcnn.errors import ConfigError


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` as int, or ConfigError unless it is an integer >= 1."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """A permutation of ``range(n)`` determined by ``(seed, epoch)`` alone (int64)."""
    if seed < 0 or epoch < 0 or n < 0:
        raise ConfigError(f"seed, epoch and n must be >= 0, got seed={seed}, epoch={epoch}, n={n}")
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_slices(n: int, batch_size: int, *, drop_last: bool = False) -> list[slice]:
    """Consecutive slices covering ``range(n)``; the last one is shorter unless ``drop_last``."""
    batch_size = check_batch_size(batch_size)
    stop = n - n % batch_size if drop_last else n
    return [slice(i, min(i + batch_size, n)) for i in range(0, stop, batch_size)]


def iter_index_batches(
    order: np.ndarray, batch_size: int, *, drop_last: bool = False
) -> Iterator[np.ndarray]:
    """Index arrays of one epoch in ``order`` (e.g. :func:`epoch_permutation`), batch by batch."""
    for s in batch_slices(len(order), batch_size, drop_last=drop_last):
        yield order[s]


@dataclass(frozen=True)
class StackedEpoch:
    """One epoch of arrays: ``full[i]`` is (n // B, B, ...); ``rest[i]`` is (n % B, ...)."""

    full: tuple[np.ndarray, ...]
    rest: tuple[np.ndarray, ...]

    @property
    def num_full(self) -> int:
        return int(self.full[0].shape[0])

    @property
    def rest_size(self) -> int:
        return int(self.rest[0].shape[0])


def stack_epoch(arrays: Sequence[np.ndarray], order: np.ndarray | None, batch_size: int) -> StackedEpoch:
    """Gather ``arrays`` (same length) in ``order`` and split them into full batches + remainder.

    ``order=None`` keeps the stored order (evaluation). One gather per array, then reshapes
    (views): no per-sample work in Python.
    """
    batch_size = check_batch_size(batch_size)
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ConfigError(f"arrays to batch differ in length: {[len(a) for a in arrays]}")
    if order is not None and len(order) != n:
        raise ConfigError(f"order has {len(order)} indices for {n} rows")
    gathered = [a if order is None else a[order] for a in arrays]
    k = n // batch_size
    cut = k * batch_size
    return StackedEpoch(
        full=tuple(g[:cut].reshape(k, batch_size, *g.shape[1:]) for g in gathered),
        rest=tuple(g[cut:] for g in gathered),
    )
