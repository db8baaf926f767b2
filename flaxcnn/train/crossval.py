"""k-fold cross-validation: ``flaxcnn cv``. One engine run (``fit``) per fold and seed.

Folds:

* speech: **speaker-grouped**. Every speaker's clips land in exactly one held-out fold, so each
  fold's model is scored on speakers it never heard. Speakers are shuffled with ``fold_seed``
  and dealt, largest first, to the fold with the fewest clips so far (balanced fold sizes).
  All clips of the folder take part; a folder without speaker ids is refused.
* CIFAR: stratified folds over the training images (each class dealt round-robin after a
  seeded shuffle); the official test split is not used. Each fold is standardised with the
  per-channel mean/std of its own training images.

Layout of ``--out``::

    OUT/seed<S>/fold<K>/   a normal run directory (config, metrics, checkpoints, summary)
    OUT/cv.json            every run's held-out accuracy, mean and standard deviation
    OUT/cv.md              the same as a markdown table
    OUT/final/             with ``--final``: one model trained on every example (no held-out data)

The held-out accuracy of a run is its ``test_accuracy``: evaluation mode, after the last
epoch. The per-epoch ``val`` column of a fold run is the same held-out fold (so the
``best`` checkpoint of a fold run is chosen on it and must not be used to report results).
A run whose ``summary.json`` exists is reused; an unfinished one is resumed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flaxcnn.data import dataset_domain
from flaxcnn.data.arrays import Dataset, SplitArrays
from flaxcnn.errors import ConfigError, DataError
from flaxcnn.train.config import TrainConfig
from flaxcnn.train.progress import say
from flaxcnn.train.runlog import read_json, write_json

#: The fold assignment's own seed, fixed so that runs with different training seeds (and
#: different settings) are scored on the same folds; 42 as the lab's ``random_state``.
FOLD_SEED = 42


@dataclass(frozen=True)
class Pool:
    """Every example that takes part in the cross-validation, before splitting into folds."""

    x: np.ndarray  # (N, C, H, W) float32
    y: np.ndarray  # (N,) int32
    groups: np.ndarray | None  # speaker id per example (speech), None for CIFAR
    class_names: tuple[str, ...]
    name: str
    source: str
    standardize: bool  # CIFAR: standardise each fold with its training images' statistics


def grouped_folds(groups: np.ndarray, k: int, seed: int = FOLD_SEED) -> list[np.ndarray]:
    """Held-out row indices of each of ``k`` folds; every group's rows in exactly one fold."""
    names, group_ids, counts = np.unique(np.asarray(groups, dtype=str), return_inverse=True, return_counts=True)
    if len(names) < k:
        raise DataError(f"{k} speaker-grouped folds need at least {k} speakers, the data has {len(names)}")
    shuffled = np.random.RandomState(seed).permutation(len(names))
    order = shuffled[np.argsort(-counts[shuffled], kind="stable")]  # largest first, ties shuffled
    fold_of, sizes = np.empty(len(names), np.int64), np.zeros(k, np.int64)
    for group in order:
        fold = int(np.argmin(sizes))
        fold_of[group] = fold
        sizes[fold] += counts[group]
    rows = fold_of[group_ids]
    return [np.flatnonzero(rows == f) for f in range(k)]


def stratified_folds(labels: np.ndarray, k: int, seed: int = FOLD_SEED) -> list[np.ndarray]:
    """Held-out row indices of ``k`` folds with each class spread evenly over them."""
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    fold_rows: list[list[np.ndarray]] = [[] for _ in range(k)]
    offset = 0
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        if len(rows) < k:
            raise DataError(f"{k} stratified folds need at least {k} examples of every class; class {label} "
                            f"has {len(rows)}")
        for f in range(k):  # rotate the starting fold so that remainders spread over the folds
            fold_rows[(f + offset) % k].append(rows[f::k])
        offset += len(rows) % k
    return [np.sort(np.concatenate(parts)) for parts in fold_rows]


def load_pool(config: TrainConfig) -> Pool:
    """Every example of the configured data set that cross-validation draws folds from."""
    if dataset_domain(config.dataset) == "speech":
        return _speech_pool(config)
    from flaxcnn.data.cifar import load_cifar

    classes = config.classes
    if classes is None:
        if config.dataset == "cifar":
            raise ConfigError("dataset 'cifar' needs --classes, e.g. --classes 3,5")
        classes = tuple(range(10)) if config.dataset == "cifar10" else (0, 2)
    data = load_cifar(config.data_dir, classes, normalize=False)
    return Pool(data.train.x, data.train.y, None, data.class_names, data.name,
                f"{data.source}; folds over the {len(data.train)} training images", standardize=True)


def _speech_pool(config: TrainConfig) -> Pool:
    from flaxcnn.data.speech import detect_layout, read_npy_folder, read_wav_folder

    if config.data_dir is None:
        raise ConfigError("speech cross-validation needs --data-dir (a folder with melspec_feats.npy, labels.npy "
                          "and files.csv, or Speech Commands <word>/*.wav folders)")
    root = Path(config.data_dir)
    if not root.is_dir():
        raise DataError(f"speech data folder {root} does not exist or is not a folder")
    layout = detect_layout(root)
    if layout == "npy":
        arrays = read_npy_folder(root, need_speakers=True)
    elif layout == "wav":
        arrays = read_wav_folder(root)
    else:
        raise DataError(f"speaker-grouped cross-validation needs speaker ids: an npy folder with files.csv or a "
                        f"wav folder; {root} is a {layout} folder")
    return Pool(arrays.features[:, None].astype(np.float32, copy=False), arrays.labels.astype(np.int32),
                arrays.speakers, arrays.class_names, "speech", arrays.description, standardize=False)


def make_folds(pool: Pool, k: int, seed: int = FOLD_SEED) -> list[np.ndarray]:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ConfigError(f"--folds must be an integer >= 2, got {k!r}")
    if pool.groups is not None:
        return grouped_folds(pool.groups, k, seed)
    return stratified_folds(pool.y, k, seed)


def fold_dataset(pool: Pool, folds: list[np.ndarray], index: int) -> Dataset:
    """Train on every fold but ``index``, hold out (``test``) fold ``index``."""
    held = folds[index]
    train = np.sort(np.concatenate([f for i, f in enumerate(folds) if i != index]))
    x_train, x_held = pool.x[train], pool.x[held]
    info: dict[str, Any] = {"cv_fold": index, "cv_folds": len(folds), "split": "cv",
                            "split_sizes": {"train": len(train), "test": len(held)}}
    if pool.groups is not None:
        info["speakers"] = {"train": int(len(np.unique(pool.groups[train]))),
                            "test": int(len(np.unique(pool.groups[held])))}
    if pool.standardize:
        axes = (0, 2, 3)
        mean = x_train.mean(axis=axes, dtype=np.float64)
        std = x_train.std(axis=axes, dtype=np.float64, ddof=1)
        shape = (1, -1, 1, 1)
        x_train = ((x_train - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)
        x_held = ((x_held - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)
        info.update(normalized=True, mean=mean.tolist(), std=std.tolist(),
                    stats_from="this fold's training images, std with ddof=1")
    return Dataset(name=pool.name, train=SplitArrays(x_train, pool.y[train]), test=SplitArrays(x_held, pool.y[held]),
                   class_names=pool.class_names, source=f"{pool.source}; cv fold {index + 1}/{len(folds)}",
                   info=info)


def all_dataset(pool: Pool) -> Dataset:
    """Every example as training data, for the final model. There is no held-out data: the
    ``test`` split is the training data itself, and ``info`` says so."""
    x = pool.x
    info: dict[str, Any] = {"split": "all", "split_sizes": {"train": len(pool.y)},
                            "test_split": "the training examples themselves (no held-out data)"}
    if pool.standardize:
        mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
        std = x.std(axis=(0, 2, 3), dtype=np.float64, ddof=1)
        x = ((x - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)).astype(np.float32)
        info.update(normalized=True, mean=mean.tolist(), std=std.tolist(), stats_from="all training images")
    split = SplitArrays(x, pool.y)
    return Dataset(name=pool.name, train=split, test=split, class_names=pool.class_names,
                   source=f"{pool.source}; all examples", info=info)


def fit_final(config: TrainConfig, out: str | Path, *, quiet: bool = False, pool: Pool | None = None
              ) -> dict[str, Any]:
    """Train one model on every example (the settings chosen by cross-validation) into ``out``."""
    from flaxcnn.train.loop import fit

    run_dir = Path(out)
    if (run_dir / "summary.json").exists():
        say(f"final model already trained in {run_dir}", quiet=quiet)
        return read_json(run_dir / "summary.json")
    summary = fit(dataclasses.replace(config, out=str(run_dir)), resume=run_dir.exists(), quiet=quiet,
                  dataset=all_dataset(pool or load_pool(config)))
    summary["test_split"] = "none held out: test_accuracy is measured on the training examples"
    write_json(run_dir / "summary.json", summary)
    return summary


def run_cv(config: TrainConfig, out: str | Path, *, folds: int = 5, seeds: list[int] | None = None,
           fold_seed: int = FOLD_SEED, quiet: bool = False, final: bool = False,
           only_folds: list[int] | None = None) -> dict[str, Any]:
    """Train ``folds`` x ``seeds`` runs with :func:`flaxcnn.train.loop.fit`; write cv.json and cv.md.
    ``final``: then train one model on every example into ``OUT/final`` (seed: the first seed).
    ``only_folds`` (1-based): train just these folds, e.g. to spread one protocol over several
    processes; a later call without it reuses their runs and summarises all folds."""
    from flaxcnn.train.loop import fit

    config = config.resolved()  # cv.json records the settings every run uses (the model included)
    seeds = list(seeds) if seeds else [config.seed]
    out = Path(out)
    pool = load_pool(config)
    fold_rows = make_folds(pool, folds, fold_seed)
    wanted = set(only_folds) if only_folds else set(range(1, folds + 1))
    if not wanted <= set(range(1, folds + 1)):
        raise ConfigError(f"--only-folds must name folds in 1..{folds}, got {sorted(wanted)}")
    runs = []
    for seed in seeds:
        for k in (k for k in range(folds) if k + 1 in wanted):
            run_dir = out / f"seed{seed}" / f"fold{k + 1}"
            if (run_dir / "summary.json").exists():
                summary = read_json(run_dir / "summary.json")
                say(f"cv: seed {seed} fold {k + 1}/{folds} already done in {run_dir}", quiet=quiet)
            else:
                say(f"cv: seed {seed} fold {k + 1}/{folds} -> {run_dir}", quiet=quiet)
                summary = fit(dataclasses.replace(config, seed=seed, out=str(run_dir)),
                              resume=run_dir.exists(), quiet=quiet, dataset=fold_dataset(pool, fold_rows, k))
            runs.append({"seed": seed, "fold": k + 1, "run_dir": str(run_dir), "held_out": len(fold_rows[k]),
                         "held_out_accuracy": summary["test_accuracy"], "train_accuracy": summary["train_accuracy"],
                         "seconds": summary["seconds"]})
    result = {"config": config.to_json(), "data": pool.source, "folds": folds, "seeds": seeds,
              "fold_seed": fold_seed, "grouping": "speaker" if pool.groups is not None else "stratified",
              "fold_sizes": [len(f) for f in fold_rows], "runs": runs, **aggregate(runs)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cv.json", result)
    (out / "cv.md").write_text(markdown(result))
    say(f"cv: held-out accuracy {result['mean']:.4f} +- {result['std']:.4f} (mean +- std over {len(runs)} runs: "
        f"{folds} folds x {len(seeds)} seeds) -> {out / 'cv.md'}", quiet=quiet)
    if final:
        fit_final(dataclasses.replace(config, seed=seeds[0]), out / "final", quiet=quiet, pool=pool)
    return result


#: what must agree for runs of several cv.json files to be one protocol
_PROTOCOL = ("data", "folds", "fold_seed", "grouping", "fold_sizes")


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One cross-validation from several ``cv.json`` results of the same protocol (the same data,
    folds and settings, different seeds or folds: one protocol spread over machines or days).
    A run (seed, fold) given twice must agree; anything else that differs is refused by name."""
    if not results:
        raise ConfigError("nothing to merge: give at least one cv.json")
    first = results[0]
    settings = _comparable(first["config"])
    runs: dict[tuple[int, int], dict] = {}
    for index, result in enumerate(results):
        for key in _PROTOCOL:
            if _where_free(key, result.get(key)) != _where_free(key, first.get(key)):
                raise ConfigError(f"cv result {index + 1} differs from the first in {key!r}: "
                                  f"{result.get(key)!r} != {first.get(key)!r}; only one protocol can be merged")
        other = _comparable(result["config"])
        differing = sorted(k for k in settings.keys() | other.keys() if settings.get(k) != other.get(k))
        if differing:
            raise ConfigError(f"cv result {index + 1} was trained with other settings than the first "
                              f"({', '.join(differing)}); only one protocol can be merged")
        for run in result["runs"]:
            key = (run["seed"], run["fold"])
            if key in runs and runs[key]["held_out_accuracy"] != run["held_out_accuracy"]:
                raise ConfigError(f"seed {key[0]} fold {key[1]} appears twice with different held-out "
                                  f"accuracies ({runs[key]['held_out_accuracy']} and {run['held_out_accuracy']})")
            runs[key] = run
    ordered = [runs[k] for k in sorted(runs)]
    seeds = sorted({seed for seed, _ in runs})
    return {**{k: first[k] for k in ("config", *_PROTOCOL)}, "seeds": seeds, "runs": ordered, **aggregate(ordered)}


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A cv.json's settings with per-dataset defaults resolved (older files kept them unresolved,
    as nulls), without what differs between parts of one protocol (seed, output and data folder:
    the data itself is compared by its description and fold sizes)."""
    try:
        config = TrainConfig.from_json(config).resolved().to_json()
    except (ConfigError, TypeError, ValueError):
        pass  # compared as written
    return {k: v for k, v in config.items() if k not in ("seed", "out", "data_dir")}


def _where_free(key: str, value: Any) -> Any:
    """The data description without the folder it was read from (the same clips on another
    machine, or named by another path, are the same protocol; the clip counts must agree)."""
    if key != "data" or not isinstance(value, str) or " in " not in value or ": " not in value:
        return value
    return value.split(" in ", 1)[0] + ": " + value.rsplit(": ", 1)[1]


def merge_files(paths: list[str | Path], out: str | Path, *, quiet: bool = False) -> dict[str, Any]:
    """``flaxcnn cv --merge``: :func:`merge` of ``cv.json`` files into ``OUT/cv.json`` and ``cv.md``."""
    results = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            path = path / "cv.json"
        if not path.exists():
            raise ConfigError(f"--merge: no cv.json at {path}")
        results.append(read_json(path))
    result = merge(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cv.json", result)
    (out / "cv.md").write_text(markdown(result))
    say(f"cv: merged {len(paths)} results: held-out accuracy {result['mean']:.4f} +- {result['std']:.4f} over "
        f"{len(result['runs'])} runs ({len(result['seeds'])} seeds) -> {out / 'cv.md'}", quiet=quiet)
    return result


def aggregate(runs: list[dict]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1) of held-out accuracy over all runs, and the
    standard deviation of the per-seed means (how much the whole protocol moves with the seed)."""
    acc = np.array([r["held_out_accuracy"] for r in runs], np.float64)
    by_seed = {}
    for r in runs:
        by_seed.setdefault(r["seed"], []).append(r["held_out_accuracy"])
    seed_means = np.array([np.mean(v) for v in by_seed.values()])
    # Pooled over every held-out clip: each run's accuracy weighted by its fold's size.
    weights = np.array([r["held_out"] for r in runs], np.float64)
    return {
        "mean": float(acc.mean()),
        "std": float(acc.std(ddof=1)) if len(acc) > 1 else math.nan,
        "min": float(acc.min()),
        "max": float(acc.max()),
        "clip_weighted_mean": float(np.sum(acc * weights) / np.sum(weights)),
        "seed_means": {str(s): float(m) for s, m in zip(by_seed, seed_means)},
        "std_of_seed_means": float(seed_means.std(ddof=1)) if len(seed_means) > 1 else math.nan,
    }


def markdown(result: dict[str, Any]) -> str:
    """cv.md: one line per run, then the summary line."""
    cfg = result["config"]
    lines = [f"# {result['folds']}-fold {result['grouping']} cross-validation: {cfg['model']} on {result['data']}",
             "", "| seed | fold | held-out clips | held-out acc | train acc | train s |", "|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['seed']} | {r['fold']} | {r['held_out']} | {r['held_out_accuracy']:.4f} | "
                     f"{r['train_accuracy']:.4f} | {r['seconds']:.0f} |")
    spread = result["std_of_seed_means"]
    seeds_note = "one seed" if math.isnan(spread) else f"std of the per-seed means {spread:.4f}"
    lines += ["", f"**Held-out accuracy {result['mean']:.4f} +- {result['std']:.4f}** (mean +- sample std over "
                  f"{len(result['runs'])} runs; min {result['min']:.4f}, max {result['max']:.4f}; {seeds_note}).", ""]
    return "\n".join(lines)
