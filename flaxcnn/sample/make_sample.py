"""Build ``cifar2_sample.npz``: the first N images per class of a cifar-10-batches-py folder.

Usage::

    python flaxcnn/sample/make_sample.py /path/to/cifar-10-batches-py [--out FILE]
        [--classes 0 2] [--train-per-class 300] [--test-per-class 100]

Selection is deterministic, no random seed involved: the first ``train-per-class`` images of
each class in file order (``data_batch_1`` .. ``data_batch_5``) and the first
``test-per-class`` of each class in ``test_batch``, kept in that file order. Arrays are stored
uint8 with original label ids, plus the original file names for provenance.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from flaxcnn.data.cifar_pickle import (
    TEST_FILE,
    TRAIN_FILES,
    find_pickle_folder,
    parse_batch,
    text_keys,
)
from flaxcnn.data.safe_pickle import load_restricted


def first_per_class(y: np.ndarray, classes: list[int], per_class: int) -> np.ndarray:
    """Sorted indices of the first ``per_class`` occurrences of each class in ``y``."""
    picks = []
    for c in classes:
        idx = np.flatnonzero(y == c)[:per_class]
        if len(idx) < per_class:
            raise SystemExit(f"class {c} has only {len(idx)} images, {per_class} requested")
        picks.append(idx)
    return np.sort(np.concatenate(picks))


def read_files(folder: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, labels and file names of the given batch files, concatenated in order."""
    xs, ys, fs = [], [], []
    for name in names:
        entry = text_keys(load_restricted(folder / name), folder / name)
        x, y = parse_batch(entry, folder / name)
        files = entry["filenames"]
        xs.append(x)
        ys.append(y)
        fs.append(np.array([f.decode("latin1") if isinstance(f, bytes) else str(f) for f in files]))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(fs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="cifar-10-batches-py folder or its parent")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("cifar2_sample.npz"))
    parser.add_argument("--classes", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args(argv)

    folder = find_pickle_folder(args.source)
    if folder is None:
        raise SystemExit(f"{args.source} holds no cifar-10-batches-py layout")
    out = {}
    for split, names, per_class in (("train", TRAIN_FILES, args.train_per_class),
                                    ("test", (TEST_FILE,), args.test_per_class)):
        x, y, files = read_files(folder, names)
        keep = first_per_class(y, args.classes, per_class)
        out[f"{split}_x"] = x[keep]
        out[f"{split}_y"] = y[keep].astype(np.uint8)
        out[f"{split}_files"] = files[keep]
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): "
          + ", ".join(f"{k} {v.shape}" for k, v in out.items()))


if __name__ == "__main__":
    main()
