"""Score every example of a data folder with a trained run: ``flaxcnn evaluate --split all``.

Unlike ``flaxcnn evaluate --data-dir DIR``, which splits DIR into train/val/test as if it were
training data, this reads *every* clip (speech) or image (CIFAR: the training and test batches
of the run's classes) and applies the run's own input handling: speech features go in raw, as
in training (the speech models normalise inside); CIFAR images are standardised with the
per-channel mean/std recorded in the run's ``config.json``. Labels are matched to the run's
classes by name, so a folder may hold a subset of them.

Writes, into ``OUT`` (default ``RUN_DIR/eval-all-<folder>``): ``eval_all.json`` (accuracy,
per-class accuracy, confusion matrix: rows true class, columns predicted) and
``confusion.png``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxcnn.data import dataset_domain
from flaxcnn.data.arrays import Dataset, SplitArrays
from flaxcnn.errors import ConfigError, DataError
from flaxcnn.train.config import TrainConfig
from flaxcnn.train.runlog import read_run_config, write_json


@dataclasses.dataclass(frozen=True)
class Examples:
    """Every example of a folder, already in the run's input form and label space."""

    x: np.ndarray
    y: np.ndarray
    source: str


def _label_map(folder_names: tuple[str, ...], run_names: tuple[str, ...], where: str) -> np.ndarray:
    """Folder label -> run label, by class name; DataError naming any class the run lacks."""
    missing = [n for n in folder_names if n not in run_names]
    if missing:
        raise DataError(f"{where} holds classes {missing} that the run was not trained on; "
                        f"the run's classes: {list(run_names)}")
    return np.array([run_names.index(n) for n in folder_names], np.int32)


def read_examples(config: TrainConfig, dataset_info: dict[str, Any], run_names: tuple[str, ...],
                  data_dir: str | Path | None) -> Examples:
    """Every example in ``data_dir`` (default: the run's own folder), prepared as the run's inputs."""
    if dataset_domain(config.dataset) == "speech":
        return _speech_examples(data_dir or config.data_dir, run_names)
    return _cifar_examples(data_dir if data_dir is not None else config.data_dir, dataset_info, run_names)


def _speech_examples(data_dir: str | Path | None, run_names: tuple[str, ...]) -> Examples:
    from flaxcnn.data.speech import detect_layout, read_npy_folder, read_wav_folder

    if data_dir is None:
        raise ConfigError("evaluate --split all needs --data-dir for a speech run that recorded no data folder")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"speech data folder {root} does not exist or is not a folder")
    layout = detect_layout(root)
    if layout not in ("npy", "wav"):
        raise DataError(f"evaluate --split all reads npy or wav speech folders; {root} is a {layout} folder")
    arrays = read_npy_folder(root) if layout == "npy" else read_wav_folder(root)
    labels = _label_map(arrays.class_names, run_names, str(root))[arrays.labels]
    return Examples(arrays.features[:, None].astype(np.float32, copy=False), labels, arrays.description)


def _cifar_examples(data_dir: str | Path | None, info: dict[str, Any], run_names: tuple[str, ...]) -> Examples:
    from flaxcnn.data.cifar import read_source
    from flaxcnn.data.normalize import standardize, to_unit_float

    class_ids = info.get("class_ids")
    if class_ids is None:
        raise ConfigError("the run's config.json records no CIFAR class_ids; it was not written by this version")
    raw = read_source(data_dir, "auto", class_ids)
    x = np.concatenate([raw.train_x, raw.test_x])
    y = np.concatenate([raw.train_y, raw.test_y])
    keep = np.isin(y, class_ids)
    folder_names = tuple(raw.class_names[i] for i in class_ids)
    to_run = _label_map(folder_names, run_names, raw.origin)
    position = {c: i for i, c in enumerate(class_ids)}
    labels = to_run[np.array([position[int(v)] for v in y[keep]], np.int64)]
    images = to_unit_float(x[keep])
    if info.get("normalized", True):
        if "mean" not in info or "std" not in info:
            raise ConfigError("the run's config.json records no normalisation mean/std")
        standardize(images, np.asarray(info["mean"]), np.asarray(info["std"]))
    return Examples(images, labels, f"{raw.origin}: all {len(labels)} images of classes {list(folder_names)}")


def predict(session, state, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Predicted class of every row of ``x`` in evaluation mode."""

    @jax.jit
    def classes(params, rest, xb):
        return jnp.argmax(nnx.merge(session.graphs.eval, params, rest)(xb), axis=1)

    out = [np.asarray(classes(state.params, state.rest, jnp.asarray(x[i:i + batch_size])))
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


def confusion_matrix(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts: rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(y, np.int64), np.asarray(pred, np.int64)), 1)
    return matrix


def evaluate_all(run_dir: str | Path, data_dir: str | Path | None = None, checkpoint: str = "latest",
                 out: str | Path | None = None) -> dict[str, Any]:
    """Score every example of ``data_dir`` with the run; write eval_all.json and confusion.png."""
    from flaxcnn.train.loop import load_run

    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    config = TrainConfig.from_json(saved["config"])
    run_names = tuple(saved["dataset"]["class_names"])
    examples = read_examples(config, saved["dataset"].get("info", {}), run_names, data_dir)
    if len(examples.y) == 0:
        raise DataError(f"{data_dir} holds no examples of the run's classes {list(run_names)}")
    split = SplitArrays(examples.x, examples.y)
    dataset = Dataset(saved["dataset"]["name"], split, split, run_names, source=examples.source)
    session, state, epoch = load_run(run_dir, checkpoint, dataset=dataset)
    pred = predict(session, state, examples.x, config.eval_batch_size)
    matrix = confusion_matrix(examples.y, pred, len(run_names))
    counts = matrix.sum(axis=1)
    per_class = [{"class": name, "count": int(counts[i]), "correct": int(matrix[i, i]),
                  "accuracy": float(matrix[i, i] / counts[i]) if counts[i] else None}
                 for i, name in enumerate(run_names)]
    out = Path(out) if out is not None else run_dir / f"eval-all-{Path(data_dir or config.data_dir or 'data').name}"
    out.mkdir(parents=True, exist_ok=True)
    result = {"run": str(run_dir), "checkpoint": checkpoint, "epoch": epoch, "model": config.model,
              "data": examples.source, "count": int(len(examples.y)),
              "accuracy": float(np.trace(matrix) / len(examples.y)), "per_class": per_class,
              "confusion_matrix": matrix.tolist(), "confusion_png": str(out / "confusion.png")}
    write_json(out / "eval_all.json", result)
    plot_confusion(matrix, run_names, out / "confusion.png",
                   f"{config.model}: {result['accuracy']:.4f} on {len(examples.y)} examples")
    return result


def plot_confusion(matrix: np.ndarray, names: tuple[str, ...], path: Path, title: str) -> Path:
    """The confusion matrix as a PNG: rows true class, columns predicted, counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * max(n, 4), 0.8 + 0.5 * max(n, 4)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
