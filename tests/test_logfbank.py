"""The JAX log mel filterbank against python_speech_features (a test-only dependency)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flaxcnn.data.logfbank import clips_to_features, frame_geometry, logfbank, mel_filterbank
from flaxcnn.data.wav import read_wav

psf = pytest.importorskip("python_speech_features")

TOLERANCE = 1e-3
SHARED = Path(os.environ.get("FLAXCNN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SPEECH10 = SHARED / "speech10"


def reference(signal: np.ndarray) -> np.ndarray:
    return psf.logfbank(np.asarray(signal, dtype=np.float64), 16000)


def generated_signals() -> dict[str, np.ndarray]:
    """1 s int16-scale test signals covering tones, noise, silence, a padded short clip."""
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    short = np.zeros(16000)
    short[:5000] = np.round(8000 * np.sin(2 * np.pi * 440 * t[:5000]))
    return {
        "sine sweep": np.round(12000 * np.sin(2 * np.pi * (100 * t + 3900 * t**2))),
        "white noise": np.clip(np.round(rng.normal(0, 3000, 16000)), -32768, 32767),
        "silence": np.zeros(16000),
        "short clip padded": short,
        "one-LSB noise": np.round(rng.normal(0, 1, 16000)),
        "loud low tone": np.round(30000 * np.sin(2 * np.pi * 300 * t)),
    }


def test_filterbank_equals_reference():
    for nfilt, nfft in ((26, 512), (20, 512), (40, 1024)):
        ours = mel_filterbank(nfilt=nfilt, nfft=nfft)
        np.testing.assert_array_equal(ours, psf.get_filterbanks(nfilt, nfft, 16000, 0, None))


def test_frame_geometry_matches_reference_rounding():
    assert frame_geometry(16000) == (400, 160, 99)
    assert frame_geometry(400)[2] == 1 and frame_geometry(120)[2] == 1
    for n in (401, 561, 8000, 16001):
        assert frame_geometry(n)[2] == len(psf.sigproc.framesig(np.zeros(n), 400, 160))


def test_generated_signals_match_reference_batched():
    signals = generated_signals()
    ours = np.asarray(logfbank(np.stack(list(signals.values()))))
    assert ours.shape == (len(signals), 99, 26) and ours.dtype == np.float32
    diffs = {name: float(np.abs(ours[i] - reference(s)).max()) for i, (name, s) in enumerate(signals.items())}
    print("max |diff| vs python_speech_features:", diffs)
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_single_signal_and_other_lengths():
    signal = generated_signals()["sine sweep"][:7000]
    ours = np.asarray(logfbank(signal))
    assert ours.shape == reference(signal).shape == (43, 26)
    assert np.abs(ours - reference(signal)).max() <= TOLERANCE


def test_clips_to_features_pads_and_trims_to_one_second():
    rng = np.random.default_rng(1)
    clips = [rng.integers(-2000, 2000, n).astype(np.int16) for n in (9000, 16000, 17500)]
    feats = clips_to_features(clips, batch_size=2)  # exercises a padded last batch
    assert feats.shape == (3, 99, 26)
    for clip, feat in zip(clips, feats):
        fitted = np.zeros(16000)
        fitted[: min(len(clip), 16000)] = clip[:16000]
        assert np.abs(feat - reference(fitted)).max() <= TOLERANCE


def test_front_end_does_not_import_test_only_packages():
    code = (
        "import sys, flaxcnn.data.speech, flaxcnn.data.logfbank, flaxcnn.data.splits;"
        "bad = [m for m in ('python_speech_features', 'sklearn', 'tensorflow', 'tensorflow_datasets', 'scipy')"
        " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _shared_clips() -> list[tuple[str, str, np.ndarray]]:
    wav_dir = SPEECH10 / "wav"
    if not wav_dir.is_dir():
        pytest.skip(f"real clips absent: {wav_dir} not found (set FLAXCNN_SHARED_DATA)")
    return [(p.parent.name, p.name, read_wav(p)) for p in sorted(wav_dir.glob("*/*.wav"))]


def test_real_clips_match_reference():
    clips = _shared_clips()
    feats = clips_to_features([c for _, _, c in clips])
    worst = 0.0
    for (_, _, clip), feat in zip(clips, feats):
        fitted = np.zeros(16000)
        fitted[: min(len(clip), 16000)] = clip[:16000]
        worst = max(worst, float(np.abs(feat - reference(fitted)).max()))
    print(f"{len(clips)} real clips: max |diff| vs python_speech_features = {worst:.3g}")
    assert worst <= TOLERANCE


def test_real_clips_reproduce_shipped_features_on_int16_scale():
    clips = _shared_clips()
    with (SPEECH10 / "files.csv").open(newline="") as f:
        row_of = {(r["word"], r["file"]): int(r["index"]) for r in csv.DictReader(f)}
    shipped = np.load(SPEECH10 / "melspec_feats.npy", allow_pickle=False)
    matched = [(row_of[(w, n)], c) for w, n, c in clips if (w, n) in row_of]
    assert matched, "no shared clip is listed in files.csv"
    rows = np.array([r for r, _ in matched])
    raw = clips_to_features([c for _, c in matched])
    scaled = clips_to_features([c.astype(np.float32) / 32768.0 for _, c in matched])
    raw_diff = float(np.abs(raw - shipped[rows]).max())
    scaled_diff = float(np.abs(scaled - shipped[rows]).max())
    print(f"{len(matched)} clips vs melspec_feats.npy: int16 scale {raw_diff:.3g}, [-1, 1] scale {scaled_diff:.3g}")
    assert raw_diff <= TOLERANCE
    assert scaled_diff > 20.0  # 2 * ln(32768): the lab did not rescale to [-1, 1]
