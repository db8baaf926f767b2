"""Training-time data augmentation, run inside the jitted train step on the device.

Every random draw comes from ``fold_in(key(seed), step)``: the same seed gives the same
augmented batches, bit for bit, and ``--resume`` continues the stream where it stopped.
Evaluation never sees any of this (only the train step calls :meth:`Augmenter.__call__`).

Spectrogram transforms (speech features ``(N, 1, T, F)``: time on axis 2, mel filters on 3):

* ``gain_db``: a random gain in ``[-gain_db, +gain_db]`` dB per clip. The features are natural
  logs of filterbank *power*, so a gain of ``g`` dB adds ``g * ln(10) / 10`` to every value.
* ``time_shift``: each clip moves by up to ``time_shift`` frames either way; frames shifted in
  repeat the clip's edge frame (background, in these 1 s clips).
* ``time_masks`` x ``time_mask_width`` and ``freq_masks`` x ``freq_mask_width``: SpecAugment
  masks (Park et al., 2019): bands of ``0..width`` consecutive frames / filters set to the clip's
  mean value.

``mixup`` (any domain; Zhang et al., 2018): each batch is blended with a permutation of itself,
``lam ~ Beta(mixup, mixup)`` per batch, and the loss is ``lam * L(y) + (1 - lam) * L(y_perm)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import jax
import jax.numpy as jnp

from flaxcnn.errors import ConfigError

#: dB of power -> natural-log units: 10 * log10(P) dB = ln(P) * 10 / ln(10).
NEPER_PER_DB = math.log(10.0) / 10.0


@dataclass(frozen=True)
class AugmentSettings:
    """What to apply; all zeros (the default, and the labs') means no augmentation."""

    time_shift: int = 0
    time_masks: int = 0
    time_mask_width: int = 0
    freq_masks: int = 0
    freq_mask_width: int = 0
    gain_db: float = 0.0
    mixup: float = 0.0

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    @property
    def spectrogram(self) -> bool:
        """Whether any transform assumes the speech feature layout."""
        return bool(self.time_shift or self.time_masks or self.freq_masks or self.gain_db)

    def validate(self) -> None:
        for name in ("time_shift", "time_masks", "time_mask_width", "freq_masks", "freq_mask_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 0, got {value!r}")
        for name in ("gain_db", "mixup"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a number >= 0, got {value!r}")
        if self.time_masks and not self.time_mask_width:
            raise ConfigError("--time-masks needs --time-mask-width >= 1 (the widest mask, in frames)")
        if self.freq_masks and not self.freq_mask_width:
            raise ConfigError("--freq-masks needs --freq-mask-width >= 1 (the widest mask, in mel filters)")


@dataclass(frozen=True)
class Augmented:
    """An augmented batch: inputs, the partner labels and the weight ``lam`` of the true labels."""

    x: jax.Array
    y_partner: jax.Array
    lam: jax.Array


class Augmenter:
    """``(x, y, step) -> Augmented``, pure and traceable, keyed by ``seed`` and the step count."""

    def __init__(self, settings: AugmentSettings, seed: int = 0):
        settings.validate()
        self.settings = settings
        self.seed = int(seed)

    def __call__(self, x: jax.Array, y: jax.Array, step: jax.Array, seed_key: jax.Array | None = None
                 ) -> Augmented:
        """``seed_key``: ``jax.random.key(seed)`` given as a (traced) value, e.g. a training
        state's ``augment_key``; None: the key of this augmenter's own ``seed``."""
        s = self.settings
        key = jax.random.fold_in(jax.random.key(self.seed) if seed_key is None else seed_key, step)
        k_gain, k_shift, k_time, k_freq, k_mix = jax.random.split(key, 5)
        if s.spectrogram and x.ndim != 4:
            raise ConfigError(f"spectrogram augmentation needs (N, C, T, F) inputs, got shape {x.shape}")
        if s.gain_db:
            x = gain(k_gain, x, s.gain_db)
        if s.time_shift:
            x = time_shift(k_shift, x, s.time_shift)
        if s.time_masks:
            x = band_masks(k_time, x, s.time_masks, s.time_mask_width, axis=2)
        if s.freq_masks:
            x = band_masks(k_freq, x, s.freq_masks, s.freq_mask_width, axis=3)
        if s.mixup:
            return mixup(k_mix, x, y, s.mixup)
        return Augmented(x, y, jnp.ones((), x.dtype))


def augmenter_for(settings: AugmentSettings, seed: int = 0) -> Augmenter | None:
    """The :class:`Augmenter` for ``settings``, or None when they augment nothing."""
    return Augmenter(settings, seed) if settings.active else None


def gain(key: jax.Array, x: jax.Array, max_db: float) -> jax.Array:
    """Add a per-clip gain of U(-max_db, max_db) dB to log-power features."""
    db = jax.random.uniform(key, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype, -max_db, max_db)
    return x + db * jnp.asarray(NEPER_PER_DB, x.dtype)


def time_shift(key: jax.Array, x: jax.Array, max_shift: int) -> jax.Array:
    """Shift each clip by U{-max_shift..max_shift} frames along axis 2, repeating edge frames."""
    n, _, t, _ = x.shape
    shift = jax.random.randint(key, (n,), -max_shift, max_shift + 1)
    source = jnp.clip(jnp.arange(t)[None, :] - shift[:, None], 0, t - 1)  # (n, t)
    return jnp.take_along_axis(x, source[:, None, :, None], axis=2)


def band_masks(key: jax.Array, x: jax.Array, count: int, max_width: int, axis: int) -> jax.Array:
    """``count`` bands of U{0..max_width} positions along ``axis`` per clip, set to the clip's mean."""
    n, size = x.shape[0], x.shape[axis]
    max_width = min(max_width, size)
    keys = jax.random.split(key, 2 * count)
    positions = jnp.arange(size)[None, :]
    masked = jnp.zeros((n, size), bool)
    for i in range(count):
        width = jax.random.randint(keys[2 * i], (n,), 0, max_width + 1)
        start = jax.random.randint(keys[2 * i + 1], (n,), 0, size - width + 1)
        masked |= (positions >= start[:, None]) & (positions < (start + width)[:, None])
    shape = [n, 1, 1, 1]
    shape[axis] = size
    fill = jnp.mean(x, axis=tuple(range(1, x.ndim)), keepdims=True)
    return jnp.where(masked.reshape(shape), fill, x)


def mixup(key: jax.Array, x: jax.Array, y: jax.Array, alpha: float) -> Augmented:
    """Blend the batch with a permutation of itself; ``lam ~ Beta(alpha, alpha)`` per batch."""
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.beta(k_lam, alpha, alpha).astype(x.dtype)
    perm = jax.random.permutation(k_perm, x.shape[0])
    return Augmented(lam * x + (1 - lam) * x[perm], y[perm], lam)
