"""Hostile and broken data files that tests/test_data_cifar.py and test_data_speech.py do not cover.

Already covered there (and listed in docs/faults.md): malicious pickles in data_batch_N, truncated
and garbage batches, malformed batch contents and labels outside 0..9, missing and empty folders,
transposed or 2-D speech features, label/row count mismatch, labels beyond classes.txt, negative
labels, pickled .npy arrays, wavs of the wrong rate / channels / width and non-wav files.
"""

from __future__ import annotations

import os
import pickle
import wave
from pathlib import Path

import numpy as np
import pytest

from flaxcnn.data import load_dataset
from flaxcnn.data.speech import MAX_CLASSES, load_speech
from flaxcnn.errors import DataError


class MarkerPayload:
    """Unpickling this runs ``touch marker`` if the loader lets it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_cifar_folder(root: Path, per_batch: int = 20) -> Path:
    """A complete cifar-10-batches-py folder in the release's pickle format (labels 0..9)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        entry = {b"data": x, b"labels": [i % 10 for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"n%d" % i for i in range(10)]}))
    return root


def write_npy_folder(root: Path, features: np.ndarray | None = None, labels: np.ndarray | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(root / "melspec_feats.npy", rng.normal(size=(30, 99, 26)).astype(np.float32) if features is None
            else features)
    np.save(root / "labels.npy", np.arange(30) % 3 if labels is None else labels)
    return root


def write_wav(path: Path, samples: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(16000)
        wf.writeframes(samples.astype("<i2").tobytes())


@pytest.fixture()
def wav_folder(tmp_path: Path) -> Path:
    for word in ("no", "yes"):
        for i in range(10):
            write_wav(tmp_path / "wavs" / word / f"s{i}_nohash_0.wav", np.full(16000, i, np.int16))
    return tmp_path / "wavs"


# ---------------------------------------------------------------- CIFAR


def test_malicious_batches_meta_is_refused_and_never_runs(tmp_path):
    """The class-name file goes through the same restricted unpickler as the batches."""
    root = write_cifar_folder(tmp_path / "data")
    marker = tmp_path / "pwned"
    meta = root / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({b"label_names": MarkerPayload(marker)}))
    with pytest.raises(DataError) as err:
        load_dataset("cifar2", root)
    assert "refused to load" in str(err.value) and str(meta) in str(err.value) and "system" in str(err.value)
    assert not marker.exists()


def test_malicious_batch_through_the_cli_exits_2_and_never_runs(tmp_path, capsys):
    from flaxcnn.cli import main

    root = write_cifar_folder(tmp_path / "data")
    marker = tmp_path / "pwned"
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(MarkerPayload(marker)))
    code = main(["train", "--data-dir", str(root), "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("flaxcnn: error: refused to load") and "test_batch" in err and "Traceback" not in err
    assert not marker.exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("name", ["cifar2", "speech"])
def test_data_dir_that_is_a_file(tmp_path, name):
    path = tmp_path / "not-a-folder"
    path.write_text("x")
    with pytest.raises(DataError, match=f"{path} does not exist or is not a folder"):
        load_dataset(name, path)


# ---------------------------------------------------------------- speech arrays


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_features_with_nan_or_inf_are_refused(tmp_path, bad):
    features = np.random.default_rng(0).normal(size=(30, 99, 26)).astype(np.float32)
    features[7, 50, 3] = bad
    root = write_npy_folder(tmp_path / "d", features=features)
    with pytest.raises(DataError, match="melspec_feats.npy holds NaN or infinite values"):
        load_speech(root)


@pytest.mark.parametrize(
    "features, labels, pattern",
    [(np.zeros((0, 99, 26), np.float32), np.zeros(0, int), r"holds no clips \(shape \(0, 99, 26\)\)"),
     (np.zeros((30, 99, 26), np.complex64), None, "dtype complex64; expected a float array"),
     (None, np.where(np.arange(30) == 4, 10**6, np.arange(30) % 3), f"label 1000000; .* below {MAX_CLASSES}"),
     (None, np.arange(30, dtype=np.uint64) % 3 + np.uint64(2**63), f"below {MAX_CLASSES}")],
    ids=["no clips", "complex features", "huge label", "uint64 label past int64"],
)
def test_bad_arrays(tmp_path, features, labels, pattern):
    root = write_npy_folder(tmp_path / "d", features=features, labels=labels)
    with pytest.raises(DataError, match=pattern):
        load_speech(root)


@pytest.mark.parametrize("cut", ["half", "header only", "empty"])
def test_truncated_npy_names_the_file(tmp_path, cut):
    root = write_npy_folder(tmp_path / "d")
    target = root / "melspec_feats.npy"
    data = target.read_bytes()
    target.write_bytes({"half": data[: len(data) // 2], "header only": data[:128], "empty": b""}[cut])
    with pytest.raises(DataError, match=f"{target} is not a readable numeric .npy array"):
        load_speech(root)


def test_binary_classes_txt(tmp_path):
    root = write_npy_folder(tmp_path / "d")
    (root / "classes.txt").write_bytes(b"\xff\xfe\x00\x01binary")
    with pytest.raises(DataError, match="classes.txt is not UTF-8 text"):
        load_speech(root)


# ---------------------------------------------------------------- speech wav folders


@pytest.mark.parametrize("cut", [1, 1001])
def test_truncated_wav_names_the_file(wav_folder, cut):
    """A copy cut short (by an odd or even number of bytes): the header's sample count disagrees."""
    target = wav_folder / "yes" / "s3_nohash_0.wav"
    target.write_bytes(target.read_bytes()[:-cut])
    with pytest.raises(DataError, match=f"{target}: truncated: its header announces 16000 samples"):
        load_speech(wav_folder)


@pytest.mark.parametrize("kind", ["folder", "broken link"])
def test_unreadable_wav_entries_name_the_path(wav_folder, kind):
    target = wav_folder / "no" / "zz_nohash_0.wav"
    if kind == "folder":
        target.mkdir()
    else:
        target.symlink_to(wav_folder / "missing.wav")
    with pytest.raises(DataError, match=f"{target}: cannot read"):
        load_speech(wav_folder)


def test_clean_wav_folder_still_loads(wav_folder):
    """The checks above refuse only what is broken."""
    ds = load_speech(wav_folder)
    assert ds.class_names == ("no", "yes") and len(ds.train) + len(ds.val) + len(ds.test) == 20
