"""On-device augmentation: each transform does what it says, draws are keyed by seed and step,
training with it is reproducible bit for bit, evaluation never sees it, bad settings are refused."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn.data.arrays import Dataset, SplitArrays
from flaxcnn.errors import ConfigError
from flaxcnn.train import augment as aug
from flaxcnn.train.config import PRESETS, TrainConfig
from flaxcnn.train.loop import build_session, train_epoch

KEY = jax.random.key(0)


def _clips(n: int = 8, t: int = 99, f: int = 26) -> jax.Array:
    return jax.random.normal(jax.random.key(1), (n, 1, t, f)) * 3 - 5


def test_gain_adds_one_constant_per_clip_in_log_power_units():
    x = _clips()
    out = aug.gain(KEY, x, 6.0)
    delta = np.asarray(out - x)
    per_clip = delta.reshape(len(x), -1)
    assert np.allclose(per_clip, per_clip[:, :1], atol=1e-5)  # one value per clip
    assert np.all(np.abs(per_clip[:, 0]) <= 6.0 * math.log(10) / 10 + 1e-6)
    assert len(np.unique(np.round(per_clip[:, 0], 5))) > 1  # clips get different gains


def test_time_shift_moves_frames_and_repeats_the_edge():
    t = 99
    ramp = jnp.broadcast_to(jnp.arange(t, dtype=jnp.float32)[None, None, :, None], (16, 1, t, 26))
    out = np.asarray(aug.time_shift(KEY, ramp, 5))
    shifts = out[:, 0, 50, 0] - 50  # frame 50 now holds frame 50 - shift
    assert np.all(np.abs(shifts) <= 5) and len(np.unique(shifts)) > 1
    for clip, s in zip(out, -shifts):
        expected = np.clip(np.arange(t) - s, 0, t - 1)
        np.testing.assert_array_equal(clip[0, :, 0], expected)


@pytest.mark.parametrize("axis,size", [(2, 99), (3, 26)])
def test_band_masks_set_contiguous_bands_to_the_clip_mean(axis, size):
    x = _clips()
    out = np.asarray(aug.band_masks(KEY, x, 1, 7, axis=axis))
    xs = np.asarray(x)
    changed = np.any(out != xs, axis=tuple(a for a in (1, 2, 3) if a != axis))  # (n, size)
    assert changed.any()
    for i in range(len(xs)):
        band = np.flatnonzero(changed[i])
        if len(band):
            assert band[-1] - band[0] + 1 == len(band) <= 7  # one contiguous band, at most 7 wide
            taken = np.take(out[i:i + 1], band, axis=axis)
            np.testing.assert_allclose(taken, xs[i].mean(), rtol=1e-5)


def test_mixup_blends_with_a_permutation():
    x, y = _clips(), jnp.arange(8, dtype=jnp.int32)
    mixed = aug.mixup(KEY, x, y, 0.4)
    lam = float(mixed.lam)
    assert 0.0 <= lam <= 1.0
    partner = np.asarray(mixed.y_partner)
    assert sorted(partner.tolist()) == list(range(8))
    np.testing.assert_allclose(np.asarray(mixed.x), lam * np.asarray(x) + (1 - lam) * np.asarray(x)[partner],
                               rtol=1e-5, atol=1e-5)


def test_augmenter_draws_depend_on_seed_and_step_only():
    settings = aug.AugmentSettings(time_shift=8, time_masks=2, time_mask_width=10, freq_masks=1,
                                   freq_mask_width=4, gain_db=6.0)
    x, y = _clips(), jnp.zeros(8, jnp.int32)
    a = aug.Augmenter(settings, 3)(x, y, jnp.int32(5)).x
    b = aug.Augmenter(settings, 3)(x, y, jnp.int32(5)).x
    c = aug.Augmenter(settings, 3)(x, y, jnp.int32(6)).x
    d = aug.Augmenter(settings, 4)(x, y, jnp.int32(5)).x
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert not np.array_equal(np.asarray(a), np.asarray(d))


def _speech_dataset(n: int = 48) -> Dataset:
    rng = np.random.default_rng(0)
    y = (np.arange(n) % 3).astype(np.int32)
    x = (rng.normal(-5, 3, (n, 1, 99, 26)) + y[:, None, None, None]).astype(np.float32)
    split = SplitArrays(x, y)
    return Dataset("speech", split, split, ("a", "b", "c"))


AUG = dict(time_shift=6, time_masks=1, time_mask_width=8, freq_masks=1, freq_mask_width=3, gain_db=4.0, mixup=0.3)


def _params_after_epoch(dataset: Dataset, **fields) -> tuple:
    config = TrainConfig(model="speechnet", dataset="speech", batch_size=16, epochs=1, lr=0.01, seed=0, **fields)
    session = build_session(config, dataset)
    state, _, _ = train_epoch(session, session.state, 1)
    return [np.asarray(v) for v in jax.tree.leaves(state.params)], session, state


def test_training_with_augmentation_is_reproducible_and_differs_from_none():
    dataset = _speech_dataset()
    first, session, state = _params_after_epoch(dataset, **AUG)
    again, _, _ = _params_after_epoch(dataset, **AUG)
    plain, _, _ = _params_after_epoch(dataset)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # same seed, same bits
    assert not all(np.array_equal(a, b) for a, b in zip(first, plain))
    # Evaluation is never augmented: two evaluations of the same state agree exactly, and equal
    # a forward pass of the un-augmented inputs.
    x, y = session.device_arrays["test"]
    one, two = session.evaluate(state, "test"), session.evaluate(state, "test")
    assert one == two
    from flax import nnx

    out = nnx.merge(session.graphs.eval, state.params, state.rest)(x)
    assert one["accuracy"] == pytest.approx(float(jnp.mean(jnp.argmax(out, 1) == y)))


@pytest.mark.parametrize("fields,message", [
    (dict(time_shift=-1), "--time-shift must be an integer >= 0"),
    (dict(time_masks=2), "--time-masks needs --time-mask-width"),
    (dict(freq_masks=1), "--freq-masks needs --freq-mask-width"),
    (dict(gain_db=float("nan")), "--gain-db must be a number >= 0"),
    (dict(mixup=-0.2), "--mixup must be a number >= 0"),
])
def test_bad_settings_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(model="speechnet", dataset="speech", **fields).validate()


def test_spectrogram_augmentation_is_refused_for_images_but_mixup_is_not():
    with pytest.raises(ConfigError, match="speech features only"):
        TrainConfig(model="net", dataset="cifar2", time_shift=4).validate()
    TrainConfig(model="net", dataset="cifar2", mixup=0.2).validate()


def test_lab_presets_do_not_augment():
    for name, (_, overrides) in PRESETS.items():
        if name.startswith(("lab8", "speech-convnet")):
            assert not TrainConfig(**overrides).augment_settings().active, name
