"""Train/val/test index splits for the speech data: the lab's stratified split and a speaker split.

``lab_split`` gives the same indices, in the same order, as the speech lab's two calls

    train_test_split(feats, labels, random_state=42, stratify=labels, train_size=0.8)
    train_test_split(X_val_test, y_val_test, random_state=42, stratify=y_val_test, train_size=0.5)

without importing scikit-learn: ``stratified_train_test`` re-implements what
``train_test_split(stratify=...)`` does through ``StratifiedShuffleSplit`` (scikit-learn 1.x,
checked against 1.9): sizes from ``_validate_shuffle_split``, per-class counts from
``_approximate_mode``, and every draw from one ``numpy.random.RandomState(seed)`` in the same
order. Order matters: the lab's DataLoaders do not shuffle, so batches follow these indices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flaxcnn.errors import DataError


@dataclass(frozen=True)
class SplitIndices:
    """Row indices into the full arrays for each split (int64)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Per-class draw counts summing to ``n_draws``; ties in the remainders broken with ``rng``.

    Same arithmetic and the same ``rng.choice`` calls as scikit-learn's helper, so the random
    stream stays in step with it.
    """
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            inds = rng.choice(inds, size=add_now, replace=False)
            floored[inds] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def _split_sizes(n_samples: int, train_size: float) -> tuple[int, int]:
    """(n_train, n_test) for a float ``train_size``, rounded as scikit-learn does (train floored)."""
    if not 0.0 < train_size < 1.0:
        raise DataError(f"train_size must be a fraction in (0, 1), got {train_size}")
    n_train = math.floor(train_size * n_samples)
    n_test = n_samples - n_train
    if n_train == 0 or n_test == 0:
        raise DataError(f"train_size={train_size} of {n_samples} samples leaves an empty split")
    return n_train, n_test


def stratified_train_test(
    labels: np.ndarray, train_size: float, random_state: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices, equal to ``train_test_split(..., stratify=labels)``'s choice."""
    labels = np.asarray(labels)
    n_train, n_test = _split_sizes(len(labels), train_size)
    classes, y_indices, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    if class_counts.min() < 2:
        raise DataError(
            "a stratified split needs at least 2 examples of every class; classes with one: "
            f"{classes[class_counts < 2].tolist()}"
        )
    for name, size in (("train", n_train), ("held-out", n_test)):
        if size < len(classes):
            raise DataError(
                f"the {name} part would hold {size} examples, fewer than the {len(classes)} "
                "classes a stratified split must give one each"
            )
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(random_state)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[np.integer] = []
    test: list[np.integer] = []
    for i in range(len(classes)):
        permuted = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(permuted[: n_i[i]])
        test.extend(permuted[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train).astype(np.int64), rng.permutation(test).astype(np.int64)


def lab_split(labels: np.ndarray, seed: int = 42) -> SplitIndices:
    """The lab's stratified 80/10/10 split: 80 % train, the rest halved into val and test."""
    labels = np.asarray(labels)
    train, rest = stratified_train_test(labels, 0.8, seed)
    val_in_rest, test_in_rest = stratified_train_test(labels[rest], 0.5, seed)
    return SplitIndices(train=train, val=rest[val_in_rest], test=rest[test_in_rest])


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise DataError(
            f"split fractions must be three positive numbers (train, val, test) summing to 1, "
            f"got {tuple(fractions)}"
        )
    return tuple(float(f) for f in fractions)  # type: ignore[return-value]


def speaker_split(
    speakers: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 42
) -> SplitIndices:
    """Speaker-disjoint split: every clip of a speaker lands in the same split.

    Speakers are shuffled with ``seed``. Test, then val, are filled first-fit: walking the
    shuffled speakers, a speaker joins when its clips still fit the split's share of all clips
    (the first one always joins, so no split is empty); train keeps every speaker left. Clip
    fractions thus stay at or under the val/test targets unless one speaker alone exceeds them.
    """
    _, frac_val, frac_test = _check_fractions(fractions)
    names, speaker_ids, counts = np.unique(np.asarray(speakers, dtype=str), return_inverse=True,
                                           return_counts=True)
    if len(names) < 3:
        raise DataError(f"a speaker-disjoint train/val/test split needs at least 3 speakers, got {len(names)}")
    unassigned = list(np.random.RandomState(seed).permutation(len(names)))
    assignment = np.zeros(len(names), dtype=np.int64)  # 0 train, 1 val, 2 test
    for split_id, frac in ((2, frac_test), (1, frac_val)):
        target, taken, left = frac * len(speaker_ids), 0, []
        for position, speaker in enumerate(unassigned):
            # Leave at least one speaker for each split still to fill (val and/or train).
            room = len(unassigned) - position - 1 + len(left) >= split_id
            if room and (taken == 0 or taken + counts[speaker] <= target):
                assignment[speaker] = split_id
                taken += counts[speaker]
            else:
                left.append(speaker)
        unassigned = left
    clip_split = assignment[speaker_ids]
    return SplitIndices(*(np.flatnonzero(clip_split == k).astype(np.int64) for k in range(3)))


def indices_from_membership(in_val: np.ndarray, in_test: np.ndarray) -> SplitIndices:
    """Split given boolean masks (the official validation/testing lists); train is the rest."""
    in_val, in_test = np.asarray(in_val, bool), np.asarray(in_test, bool)
    train = ~(in_val | in_test)
    return SplitIndices(*(np.flatnonzero(m).astype(np.int64) for m in (train, in_val & ~in_test, in_test)))
