"""The one training engine: ``fit(config)`` trains, evaluates, logs, checkpoints and plots a run.

Run directory layout::

    RUN_DIR/config.json       the resolved settings and where the data came from
    RUN_DIR/metrics.jsonl     one line per epoch (see ``epoch_row``)
    RUN_DIR/checkpoints/      orbax: latest/ (for --resume), best/ + best.json
    RUN_DIR/curves.png        loss and accuracy per epoch
    RUN_DIR/summary.json      final accuracies, time and throughput

Losses: ``train_loss_sum`` is what the lab prints (the sum over batches of each batch's mean
objective, the L2 penalty included); ``train_loss`` is the mean per-sample data loss, the one
printed on screen and plotted. Accuracies in ``summary.json`` are measured in evaluation mode
over the whole split after the last epoch (lab 8's ``validate``); ``train_accuracy_running``
per epoch is counted during training, in train mode.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxcnn.data import Dataset, SplitArrays, dataset_domain, load_dataset
from flaxcnn.data.batching import epoch_permutation
from flaxcnn.errors import ConfigError, TrainingError
from flaxcnn import kernels
from flaxcnn.models import dispatch
from flaxcnn.models.registry import ModelSpec, get_model
from flaxcnn.train import distributed
from flaxcnn.train.augment import augmenter_for
from flaxcnn.train.checkpoint import Checkpoints
from flaxcnn.train.config import TrainConfig
from flaxcnn.train.optim import learning_rate, sgd
from flaxcnn.train.plots import plot_curves
from flaxcnn.train.progress import EpochProgress, is_interactive, say
from flaxcnn.train.runlog import read_json, write_json
from flaxcnn.train.state import Graphs, TrainState, create_state
from flaxcnn.train.steps import EpochRunner, Evaluator, default_path, make_train_step


@dataclass
class Session:
    """Everything a run needs, built once from a config: data on device, model, steps."""

    config: TrainConfig
    spec: ModelSpec
    dataset: Dataset
    graphs: Graphs
    tx: optax.GradientTransformation
    state: TrainState
    runner: EpochRunner
    evaluator: Evaluator
    device_arrays: dict[str, tuple[jax.Array, jax.Array]]

    @property
    def val_split(self) -> str:
        return "val" if self.dataset.val is not None else "test"

    def evaluate(self, state: TrainState, split: str) -> dict[str, float]:
        return self.evaluator(state, *self.device_arrays[split])


def build_session(config: TrainConfig, dataset: Dataset | None = None) -> Session:
    """Resolve defaults, load data (unless given), build the model, optimizer and jitted steps."""
    if jax.default_backend() == "cpu" and config.conv_impl != "xla":
        kernels.start_build()  # a first run compiles the C++ kernels while data and model load
    domain = dataset_domain(config.dataset)
    spec = get_model(config.model)
    config = config.resolved(domain)
    if dataset is None:
        dataset = load_dataset(config.dataset, config.data_dir, classes=config.classes, split=config.split,
                               val_fraction=config.val_fraction)
    num_classes = config.num_classes or dataset.num_classes
    model = spec.build(num_classes, seed=config.seed, init=config.init)
    steps_per_epoch = -(-len(dataset.train) // config.batch_size)
    lr = learning_rate(config.lr, config.schedule, config.epochs * steps_per_epoch)
    tx = sgd(lr, config.momentum or 0.0, config.weight_decay)
    graphs, state = create_state(model, tx)
    dispatch.set_mode(config.conv_impl)  # CPU implementations of convolutions and pools, traced below
    dispatch.reset_used()
    path = default_path() if config.path == "auto" else config.path
    config = dataclasses.replace(config, path=path)
    runner = EpochRunner(make_train_step(graphs, spec.loss, tx, config.l2, augmenter_for(config)), path)
    splits = {"train": dataset.train, "test": dataset.test}
    if dataset.val is not None:
        splits["val"] = dataset.val
    arrays = {name: _to_device(split) for name, split in splits.items()}
    session = Session(config, spec, dataset, graphs, tx, state, runner,
                      Evaluator(graphs, spec.loss, config.eval_batch_size), arrays)
    return distributed.data_parallel(session)  # unchanged on one device in one process


def _to_device(split: SplitArrays) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(split.x), jnp.asarray(split.y, jnp.int32)


def epoch_order(config: TrainConfig, epoch: int, n: int) -> np.ndarray:
    return epoch_permutation(config.seed, epoch, n) if config.shuffle else np.arange(n)


def train_epoch(session: Session, state: TrainState, epoch: int, progress: EpochProgress | None = None
                ) -> tuple[TrainState, np.ndarray, float]:
    """One epoch; returns the new state, the epoch's metric sums and the seconds it took."""
    config = session.config
    x, y = session.device_arrays["train"]
    start = time.perf_counter()
    state = session.runner.run(state, x, y, epoch_order(config, epoch, len(y)), config.batch_size,
                               on_batch=progress.update if progress else None)
    sums = np.asarray(state.metrics)  # blocks until the epoch is done
    return state, sums, time.perf_counter() - start


def epoch_row(epoch: int, sums: np.ndarray, seconds: float, val: dict, val_split: str, lr: float) -> dict:
    objective_sum, loss_sum, correct, count = (float(v) for v in sums)
    return {
        "epoch": epoch,
        "train_loss_sum": objective_sum,
        "train_loss": loss_sum / count,
        "train_accuracy_running": correct / count,
        "val_split": val_split,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "lr": lr,
        "train_seconds": seconds,
        "samples_per_second": count / seconds,
    }


def fit(config: TrainConfig, *, resume: bool = False, quiet: bool = False, overwrite: bool = False,
        dataset: Dataset | None = None) -> dict[str, Any]:
    """Train a run end to end and return its summary (also written to RUN_DIR/summary.json)."""
    wall_start = time.perf_counter()
    config.validate()  # refuse bad settings before anything is created on disk
    primary = distributed.is_primary()  # several processes: process 0 writes the run's files
    quiet = quiet or not primary
    run_dir = distributed.prepare_run_dir(config.out, resume=resume, overwrite=overwrite)
    if resume and (run_dir / "config.json").exists():
        saved = TrainConfig.from_json(read_json(run_dir / "config.json")["config"])
        config = dataclasses.replace(saved, epochs=config.epochs or saved.epochs, out=config.out,
                                     devices=config.devices)
    session = build_session(config, dataset)
    config = session.config
    say(f"data: {session.dataset.source}; training on {distributed.describe(config.devices)}", quiet=quiet)
    if primary:
        write_json(run_dir / "config.json", {"config": config.to_json(), "dataset": {
            "name": session.dataset.name, "source": session.dataset.source,
            "class_names": list(session.dataset.class_names), "info": session.dataset.info},
            "backend": jax.default_backend()})

    log = distributed.metrics_log(run_dir / "metrics.jsonl")
    checkpoints = distributed.checkpoints(run_dir)
    state, start_epoch, rows = session.state, 0, []
    if resume and checkpoints.latest_epoch() is not None:
        start_epoch, state = checkpoints.restore("latest", state)
        rows = log.truncate_after(start_epoch)
        say(f"resumed from the checkpoint of epoch {start_epoch} in {run_dir}", quiet=quiet)
    elif resume:
        say(f"no checkpoint in {run_dir} yet: starting from epoch 1", quiet=quiet)
        log.truncate_after(0)
    best = max((r["val_accuracy"] for r in rows), default=-math.inf)

    n_train = len(session.dataset.train)
    batches = -(-n_train // config.batch_size)
    progress = EpochProgress(batches, enabled=not quiet and is_interactive())
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            progress.start(epoch, config.epochs)
            state, sums, seconds = train_epoch(session, state, epoch, progress)
            progress.close()
            if not np.all(np.isfinite(sums)):
                last = checkpoints.latest_epoch()
                raise TrainingError(
                    f"the training loss became {sums[0]} in epoch {epoch}; stopped. "
                    + (f"The last good checkpoint (epoch {last}) is kept in {run_dir / 'checkpoints'}. "
                       if last is not None else "")
                    + f"Lower the learning rate (--lr {config.lr:g} now) or check the input data."
                )
            val = session.evaluate(state, session.val_split)
            row = epoch_row(epoch, sums, seconds, val, session.val_split,
                            float(state.opt_state.hyperparams["learning_rate"]))
            log.append(row)
            rows.append(row)
            if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
                checkpoints.save_latest(epoch, state)
            if row["val_accuracy"] > best:
                best = row["val_accuracy"]
                checkpoints.save_best(epoch, state, {"metric": f"{session.val_split}_accuracy", "value": best})
            say(f"epoch {epoch:>3}/{config.epochs}  loss {row['train_loss']:.4f}  (lab sum {row['train_loss_sum']:.2f})"
                f"  train acc {row['train_accuracy_running']:.3f}  {session.val_split} acc {row['val_accuracy']:.3f}"
                f"  {row['samples_per_second']:,.0f} samples/s", quiet=quiet)
    finally:
        progress.close()
        checkpoints.close()

    summary = summarize(session, state, rows, time.perf_counter() - wall_start)
    if primary:
        write_json(run_dir / "summary.json", summary)
    if rows and primary:
        plot_curves(rows, run_dir / "curves.png", f"{config.model} on {session.dataset.name}")
    say(f"final: train accuracy {summary['train_accuracy']:.4f}  test accuracy {summary['test_accuracy']:.4f}"
        f"  ({summary['seconds']:.1f} s training, {summary['samples_per_second']:,.0f} samples/s)  -> {run_dir}",
        quiet=quiet)
    return summary


def summarize(session: Session, state: TrainState, rows: list[dict], wall_seconds: float) -> dict[str, Any]:
    config = session.config
    train_eval = session.evaluate(state, "train")
    test_eval = session.evaluate(state, "test")
    train_seconds = sum(r["train_seconds"] for r in rows)
    summary = {
        "model": config.model,
        "dataset": session.dataset.name,
        "epochs": len(rows),
        "train_accuracy": train_eval["accuracy"],
        "test_accuracy": test_eval["accuracy"],
        "train_loss": train_eval["loss"],
        "test_loss": test_eval["loss"],
        "seconds": train_seconds,
        "samples_per_second": sum(len(session.dataset.train) for _ in rows) / train_seconds if rows else 0.0,
        "wall_seconds_this_process": wall_seconds,
        "path": config.path,
        "backend": jax.default_backend(),
        "seed": config.seed,
        "lr": config.lr,
        "momentum": config.momentum,
        "weight_decay": config.weight_decay,
        "l2": config.l2,
        "batch_size": config.batch_size,
        "train_size": len(session.dataset.train),
        "test_size": len(session.dataset.test),
        "data_source": session.dataset.source,
        "cpu_implementations": dispatch.summary(),  # the setting, kernel variant and each layer's choice
    }
    if session.dataset.val is not None:
        val_eval = session.evaluate(state, "val")
        summary.update(val_accuracy=val_eval["accuracy"], val_loss=val_eval["loss"])
    return summary


def load_run(run_dir: str | Path, which: str = "latest", dataset: Dataset | None = None,
             data_dir: str | None = None) -> tuple[Session, TrainState, int]:
    """Rebuild a run's session and restore a checkpoint (``latest`` or ``best``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise ConfigError(f"{run_dir} is not a flaxcnn run directory (no config.json)")
    config = TrainConfig.from_json(read_json(run_dir / "config.json")["config"])
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=data_dir)
    session = build_session(config, dataset)
    checkpoints = Checkpoints(run_dir)
    try:
        epoch, state = checkpoints.restore(which, session.state)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    finally:
        checkpoints.close()
    return session, state, epoch
