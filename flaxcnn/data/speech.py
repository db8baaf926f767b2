"""Speech commands data for the speech lab's ConvNet: three layouts in, one :class:`Dataset` out.

Accepted layouts of ``data_dir``:

* ``npy`` - the lab's arrays: ``melspec_feats.npy`` (N, 99, 26) log mel filterbank energies and
  ``labels.npy`` (N,) integer labels; optional ``classes.txt`` (one name per line, label = line
  number) and ``files.csv`` (column ``speaker``, needed by ``split="speaker"``).
* ``wav`` - a Speech Commands folder ``<word>/<speaker>_nohash_<n>.wav`` (16 kHz mono 16-bit),
  either ``data_dir`` itself or ``data_dir/wav``; ``_background_noise_`` and other ``_*`` folders
  are ignored; optional ``validation_list.txt`` / ``testing_list.txt`` as in the official release;
  optional ``classes.txt`` fixing the label order (default: sorted folder names). Features are
  computed on load with :func:`flaxcnn.data.logfbank.logfbank`, identical to the lab's.
* ``tfds`` - a tfds data folder holding a prepared ``speech_commands`` (needs TensorFlow; 12 labels).

Like the lab, features are not normalised: the model sees raw log energies.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flaxcnn.data.arrays import Dataset, SplitArrays
from flaxcnn.data.logfbank import NFILT, clips_to_features, frame_geometry
from flaxcnn.data.splits import SplitIndices, indices_from_membership, lab_split, speaker_split
from flaxcnn.data.wav import read_list_file, read_wav, scan_wav_folder, word_folders
from flaxcnn.errors import ConfigError, DataError

SPLITS = ("lab", "speaker", "official")
SOURCES = ("auto", "npy", "wav", "tfds")
FEATURES_FILE = "melspec_feats.npy"
LABELS_FILE = "labels.npy"
CLASSES_FILE = "classes.txt"
FILES_CSV = "files.csv"
VALIDATION_LIST = "validation_list.txt"
TESTING_LIST = "testing_list.txt"
FEATURE_SHAPE = (frame_geometry(16000)[2], NFILT)  # (99, 26)
#: Labels index a class-name tuple and the model's output layer: a bound keeps a stray huge
#: label from allocating millions of classes.
MAX_CLASSES = 10_000
ACCEPTED_LAYOUTS = (
    f"accepted layouts: (npy) {FEATURES_FILE} of shape (N, {FEATURE_SHAPE[0]}, {FEATURE_SHAPE[1]}) + "
    f"{LABELS_FILE} (N,), optional {CLASSES_FILE} and {FILES_CSV}; (wav) <word>/<speaker>_nohash_<n>.wav "
    f"folders in the folder or its wav/ sub-folder; (tfds) a tfds data folder with a prepared speech_commands"
)


@dataclass(frozen=True)
class SpeechArrays:
    """Everything a layout reader found, before splitting: (N, 99, 26) features and N labels."""

    features: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    layout: str
    description: str
    speakers: np.ndarray | None = None
    official: SplitIndices | None = None


def load_speech(
    data_dir: str | os.PathLike,
    *,
    split: str = "lab",
    source: str = "auto",
    seed: int = 42,
    num_classes: int | None = None,
) -> Dataset:
    """Load speech features and split them into train/val/test.

    split: ``lab`` (the lab's stratified 80/10/10 with ``random_state=seed``), ``speaker``
    (speaker-disjoint 80/10/10) or ``official`` (validation/testing lists; wav and tfds only).
    source: ``auto`` (detect), ``npy``, ``wav`` or ``tfds``. ``num_classes``, when given, is the
    size of the model's label space: it must cover every label, and extra classes get the names
    of their indices (a 35-way lab model on a 10-word folder). Features stay unnormalised.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown speech split {split!r}; accepted: {', '.join(SPLITS)}")
    if source not in SOURCES:
        raise ConfigError(f"unknown speech source {source!r}; accepted: {', '.join(SOURCES)}")
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer or None, got {num_classes}")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"speech data folder {root} does not exist or is not a folder; {ACCEPTED_LAYOUTS}")

    arrays = _read(root, source if source != "auto" else detect_layout(root), split)
    class_names = _label_space(arrays.class_names, arrays.labels, num_classes, arrays.description)
    indices = _split_indices(arrays, split, seed)
    parts = {name: _take(arrays, getattr(indices, name)) for name in ("train", "val", "test")}
    info = {
        "split": split,
        "seed": seed,
        "layout": arrays.layout,
        "path": str(root),
        "num_examples": len(arrays.labels),
        "split_sizes": {name: len(part) for name, part in parts.items()},
        "classes_in_data": len(arrays.class_names),
        "normalization": "none (the lab feeds raw log mel energies)",
    }
    if split == "speaker" and arrays.speakers is not None:
        info["speakers"] = {
            name: len(np.unique(arrays.speakers[getattr(indices, name)])) for name in parts
        }
    return Dataset(
        name="speech", train=parts["train"], val=parts["val"], test=parts["test"],
        class_names=class_names, source=arrays.description, info=info,
    )


def detect_layout(root: Path) -> str:
    """``npy``, ``wav`` or ``tfds`` from the files present; DataError when none matches."""
    if (root / FEATURES_FILE).exists() or (root / LABELS_FILE).exists():
        return "npy"
    if wav_root(root) is not None:
        return "wav"
    if (root / "speech_commands").is_dir():
        return "tfds"
    raise DataError(f"{root} holds no speech data in a known layout; {ACCEPTED_LAYOUTS}")


def wav_root(root: Path) -> Path | None:
    """The folder holding ``<word>/*.wav``: ``root`` itself or ``root/wav``; None if neither."""
    for candidate in (root, root / "wav"):
        if word_folders(candidate):
            return candidate
    return None


def _read(root: Path, layout: str, split: str) -> SpeechArrays:
    if layout == "npy":
        return read_npy_folder(root, need_speakers=split == "speaker")
    if layout == "wav":
        return read_wav_folder(root)
    from flaxcnn.data.tfds_speech import read_tfds_speech  # noqa: PLC0415 - TensorFlow is optional

    features, labels, names, official = read_tfds_speech(root)
    return SpeechArrays(
        features=features, labels=labels, class_names=names, layout="tfds", official=official,
        description=f"tfds speech_commands in {root} ({len(labels)} clips; 12 labels: 10 words, "
                    "_silence_, _unknown_ - not the lab's 35 words)",
    )


# --- npy layout -------------------------------------------------------------------------------


def _load_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path} is missing; {ACCEPTED_LAYOUTS}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable numeric .npy array ({err})") from err


def _check_features(features: np.ndarray, path: Path) -> np.ndarray:
    expected = f"(N, {FEATURE_SHAPE[0]}, {FEATURE_SHAPE[1]}) (clips, frames, mel filters)"
    if features.ndim != 3 or features.shape[1:] != FEATURE_SHAPE:
        hint = " - it looks transposed" if features.shape[1:] == FEATURE_SHAPE[::-1] else ""
        raise DataError(f"{path} has shape {features.shape}{hint}; expected {expected}")
    if len(features) == 0:
        raise DataError(f"{path} holds no clips (shape {features.shape})")
    if features.dtype.kind not in "fiu":
        raise DataError(f"{path} has dtype {features.dtype}; expected a float array")
    features = features.astype(np.float32, copy=False)
    if not np.isfinite(features).all():
        raise DataError(f"{path} holds NaN or infinite values")
    return features


def _check_labels(labels: np.ndarray, path: Path, num_rows: int) -> np.ndarray:
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path} has shape {labels.shape} and dtype {labels.dtype}; expected (N,) integers")
    if len(labels) != num_rows:
        raise DataError(f"{path} has {len(labels)} labels but {FEATURES_FILE} has {num_rows} rows")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{path} holds negative labels (min {labels.min()}); labels are class indices >= 0")
    if len(labels) and labels.max() >= MAX_CLASSES:
        raise DataError(f"{path} holds label {labels.max()}; labels are class indices below {MAX_CLASSES}")
    return labels.astype(np.int64)


def read_class_names(path: Path) -> tuple[str, ...]:
    """Names from classes.txt, one per line (label = line number); blank lines at the end ignored."""
    try:
        names = [line.strip() for line in path.read_text().splitlines()]
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); it must list one class name per line") from err
    while names and not names[-1]:
        names.pop()
    if not names or "" in names or len(set(names)) != len(names):
        raise DataError(f"{path} must list one unique, non-empty class name per line")
    return tuple(names)


def read_speakers(path: Path, num_rows: int, labels: np.ndarray | None = None) -> np.ndarray:
    """Speaker id of each row from files.csv (column ``speaker``; rows ordered by ``index`` if given)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "speaker" not in rows[0]:
        raise DataError(f"{path} needs a header with a 'speaker' column (and optionally 'index', 'label')")
    if len(rows) != num_rows:
        raise DataError(f"{path} has {len(rows)} rows but the features have {num_rows}")
    if "index" in rows[0]:
        order = [int(r["index"]) for r in rows]
        if sorted(order) != list(range(num_rows)):
            raise DataError(f"{path}: column 'index' must hold each row number 0..{num_rows - 1} once")
        rows = [rows[i] for i in np.argsort(order)]
    if labels is not None and "label" in rows[0]:
        csv_labels = np.array([int(r["label"]) for r in rows])
        if not np.array_equal(csv_labels, labels):
            raise DataError(f"{path}: column 'label' disagrees with {LABELS_FILE}")
    return np.array([r["speaker"] for r in rows], dtype=str)


def read_npy_folder(root: Path, need_speakers: bool = False) -> SpeechArrays:
    """The lab's layout. Speakers are read only when a speaker split needs them."""
    features = _check_features(_load_array(root / FEATURES_FILE), root / FEATURES_FILE)
    labels = _check_labels(_load_array(root / LABELS_FILE), root / LABELS_FILE, len(features))
    classes_path = root / CLASSES_FILE
    if classes_path.is_file():
        names = read_class_names(classes_path)
        if len(labels) and labels.max() >= len(names):
            raise DataError(
                f"{root / LABELS_FILE} holds label {labels.max()} but {classes_path} names only "
                f"{len(names)} classes (labels must be in 0..{len(names) - 1})"
            )
    else:
        names = tuple(str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0))
    speakers = None
    if need_speakers:
        csv_path = root / FILES_CSV
        if not csv_path.is_file():
            raise DataError(f"split='speaker' needs {csv_path} with a 'speaker' column (one row per clip)")
        speakers = read_speakers(csv_path, len(labels), labels)
    return SpeechArrays(
        features=features, labels=labels, class_names=names, layout="npy", speakers=speakers,
        description=f"speech lab arrays ({FEATURES_FILE}, {LABELS_FILE}) in {root}: "
                    f"{len(labels)} clips, {len(names)} classes",
    )


# --- wav layout -------------------------------------------------------------------------------


def _wav_class_names(root: Path, folder: Path, words: list[str]) -> tuple[str, ...]:
    """classes.txt order when present (in the wav folder or ``root``), else sorted folder names."""
    for path in (folder / CLASSES_FILE, root / CLASSES_FILE):
        if path.is_file():
            names = read_class_names(path)
            missing = sorted(set(words) - set(names))
            if missing:
                raise DataError(f"word folders {missing} of {folder} are not listed in {path}")
            return names
    return tuple(words)


def _official_membership(root: Path, folder: Path, relpaths: list[str]) -> SplitIndices | None:
    """Indices from validation_list.txt / testing_list.txt; None when the lists are absent."""
    lists = {}
    for name in (VALIDATION_LIST, TESTING_LIST):
        found = [p for p in (folder / name, root / name) if p.is_file()]
        lists[name] = read_list_file(found[0]) if found else None
    if lists[VALIDATION_LIST] is None or lists[TESTING_LIST] is None:
        return None
    return indices_from_membership(
        np.array([p in lists[VALIDATION_LIST] for p in relpaths], dtype=bool),
        np.array([p in lists[TESTING_LIST] for p in relpaths], dtype=bool),
    )


def read_wav_folder(root: Path) -> SpeechArrays:
    """Every ``<word>/*.wav`` clip, padded/trimmed to 1 s, turned into the lab's features."""
    folder = wav_root(root)
    if folder is None:
        raise DataError(f"{root} (and {root / 'wav'}) hold no <word>/*.wav folders; {ACCEPTED_LAYOUTS}")
    entries = scan_wav_folder(folder)
    names = _wav_class_names(root, folder, sorted({e.word for e in entries}))
    label_of = {name: i for i, name in enumerate(names)}
    features = clips_to_features(read_wav(folder / e.relpath) for e in entries)
    relpaths = [e.relpath for e in entries]
    return SpeechArrays(
        features=features,
        labels=np.array([label_of[e.word] for e in entries], dtype=np.int64),
        class_names=names, layout="wav",
        speakers=np.array([e.speaker for e in entries], dtype=str),
        official=_official_membership(root, folder, relpaths),
        description=f"Speech Commands wav folder {folder}: {len(entries)} clips of "
                    f"{len({e.word for e in entries})} words, log mel filterbank features computed on load",
    )


# --- splitting and assembly -------------------------------------------------------------------


def _label_space(names: tuple[str, ...], labels: np.ndarray, num_classes: int | None,
                 description: str) -> tuple[str, ...]:
    if num_classes is None:
        return names
    if num_classes < len(names):
        raise DataError(
            f"num_classes={num_classes} is smaller than the {len(names)} classes of {description}"
        )
    return names + tuple(str(i) for i in range(len(names), num_classes))


def _split_indices(arrays: SpeechArrays, split: str, seed: int) -> SplitIndices:
    if split == "lab":
        return lab_split(arrays.labels, seed)
    if split == "speaker":
        if arrays.speakers is None:
            raise DataError(
                f"split='speaker' needs speaker ids, which the {arrays.layout} layout does not carry "
                f"({arrays.description}); accepted: npy with {FILES_CSV}, or wav folders"
            )
        return speaker_split(arrays.speakers, (0.8, 0.1, 0.1), seed)
    if arrays.official is None:
        raise DataError(
            f"split='official' needs {VALIDATION_LIST} and {TESTING_LIST} next to the word folders "
            f"(wav layout) or tfds speech_commands; {arrays.description} has none. Use split='lab' "
            "or 'speaker'."
        )
    for name in ("val", "test"):
        if len(getattr(arrays.official, name)) == 0:
            raise DataError(f"the official lists name none of the clips of {arrays.description} "
                            f"for the {name} split")
    return arrays.official


def _take(arrays: SpeechArrays, rows: np.ndarray) -> SplitArrays:
    """Rows of the features with the lab's channel axis: (n, 1, 99, 26) float32, int32 labels."""
    x = arrays.features[rows][:, None, :, :].astype(np.float32, copy=False)
    return SplitArrays(x=x, y=arrays.labels[rows].astype(np.int32))
