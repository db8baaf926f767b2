"""Splits: the lab's stratified split index-for-index against scikit-learn, and the speaker split."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from flaxcnn.data.splits import indices_from_membership, lab_split, speaker_split, stratified_train_test
from flaxcnn.errors import DataError

SHARED = Path(os.environ.get("FLAXCNN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def sklearn_lab_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lab's two train_test_split calls, applied to row indices."""
    model_selection = pytest.importorskip("sklearn.model_selection")
    rows = np.arange(len(labels))
    train, rest, _, y_rest = model_selection.train_test_split(
        rows, labels, random_state=seed, stratify=labels, train_size=0.8
    )
    val, test, _, _ = model_selection.train_test_split(
        rest, y_rest, random_state=seed, stratify=y_rest, train_size=0.5
    )
    return train, val, test


def assert_same_as_sklearn(labels: np.ndarray, seed: int) -> None:
    ours = lab_split(labels, seed)
    for name, theirs in zip(("train", "val", "test"), sklearn_lab_split(labels, seed)):
        np.testing.assert_array_equal(getattr(ours, name), theirs, err_msg=f"{name}, seed {seed}")


def generated_labels() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    arrays = []
    for n, k in ((40, 2), (101, 5), (997, 35), (333, 3)):
        skewed = rng.choice(k, n, p=rng.dirichlet(np.full(k, 0.7)))
        arrays.append(rng.permutation(np.r_[skewed, np.repeat(np.arange(k), 10)]))
    arrays.append(np.repeat([3, 7, 11], [40, 20, 10]))  # non-contiguous, sorted, imbalanced
    arrays.append(np.array(["yes", "no", "up"] * 9))  # string labels, ties in every remainder
    return arrays


@pytest.mark.parametrize("labels", generated_labels(), ids=lambda y: f"n{len(y)}")
@pytest.mark.parametrize("seed", [42, 0, 123])
def test_lab_split_equals_sklearn_on_generated_labels(labels, seed):
    assert_same_as_sklearn(labels, seed)


def test_lab_split_equals_sklearn_on_real_labels():
    path = SHARED / "speech10" / "labels.npy"
    if not path.is_file():
        pytest.skip(f"real labels absent: {path} not found (set FLAXCNN_SHARED_DATA)")
    labels = np.load(path, allow_pickle=False)
    for seed in (42, 7):
        assert_same_as_sklearn(labels, seed)
    split = lab_split(labels)
    assert (len(split.train), len(split.val), len(split.test)) == (2648, 331, 331)


def test_lab_split_is_a_partition_with_class_proportions():
    labels = generated_labels()[2]
    split = lab_split(labels)
    everything = np.concatenate([split.train, split.val, split.test])
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(labels)))
    full = np.bincount(labels) / len(labels)
    assert np.abs(np.bincount(labels[split.train], minlength=len(full)) / len(split.train) - full).max() < 0.01


def test_stratified_split_errors():
    with pytest.raises(DataError, match="at least 2 examples"):
        stratified_train_test(np.array([0, 0, 0, 1, 2, 2]), 0.5, 0)
    with pytest.raises(DataError, match="fewer than the 4 classes"):
        stratified_train_test(np.repeat(np.arange(4), 2), 0.8, 0)
    with pytest.raises(DataError, match="train_size"):
        stratified_train_test(np.zeros(10), 1.0, 0)


def speakers_of(counts: list[int]) -> np.ndarray:
    return np.repeat([f"spk{i:03d}" for i in range(len(counts))], counts)


def test_speaker_split_is_disjoint_complete_and_seeded():
    rng = np.random.default_rng(5)
    speakers = rng.permutation(speakers_of(list(rng.integers(1, 30, 60))))
    split = speaker_split(speakers, seed=42)
    groups = [set(speakers[getattr(split, n)]) for n in ("train", "val", "test")]
    assert all(groups) and not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    np.testing.assert_array_equal(
        np.sort(np.concatenate([split.train, split.val, split.test])), np.arange(len(speakers))
    )
    for part in (split.val, split.test):
        assert 0.05 < len(part) / len(speakers) <= 0.1
    again, other = speaker_split(speakers, seed=42), speaker_split(speakers, seed=1)
    np.testing.assert_array_equal(again.test, split.test)
    assert not np.array_equal(other.test, split.test)


def test_speaker_split_with_one_dominant_speaker_keeps_every_split_non_empty():
    speakers = speakers_of([500, 3, 2, 4])
    for seed in range(10):
        split = speaker_split(speakers, seed=seed)
        assert len(split.train) and len(split.val) and len(split.test)


def test_speaker_split_errors():
    with pytest.raises(DataError, match="at least 3 speakers"):
        speaker_split(speakers_of([5, 5]))
    with pytest.raises(DataError, match="fractions"):
        speaker_split(speakers_of([5, 5, 5]), fractions=(0.8, 0.3, 0.1))
    with pytest.raises(DataError, match="fractions"):
        speaker_split(speakers_of([5, 5, 5]), fractions=(1.0, 0.0, 0.0))


def test_indices_from_membership():
    split = indices_from_membership(np.array([0, 1, 0, 0, 1], bool), np.array([0, 0, 1, 0, 0], bool))
    assert split.train.tolist() == [0, 3] and split.val.tolist() == [1, 4] and split.test.tolist() == [2]
