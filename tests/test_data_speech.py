"""load_speech on generated npy and wav folders, its errors, tfds without TensorFlow, real speech10."""

from __future__ import annotations

import importlib.util
import os
import wave
from pathlib import Path

import numpy as np
import pytest

from flaxcnn.data import tfds_speech
from flaxcnn.data.logfbank import clips_to_features
from flaxcnn.data.speech import load_speech
from flaxcnn.data.splits import lab_split
from flaxcnn.data.wav import read_wav
from flaxcnn.errors import ConfigError, DataError

SHARED = Path(os.environ.get("FLAXCNN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
WORDS = ("no", "up", "yes")


# --- fixtures ---------------------------------------------------------------------------------


def write_npy_folder(root: Path, n: int = 60, k: int = 3, *, classes: bool = True,
                     files_csv: bool = True, features: np.ndarray | None = None,
                     labels: np.ndarray | None = None) -> Path:
    """The lab's layout with random features, balanced labels and 12 speakers."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    labels = np.arange(n) % k if labels is None else labels
    features = rng.normal(-5, 3, (n, 99, 26)).astype(np.float32) if features is None else features
    np.save(root / "melspec_feats.npy", features)
    np.save(root / "labels.npy", labels)
    if classes:
        (root / "classes.txt").write_text("".join(f"word{i}\n" for i in range(k)))
    if files_csv:
        lines = ["index,label,word,file,speaker"] + [
            f"{i},{y},word{y},s{i % 12}_nohash_{i}.wav,s{i % 12}" for i, y in enumerate(labels)
        ]
        (root / "files.csv").write_text("\n".join(lines) + "\n")
    return root


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000, channels: int = 1, width: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as wf:
        wf.setnchannels(channels)
        wf.setsampwidth(width)
        wf.setframerate(rate)
        wf.writeframes(samples.tobytes())


def write_wav_folder(root: Path, speakers: int = 5, per_speaker: int = 2) -> Path:
    """<word>/<speaker>_nohash_<n>.wav clips of varying length, a background-noise folder, lists."""
    rng = np.random.default_rng(1)
    for word in WORDS:
        for s in range(speakers):
            for n in range(per_speaker):
                length = int(rng.choice([9000, 16000, 17000]))
                write_wav(root / word / f"spk{s}_nohash_{n}.wav",
                          rng.integers(-3000, 3000, length).astype("<i2"))
    write_wav(root / "_background_noise_" / "noise.wav", np.zeros(100, "<u1"), rate=44100, width=1)
    (root / "validation_list.txt").write_text("no/spk0_nohash_0.wav\nyes/spk1_nohash_1.wav\nup/missing.wav\n")
    (root / "testing_list.txt").write_text("up/spk2_nohash_0.wav\nup/spk2_nohash_1.wav\n")
    return root


@pytest.fixture()
def npy_dir(tmp_path: Path) -> Path:
    return write_npy_folder(tmp_path / "speech")


@pytest.fixture(scope="module")
def wav_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wav_folder(tmp_path_factory.mktemp("wavs"))


# --- npy layout -------------------------------------------------------------------------------


def test_npy_lab_split_matches_lab_indices_without_normalization(npy_dir):
    ds = load_speech(npy_dir)
    feats, labels = np.load(npy_dir / "melspec_feats.npy"), np.load(npy_dir / "labels.npy")
    split = lab_split(labels, 42)
    for name in ("train", "val", "test"):
        part, rows = getattr(ds, name), getattr(split, name)
        assert part.x.shape == (len(rows), 1, 99, 26) and part.x.dtype == np.float32
        assert part.y.dtype == np.int32
        np.testing.assert_array_equal(part.x[:, 0], feats[rows])  # raw values: no normalisation
        np.testing.assert_array_equal(part.y, labels[rows])
    assert ds.name == "speech" and ds.class_names == ("word0", "word1", "word2")
    assert ds.input_shape == (1, 99, 26)
    assert ds.info["split"] == "lab" and ds.info["layout"] == "npy"
    assert str(npy_dir) in ds.source


def test_npy_seed_changes_split(npy_dir):
    assert not np.array_equal(load_speech(npy_dir, seed=42).test.x, load_speech(npy_dir, seed=1).test.x)


def test_npy_without_classes_txt_names_labels_by_number(tmp_path):
    ds = load_speech(write_npy_folder(tmp_path / "d", classes=False))
    assert ds.class_names == ("0", "1", "2")


def test_num_classes_widens_label_space_and_must_cover_labels(npy_dir):
    ds = load_speech(npy_dir, num_classes=35)
    assert ds.num_classes == 35 and ds.class_names[:3] == ("word0", "word1", "word2")
    assert ds.info["classes_in_data"] == 3
    with pytest.raises(DataError, match="num_classes=2"):
        load_speech(npy_dir, num_classes=2)
    with pytest.raises(ConfigError, match="num_classes"):
        load_speech(npy_dir, num_classes=0)


def test_npy_speaker_split_is_speaker_disjoint(npy_dir):
    ds = load_speech(npy_dir, split="speaker")
    speaker_of_row = {i: f"s{i % 12}" for i in range(60)}
    feats = np.load(npy_dir / "melspec_feats.npy")
    row_of = {feats[i].tobytes(): i for i in range(len(feats))}
    groups = [{speaker_of_row[row_of[x[0].tobytes()]] for x in getattr(ds, n).x} for n in ("train", "val", "test")]
    assert all(groups) and not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert sum(ds.info["split_sizes"].values()) == 60


def test_npy_speaker_split_needs_files_csv(tmp_path):
    with pytest.raises(DataError, match="files.csv"):
        load_speech(write_npy_folder(tmp_path / "d", files_csv=False), split="speaker")


def test_npy_official_split_is_refused(npy_dir):
    with pytest.raises(DataError, match="validation_list.txt"):
        load_speech(npy_dir, split="official")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"features": np.zeros((60, 26, 99), np.float32)}, r"\(60, 26, 99\) - it looks transposed"),
        ({"features": np.zeros((60, 2574), np.float32)}, r"expected \(N, 99, 26\)"),
        ({"labels": np.arange(59) % 3}, "59 labels but melspec_feats.npy has 60"),
        ({"labels": np.arange(60) % 5}, "label 4 but .*classes.txt names only 3"),
        ({"labels": np.arange(60) % 3 - 1}, "negative labels"),
        ({"labels": (np.arange(60) % 3).astype(float)}, "expected \\(N,\\) integers"),
    ],
    ids=["transposed", "2-D", "length mismatch", "out of range", "negative", "float labels"],
)
def test_npy_errors(tmp_path, kwargs, pattern):
    root = write_npy_folder(tmp_path / "d", **kwargs)
    with pytest.raises(DataError, match=pattern):
        load_speech(root)


def test_pickled_array_is_refused(tmp_path):
    root = write_npy_folder(tmp_path / "d")
    np.save(root / "labels.npy", np.array([{"a": 1}] * 60, dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="labels.npy is not a readable numeric"):
        load_speech(root)


# --- arguments and folders --------------------------------------------------------------------


def test_unknown_split_and_source_list_accepted_values(npy_dir):
    with pytest.raises(ConfigError, match="lab, speaker, official"):
        load_speech(npy_dir, split="random")
    with pytest.raises(ConfigError, match="auto, npy, wav, tfds"):
        load_speech(npy_dir, source="mp3")


def test_missing_and_unrecognised_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist.*accepted layouts"):
        load_speech(tmp_path / "nope")
    (tmp_path / "empty" / "yes").mkdir(parents=True)  # a word folder without clips
    with pytest.raises(DataError, match="no speech data in a known layout.*melspec_feats.npy"):
        load_speech(tmp_path / "empty")
    with pytest.raises(DataError, match=r"no <word>/\*.wav folders"):
        load_speech(tmp_path / "empty", source="wav")
    with pytest.raises(DataError, match="melspec_feats.npy is missing"):
        load_speech(tmp_path / "empty", source="npy")


# --- wav layout -------------------------------------------------------------------------------


def test_wav_folder_features_labels_and_ignored_noise(wav_dir):
    ds = load_speech(wav_dir, source="wav")
    assert ds.class_names == WORDS and ds.info["layout"] == "wav"
    assert ds.info["num_examples"] == 30  # _background_noise_ (44.1 kHz, 8-bit) was skipped
    clips = [read_wav(p) for w in WORDS for p in sorted((wav_dir / w).glob("*.wav"))]
    expected = clips_to_features(clips)
    rows = lab_split(np.repeat(np.arange(3), 10), 42).test
    np.testing.assert_allclose(ds.test.x[:, 0], expected[rows], atol=1e-5)


def test_wav_official_split_follows_lists(wav_dir):
    ds = load_speech(wav_dir, split="official")
    assert ds.info["split_sizes"] == {"train": 26, "val": 2, "test": 2}
    assert sorted(ds.test.y.tolist()) == [1, 1] and sorted(ds.val.y.tolist()) == [0, 2]


def test_wav_speaker_split_uses_file_names(wav_dir):
    ds = load_speech(wav_dir, split="speaker")
    assert sum(ds.info["speakers"].values()) == 5  # five speakers, none shared between splits
    assert all(ds.info["split_sizes"].values())


def test_wav_subfolder_is_found_and_lists_are_optional(tmp_path):
    root = tmp_path / "data"
    for word in WORDS:
        for s in range(10):
            write_wav(root / "wav" / word / f"p{s}_nohash_0.wav", np.full(16000, 100 * s, "<i2"))
    assert load_speech(root).info["layout"] == "wav"
    with pytest.raises(DataError, match="testing_list.txt"):
        load_speech(root, split="official")


@pytest.mark.parametrize(
    ("params", "what"),
    [({"rate": 8000}, "8000 Hz, 1 channel"), ({"channels": 2}, "16000 Hz, 2 channel"), ({"width": 1}, r"16000 Hz, 1 channel\(s\), 8-bit")],
)
def test_wav_of_wrong_format_names_file_and_format(tmp_path, params, what):
    root = tmp_path / "bad"
    write_wav(root / "yes" / "a_nohash_0.wav", np.zeros(16000, "<i2"))
    samples = np.zeros(800, "<u1" if params.get("width") == 1 else "<i2")
    write_wav(root / "no" / "b_nohash_0.wav", samples, **params)
    with pytest.raises(DataError, match=f"b_nohash_0.wav: has {what}.*accepted: 16 kHz mono 16-bit PCM"):
        load_speech(root)


def test_wav_that_is_not_a_wav(tmp_path):
    root = tmp_path / "junk"
    (root / "yes").mkdir(parents=True)
    (root / "yes" / "x_nohash_0.wav").write_bytes(b"not a riff file")
    with pytest.raises(DataError, match="x_nohash_0.wav: not a readable PCM wav"):
        load_speech(root)


# --- tfds ---------------------------------------------------------------------------------------


def test_tfds_without_tensorflow_is_a_clean_error(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        tfds_speech.importlib.util, "find_spec",
        lambda name, *a: None if name == "tensorflow" else real_find_spec(name, *a),
    )
    with pytest.raises(DataError, match="needs TensorFlow.*pip install") as info:
        load_speech(tmp_path, source="tfds")
    assert info.value.__cause__ is None and "speech_commands" in str(info.value)


# --- real data ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech10() -> Path:
    root = SHARED / "speech10"
    if not (root / "melspec_feats.npy").is_file():
        pytest.skip(f"real data absent: {root} not found (set FLAXCNN_SHARED_DATA)")
    return root


def test_real_speech10_lab_split(speech10):
    ds = load_speech(speech10)
    total = sum(len(getattr(ds, n)) for n in ("train", "val", "test"))
    assert (total, *ds.input_shape) == (3310, 1, 99, 26)
    assert ds.num_classes == 10 and ds.class_names[0] == "down" and ds.class_names[-1] == "yes"
    assert (len(ds.train), len(ds.val), len(ds.test)) == (2648, 331, 331)


def test_real_speech10_speaker_split(speech10):
    ds = load_speech(speech10, split="speaker")
    assert sum(ds.info["split_sizes"].values()) == 3310
    assert sum(ds.info["speakers"].values()) == 224  # each speaker counted in one split only
