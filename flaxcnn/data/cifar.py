"""CIFAR-10 / CIFAR-2 as a :class:`~flaxcnn.data.arrays.Dataset`; entry point :func:`load_cifar`.

What the CIFAR-2 lab does, and what is done here instead:

- it keeps classes 0 and 2 (airplane, bird) with ``label_map = {0: 0, 2: 1}``: same here by
  default, and any other subset of original ids maps to ``0..k-1`` in the given order;
- it builds its "validation" set from the training set, so its val accuracy is training
  accuracy: here ``test`` is the real ``test_batch``, and ``val_fraction`` optionally holds out
  a seeded, stratified part of train as ``val``;
- it computes per-channel mean/std (over all ten classes of the training set) and then trains
  on un-normalised tensors: here the mean/std of the *selected* training images (``ddof=1`` as
  torch's ``std``) are applied to every split unless ``normalize=False``, and recorded in
  ``Dataset.info``; they are the statistics of the data the model actually sees.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from flaxcnn.data.arrays import Dataset, SplitArrays
from flaxcnn.data.cifar_pickle import PICKLE_FOLDER, find_pickle_folder, read_pickle_folder
from flaxcnn.data.cifar_raw import CIFAR10_CLASSES, RawCifar
from flaxcnn.data.normalize import channel_stats, standardize, to_unit_float
from flaxcnn.data.tfds_cifar import TFDS_NAME, default_tfds_dir, has_tfds_cifar10, read_tfds
from flaxcnn.errors import ConfigError, DataError

SOURCES: tuple[str, ...] = ("auto", "pickle", "tfds", "sample")
SAMPLE_FILE = "cifar2_sample.npz"
HOW_TO_GET = (
    "Accepted: a torchvision-style folder `cifar-10-batches-py` (or its parent), extracted from "
    "cifar-10-python.tar.gz at https://www.cs.toronto.edu/~kriz/cifar.html or written by "
    "torchvision.datasets.CIFAR10(root, download=True); or a tensorflow_datasets data_dir that "
    f"holds a prepared `{TFDS_NAME}` (`tfds build {TFDS_NAME} --file_format=array_record "
    "--data_dir DIR`). Without a folder, the shipped sample (airplane and bird only) is used."
)


def load_cifar(
    data_dir: str | os.PathLike | None,
    classes: Sequence[int] = (0, 2),
    *,
    source: str = "auto",
    normalize: bool = True,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """Load the chosen CIFAR-10 classes as float32 NCHW arrays with int32 labels ``0..k-1``.

    ``source``: ``"pickle"`` (a ``cifar-10-batches-py`` folder or its parent), ``"tfds"`` (a
    tensorflow_datasets data_dir; None means the tfds default), ``"sample"`` (the few hundred
    images shipped with the package) or ``"auto"``: the pickle layout if ``data_dir`` has it,
    else tfds if it holds ``cifar10``; with ``data_dir=None`` the default tfds folder if cifar10
    is already prepared there, else the shipped sample. Nothing is ever downloaded.
    """
    class_ids = check_classes(classes)
    if source not in SOURCES:
        raise ConfigError(f"unknown CIFAR source {source!r}; accepted: {', '.join(SOURCES)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    raw = read_source(data_dir, source, class_ids)
    train = _select(raw.train_x, raw.train_y, class_ids, raw, "train")
    test = _select(raw.test_x, raw.test_y, class_ids, raw, "test")
    val = None
    if val_fraction > 0.0:
        keep, held = stratified_holdout(train[1], val_fraction, seed)
        train, val = (train[0][keep], train[1][keep]), (train[0][held], train[1][held])

    mean, std = channel_stats(train[0])
    splits = {name: _to_split(xy, mean, std, normalize) for name, xy in
              (("train", train), ("test", test), ("val", val)) if xy is not None}
    names = tuple(raw.class_names[i] for i in class_ids)
    counts = f"{len(splits['train'])} train / {len(splits['test'])} test"
    if val is not None:
        counts += f" / {len(splits['val'])} val"
    return Dataset(
        name=dataset_name(class_ids),
        train=splits["train"],
        test=splits["test"],
        val=splits.get("val"),
        class_names=names,
        source=f"{raw.origin}: {counts} images ({', '.join(names)})"
               + (f"; {raw.note}" if raw.note else ""),
        info={
            "source_kind": raw.kind,
            "location": raw.location,
            "class_ids": list(class_ids),
            "normalized": normalize,
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "stats_from": "selected train images (after any val hold-out), std with ddof=1",
            "val_fraction": val_fraction,
            "seed": seed,
        },
    )


def check_classes(classes: Sequence[int]) -> tuple[int, ...]:
    """Validated original class ids, in the given order (which defines labels 0..k-1)."""
    valid = ", ".join(f"{i} {n}" for i, n in enumerate(CIFAR10_CLASSES))
    try:
        ids = tuple(classes)
    except TypeError:
        ids = (classes,)
    problem = None
    if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in ids):
        problem = "class ids must be integers"
    elif any(not 0 <= c < len(CIFAR10_CLASSES) for c in ids):
        problem = f"unknown class ids {sorted({int(c) for c in ids if not 0 <= c < 10})}"
    elif len(set(ids)) != len(ids):
        problem = "class ids repeat"
    elif len(ids) < 2:
        problem = "at least two classes are needed"
    if problem:
        raise DataError(f"{problem} (got {classes!r}); valid ids: {valid}")
    return tuple(int(c) for c in ids)


def dataset_name(class_ids: Sequence[int]) -> str:
    """``cifar2`` for the lab's (0, 2), ``cifar10`` for all ten in order, else ``cifar-3-5``...

    Order matters (it fixes the label mapping), so (2, 0) is not named ``cifar2``.
    """
    ids = tuple(class_ids)
    if ids == (0, 2):
        return "cifar2"
    if ids == tuple(range(len(CIFAR10_CLASSES))):
        return "cifar10"
    return "cifar-" + "-".join(str(i) for i in ids)


def read_source(data_dir: str | os.PathLike | None, source: str, class_ids: Sequence[int]) -> RawCifar:
    """Resolve ``source`` (see :func:`load_cifar`) and read both splits."""
    if source == "sample":
        return read_sample(class_ids)
    if source == "tfds":
        return read_tfds(data_dir)
    if data_dir is None:
        if source == "pickle":
            raise DataError(f"source 'pickle' needs a data folder. {HOW_TO_GET}")
        if has_tfds_cifar10(default_tfds_dir(), prepared=True):
            return read_tfds(None)
        return read_sample(class_ids)
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"CIFAR-10 data folder {path} does not exist or is not a folder. {HOW_TO_GET}")
    if source == "pickle" or find_pickle_folder(path) is not None:
        return read_pickle_folder(path)
    if has_tfds_cifar10(path):
        return read_tfds(path)
    raise DataError(
        f"{path} holds neither a {PICKLE_FOLDER} folder (data_batch_1..5, test_batch, "
        f"batches.meta) nor a tfds {TFDS_NAME} folder. {HOW_TO_GET}"
    )


def sample_path() -> Path:
    """Location of the shipped sample inside the installed package."""
    return Path(str(resources.files("flaxcnn") / "sample" / SAMPLE_FILE))


def read_sample(class_ids: Sequence[int] = (0, 2)) -> RawCifar:
    """The shipped real-image sample (classes 0 and 2 only); see ``flaxcnn/sample/README.md``."""
    path = sample_path()
    if not path.is_file():
        raise DataError(f"the shipped sample {path} is missing from this installation. {HOW_TO_GET}")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    present = sorted(set(arrays["train_y"].tolist()))
    absent = [c for c in class_ids if c not in present]
    if absent:
        held = ", ".join(f"{c} {CIFAR10_CLASSES[c]}" for c in present)
        raise DataError(
            f"the shipped sample holds only classes {held}; classes {absent} need the full data "
            f"set. {HOW_TO_GET}"
        )
    return RawCifar(
        train_x=arrays["train_x"],
        train_y=arrays["train_y"].astype(np.int64),
        test_x=arrays["test_x"],
        test_y=arrays["test_y"].astype(np.int64),
        class_names=CIFAR10_CLASSES,
        kind="sample",
        origin="shipped sample of real CIFAR-10 photographs",
        location=str(path),
        note="pass a cifar-10-batches-py folder for the full data set",
    )


def stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held) sorted indices: ``round(fraction * count)`` of each class held out, seeded."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_held = int(round(fraction * len(idx)))
        if n_held < 1 or n_held >= len(idx):
            raise DataError(
                f"val_fraction {fraction} leaves class {label} with {n_held} of {len(idx)} "
                "training images in val; each class needs at least one in val and one in train"
            )
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def _select(x: np.ndarray, y: np.ndarray, class_ids: Sequence[int], raw: RawCifar,
            split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images of ``class_ids`` in stored order, labels mapped to positions in ``class_ids``."""
    mapping = np.full(len(CIFAR10_CLASSES), -1, dtype=np.int32)
    mapping[list(class_ids)] = np.arange(len(class_ids), dtype=np.int32)
    mask = mapping[y] >= 0
    new_y = mapping[y[mask]]
    empty = [c for i, c in enumerate(class_ids) if not np.any(new_y == i)]
    if empty:
        names = ", ".join(f"{c} {raw.class_names[c]}" for c in empty)
        raise DataError(f"{raw.origin}: the {split} split has no images of class {names}")
    return x[mask], new_y


def _to_split(xy: tuple[np.ndarray, np.ndarray], mean: np.ndarray, std: np.ndarray,
              normalize: bool) -> SplitArrays:
    x = to_unit_float(xy[0])
    if normalize:
        standardize(x, mean, std)
    return SplitArrays(x=x, y=xy[1].astype(np.int32))
