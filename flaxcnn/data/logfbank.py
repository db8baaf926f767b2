"""Log mel filterbank energies, a JAX port of ``python_speech_features.logfbank`` at its defaults.

The speech lab's ``melspec_feats.npy`` holds ``logfbank(signal, 16000)`` of 1 s clips whose
samples are the raw int16 values (not scaled to [-1, 1]). This module reproduces that
computation step for step so raw wav folders give the same features as the shipped ``.npy``:

1. pre-emphasis ``y[0] = x[0]; y[t] = x[t] - 0.97 x[t-1]``;
2. framing into 25 ms frames every 10 ms (lengths rounded half-up to samples), zero-padding the
   tail so the last frame is full, rectangular window;
3. power spectrum ``|rfft(frame, 512)|^2 / 512``;
4. a triangular mel filterbank whose edges are *floored* to FFT bins
   (``floor((nfft + 1) * hz / samplerate)``), exactly as the reference builds it;
5. energies equal to zero replaced by float64 machine epsilon, then the natural log.

The filterbank is built once in numpy float64 (it is a constant); the signal path runs in JAX
float32, jitted and vectorised over a batch of equal-length signals.
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Iterable
from functools import lru_cache, partial
from itertools import islice

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
CLIP_SAMPLES = 16000
WINLEN_S = 0.025
WINSTEP_S = 0.01
NFILT = 26
NFFT = 512
PREEMPH = 0.97
#: What the reference substitutes for a zero filterbank energy before the log.
ENERGY_FLOOR = float(np.finfo(np.float64).eps)


def _round_half_up(x: float) -> int:
    """The reference rounds frame sizes with Decimal ROUND_HALF_UP, not banker's rounding."""
    return int(decimal.Decimal(x).quantize(decimal.Decimal("1"), rounding=decimal.ROUND_HALF_UP))


def frame_geometry(num_samples: int, samplerate: int = SAMPLE_RATE) -> tuple[int, int, int]:
    """(frame_len, frame_step, num_frames) the reference uses for a signal of ``num_samples``."""
    frame_len = _round_half_up(WINLEN_S * samplerate)
    frame_step = _round_half_up(WINSTEP_S * samplerate)
    if num_samples <= frame_len:
        num_frames = 1
    else:
        num_frames = 1 + int(math.ceil((1.0 * num_samples - frame_len) / frame_step))
    return frame_len, frame_step, num_frames


def _hz2mel(hz: np.ndarray) -> np.ndarray:
    return 2595 * np.log10(1 + hz / 700.0)


def _mel2hz(mel: np.ndarray) -> np.ndarray:
    return 700 * (10 ** (mel / 2595.0) - 1)


@lru_cache(maxsize=8)
def mel_filterbank(
    nfilt: int = NFILT, nfft: int = NFFT, samplerate: int = SAMPLE_RATE,
    lowfreq: float = 0.0, highfreq: float | None = None,
) -> np.ndarray:
    """The reference's (nfilt, nfft // 2 + 1) triangular filters, float64, read-only."""
    highfreq = highfreq or samplerate / 2
    melpoints = np.linspace(_hz2mel(lowfreq), _hz2mel(highfreq), nfilt + 2)
    edges = np.floor((nfft + 1) * _mel2hz(melpoints) / samplerate)
    bins = np.arange(nfft // 2 + 1, dtype=np.float64)[None, :]
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    # Same values as the reference's two loops: rising edge on [lo, mid), falling on [mid, hi).
    with np.errstate(divide="ignore", invalid="ignore"):
        rising = np.where((bins >= lo) & (bins < mid), (bins - lo) / (mid - lo), 0.0)
        falling = np.where((bins >= mid) & (bins < hi), (hi - bins) / (hi - mid), 0.0)
    fb = rising + falling
    fb.setflags(write=False)
    return fb


@partial(jax.jit, static_argnames=("samplerate",))
def logfbank(signals: jax.Array, samplerate: int = SAMPLE_RATE) -> jax.Array:
    """Log mel filterbank energies of a batch of signals, float32.

    ``signals``: (B, T) or (T,) samples on the int16 scale (the lab's features were computed from
    raw int16 values). Returns (B, num_frames, 26) or (num_frames, 26); a 16000-sample clip gives
    99 frames.
    """
    x = jnp.asarray(signals, dtype=jnp.float32)
    single = x.ndim == 1
    x = jnp.atleast_2d(x)
    frame_len, frame_step, num_frames = frame_geometry(x.shape[-1], samplerate)

    emphasised = jnp.concatenate([x[:, :1], x[:, 1:] - PREEMPH * x[:, :-1]], axis=1)
    pad = (num_frames - 1) * frame_step + frame_len - x.shape[-1]
    emphasised = jnp.pad(emphasised, ((0, 0), (0, pad)))
    index = np.arange(frame_len)[None, :] + frame_step * np.arange(num_frames)[:, None]
    frames = emphasised[:, index]  # (B, F, frame_len)

    spectrum = jnp.fft.rfft(frames, n=NFFT, axis=-1)
    power = (1.0 / NFFT) * (spectrum.real**2 + spectrum.imag**2)
    fb = jnp.asarray(mel_filterbank(samplerate=samplerate).T, dtype=jnp.float32)
    # HIGHEST keeps GPUs from using TF32 here, which alone would cost ~1e-3 in the log.
    energies = jnp.matmul(power, fb, precision=jax.lax.Precision.HIGHEST)
    energies = jnp.where(energies == 0, jnp.float32(ENERGY_FLOOR), energies)
    out = jnp.log(energies)
    return out[0] if single else out


def fit_length(samples: np.ndarray, length: int = CLIP_SAMPLES) -> np.ndarray:
    """Zero-pad or trim the last axis to ``length`` samples (the lab's clips are 1 s)."""
    n = samples.shape[-1]
    if n >= length:
        return samples[..., :length]
    pad = [(0, 0)] * (samples.ndim - 1) + [(0, length - n)]
    return np.pad(samples, pad)


def clips_to_features(clips: Iterable[np.ndarray], batch_size: int = 256) -> np.ndarray:
    """Features (N, 99, 26) float32 of int16 clips of any length, padded/trimmed to 1 s.

    ``clips`` may be a generator: only one batch of signals is held at a time, so a whole
    Speech Commands release (~105k clips) streams from disk. Every batch has the same size
    (the last one zero-padded) so the jitted function compiles once.
    """
    iterator = iter(clips)
    out = []
    while batch := [fit_length(np.asarray(c, dtype=np.float32)) for c in islice(iterator, batch_size)]:
        signals = np.stack(batch)
        if out:  # a short last batch reuses the compiled full-batch shape
            signals = np.pad(signals, ((0, batch_size - len(batch)), (0, 0)))
        out.append(np.asarray(logfbank(signals))[: len(batch)])
    if not out:
        return np.zeros((0, frame_geometry(CLIP_SAMPLES)[2], NFILT), np.float32)
    return np.concatenate(out, axis=0)
