"""Epoch permutations and batch layouts: coverage, sizes, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from flaxcnn.data.batching import (
    batch_slices,
    check_batch_size,
    epoch_permutation,
    iter_index_batches,
    stack_epoch,
)
from flaxcnn.errors import ConfigError

SIZES = [(10, 3), (9, 3), (2, 5), (64, 64), (1000, 64), (1, 1), (0, 4)]


@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_epoch_permutation_is_a_permutation(n):
    perm = epoch_permutation(0, 0, n)
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))


def test_epoch_permutation_depends_only_on_seed_and_epoch():
    np.testing.assert_array_equal(epoch_permutation(5, 2, 500), epoch_permutation(5, 2, 500))
    assert not np.array_equal(epoch_permutation(5, 2, 500), epoch_permutation(5, 3, 500))
    assert not np.array_equal(epoch_permutation(5, 2, 500), epoch_permutation(6, 2, 500))
    # (seed, epoch) is not collapsed into one number: (1, 2) and (2, 1) differ
    assert not np.array_equal(epoch_permutation(1, 2, 500), epoch_permutation(2, 1, 500))


def test_epoch_permutation_rejects_negative_arguments():
    for args in ((-1, 0, 5), (0, -1, 5), (0, 0, -5)):
        with pytest.raises(ConfigError):
            epoch_permutation(*args)


@pytest.mark.parametrize("n, batch_size", SIZES)
def test_batch_slices_cover_every_index_once_like_torch(n, batch_size):
    slices = batch_slices(n, batch_size)
    sizes = [s.stop - s.start for s in slices]
    assert len(slices) == -(-n // batch_size)  # ceil: the partial batch is kept
    assert all(size == batch_size for size in sizes[:-1])
    if n:
        assert sizes[-1] == (n % batch_size or batch_size)
    covered = np.concatenate([np.arange(n)[s] for s in slices]) if slices else np.array([], int)
    np.testing.assert_array_equal(covered, np.arange(n))


def test_batch_slices_drop_last():
    assert [s.stop - s.start for s in batch_slices(10, 3, drop_last=True)] == [3, 3, 3]
    assert batch_slices(2, 5, drop_last=True) == []


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "64", None])
def test_batch_size_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="batch size"):
        check_batch_size(bad)
    with pytest.raises(ConfigError):
        batch_slices(10, bad)
    with pytest.raises(ConfigError):
        stack_epoch([np.zeros(10)], None, bad)


def test_index_batches_of_a_shuffled_epoch():
    perm = epoch_permutation(1, 0, 103)
    batches = list(iter_index_batches(perm, 10))
    assert [len(b) for b in batches] == [10] * 10 + [3]
    np.testing.assert_array_equal(np.concatenate(batches), perm)
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(103))


@pytest.mark.parametrize("n, batch_size", SIZES)
def test_stack_epoch_shapes_and_content(n, batch_size):
    x = np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3)
    y = np.arange(n, dtype=np.int32)
    order = epoch_permutation(7, 1, n)
    epoch = stack_epoch([x, y], order, batch_size)
    k, r = divmod(n, batch_size)
    assert epoch.full[0].shape == (k, batch_size, 2, 3) and epoch.full[1].shape == (k, batch_size)
    assert epoch.rest[0].shape == (r, 2, 3) and epoch.rest[1].shape == (r,)
    assert epoch.num_full == k and epoch.rest_size == r
    ys = np.concatenate([epoch.full[1].reshape(-1), epoch.rest[1]])
    np.testing.assert_array_equal(ys, order)  # every row once, in the epoch's order
    xs = np.concatenate([epoch.full[0].reshape(-1, 2, 3), epoch.rest[0]])
    np.testing.assert_array_equal(xs, x[ys])  # features stay with their labels


def test_stack_epoch_without_order_keeps_stored_order():
    y = np.arange(10)
    epoch = stack_epoch([y], None, 4)
    np.testing.assert_array_equal(epoch.full[0], [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(epoch.rest[0], [8, 9])


def test_stack_epoch_checks_lengths():
    with pytest.raises(ConfigError, match="differ in length"):
        stack_epoch([np.zeros(5), np.zeros(4)], None, 2)
    with pytest.raises(ConfigError, match="order has 3 indices"):
        stack_epoch([np.zeros(5)], np.arange(3), 2)
