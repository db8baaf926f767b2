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

One loop serves every way of training: :func:`run_epochs` trains a session's state epoch by
epoch and hands each run its epoch through :func:`end_of_epoch`. A session holds one model
(``fit``, data parallel or not) or K models stacked along a leading axis (``flaxcnn sweep
--strategy vmap``: :func:`build_session` with ``members``), each member with its own run
directory (:class:`RunRecord`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxcnn import kernels
from flaxcnn.data import Dataset, SplitArrays, dataset_domain, load_dataset
from flaxcnn.data.batching import epoch_permutation
from flaxcnn.errors import ConfigError, TrainingError
from flaxcnn.models import conv_policy
from flaxcnn.models.registry import ModelSpec, get_model
from flaxcnn.train import distributed
from flaxcnn.train.augment import augmenter_for
from flaxcnn.train.checkpoint import Checkpoints
from flaxcnn.train.config import TrainConfig
from flaxcnn.train.optim import learning_rate, learning_rate_of, sgd, stackable_sgd, transplant
from flaxcnn.train.plots import plot_curves
from flaxcnn.train.progress import EpochProgress, is_interactive, say
from flaxcnn.train.runlog import MetricsLog, read_run_config, write_json
from flaxcnn.train.state import Graphs, TrainState, create_state, split_model, stack, unstack
from flaxcnn.train.steps import EpochRunner, Evaluator, default_path, make_train_step


# ----------------------------------------------------------------------------- the session

@dataclass
class Session:
    """Everything a run needs, built once from a config: data on device, model, steps.

    ``members``: for K stacked models, each one's settings (``state`` then holds all K along a
    leading axis); empty for one model."""

    config: TrainConfig
    spec: ModelSpec
    dataset: Dataset
    graphs: Graphs
    tx: optax.GradientTransformation
    state: TrainState
    runner: EpochRunner
    evaluator: Evaluator
    device_arrays: dict[str, tuple[jax.Array, jax.Array]]
    members: tuple[TrainConfig, ...] = ()
    conv_policy: conv_policy.ConvPolicy = conv_policy.DEFAULT  # what the model's layers run under

    def cpu_implementations(self) -> dict[str, Any]:
        """The conv policy and what it runs for each convolution and pool of this model (for the
        run's config.json and summary.json)."""
        model = nnx.merge(self.graphs.train, self.state.params, self.state.rest) if not self.members else None
        layers = conv_policy.explain(model, (self.config.batch_size, *self.spec.input_chw)) if model else []
        return {**self.conv_policy.describe(), "layers": layers}

    @property
    def val_split(self) -> str:
        return "val" if self.dataset.val is not None else "test"

    @property
    def configs(self) -> tuple[TrainConfig, ...]:
        """The settings of each model the state holds (one, unless stacked)."""
        return self.members or (self.config,)

    def evaluate(self, state: TrainState, split: str) -> dict[str, float]:
        return self.evaluator(state, *self.device_arrays[split])

    def member(self, state: TrainState, k: int) -> TrainState:
        """Model ``k`` of the state alone, as ``fit`` would hold it (the state itself when unstacked)."""
        return member_state(state, k, self.members[k]) if self.members else state


def build_session(config: TrainConfig, dataset: Dataset | None = None,
                  members: Sequence[TrainConfig] = ()) -> Session:
    """Resolve defaults, load data (unless given), build the model, optimizer and jitted steps.

    ``members``: train these K settings at once, stacked (they may differ in seed, learning rate
    and weight decay; ``config`` gives everything else, on one device)."""
    policy = distributed.conv_policy_for(config.devices, conv_policy.from_setting(config.conv_policy))
    if jax.default_backend() == "cpu" and policy.kernels:
        kernels.start_build(policy.isa)  # a first run compiles the C++ kernels while data and model load
    domain = dataset_domain(config.dataset)
    config = config.resolved(domain)
    spec = get_model(config.model)
    if dataset is None:
        dataset = load_dataset(config.dataset, config.data_dir, classes=config.classes, split=config.split,
                               val_fraction=config.val_fraction)
    config = dataclasses.replace(config, path=default_path() if config.path == "auto" else config.path)
    members = tuple(dataclasses.replace(m.resolved(domain), path=config.path) for m in members)
    num_classes = config.num_classes or dataset.num_classes
    if hasattr(spec, "check_fits"):  # a model from a file (flaxcnn.models.from_file)
        spec.check_fits(dataset.train.x.shape[1:], num_classes)
    steps_per_epoch = -(-len(dataset.train) // config.batch_size)
    if members:
        tx = stackable_sgd(config.lr, config.momentum, config.weight_decay)  # each member's values are in its state
        graphs, _, _ = split_model(spec.build(num_classes, seed=config.seed, init=config.init, conv_policy=policy))
        state = initial_states(spec, num_classes, members)
    else:
        tx = sgd(learning_rate(config.lr, config.schedule, config.epochs * steps_per_epoch), config.momentum,
                 config.weight_decay)
        graphs, state = create_state(spec.build(num_classes, seed=config.seed, init=config.init, conv_policy=policy),
                                     tx, config.seed)
    train_step = make_train_step(graphs, spec.loss, tx, config.l2, augmenter_for(config.augment_settings()))
    splits = {"train": dataset.train, "test": dataset.test}
    if dataset.val is not None:
        splits["val"] = dataset.val
    runner = EpochRunner(train_step, config.path, stacked=bool(members))
    session = Session(config, spec, dataset, graphs, tx, state, runner,
                      Evaluator(graphs, spec.loss, config.eval_batch_size),
                      {name: _to_device(split) for name, split in splits.items()}, members, policy)
    return distributed.data_parallel(session)  # unchanged on one device in one process


def _to_device(split: SplitArrays) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(split.x), jnp.asarray(split.y, jnp.int32)


def initial_states(spec: ModelSpec, num_classes: int, configs: Sequence[TrainConfig]) -> TrainState:
    """Each member's initial state (its seed's weights, its lr and weight decay), stacked."""
    states = []
    for config in configs:
        tx = stackable_sgd(config.lr, config.momentum or 0.0, config.weight_decay)
        states.append(create_state(spec.build(num_classes, seed=config.seed, init=config.init), tx, config.seed)[1])
    return stack(states)


def member_state(stacked: TrainState, k: int, config: TrainConfig) -> TrainState:
    """Member ``k`` of a stacked state, its optimizer state laid out as ``fit`` saves it for
    ``config`` (``sgd(lr, momentum, weight_decay)``), so that its checkpoints load like any run's."""
    state = unstack(stacked, k)
    template = sgd(config.lr, config.momentum or 0.0, config.weight_decay).init(state.params)
    return state.replace(opt_state=transplant(state.opt_state, template))


# ----------------------------------------------------------------------------- one epoch

def epoch_order(config: TrainConfig, epoch: int, n: int) -> np.ndarray:
    return epoch_permutation(config.seed, epoch, n) if config.shuffle else np.arange(n)


def train_epoch(session: Session, state: TrainState, epoch: int, progress: EpochProgress | None = None
                ) -> tuple[TrainState, dict[str, np.ndarray], float]:
    """One epoch of every model in the state, each in its own seed's order; returns the new state,
    the epoch's sums by name (:class:`~flaxcnn.train.state.Sums`; one value per stacked model)
    and the seconds it took."""
    x, y = session.device_arrays["train"]
    start = time.perf_counter()
    orders = [epoch_order(config, epoch, len(y)) for config in session.configs]
    state = session.runner.run(state, x, y, np.stack(orders) if session.members else orders[0],
                               session.config.batch_size, on_batch=progress.update if progress else None)
    sums = state.metrics.to_host()  # blocks until the epoch is done
    return state, sums, time.perf_counter() - start


def epoch_row(epoch: int, sums: dict[str, float], seconds: float, val: dict, val_split: str, lr: float) -> dict:
    count = sums["count"]
    return {
        "epoch": epoch,
        "train_loss_sum": sums["objective"],
        "train_loss": sums["loss"] / count,
        "train_accuracy_running": sums["correct"] / count,
        "val_split": val_split,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "lr": lr,
        "train_seconds": seconds,
        "samples_per_second": count / seconds,
    }


# ----------------------------------------------------------------------------- one run directory

class Diverged(TrainingError):
    """The training loss of a run became NaN or infinite."""


@dataclass
class RunRecord:
    """One run directory while it trains: its metrics log, checkpoints and best accuracy so far.
    Several processes: process 0 writes the text files, every process saves checkpoints."""

    config: TrainConfig
    run_dir: Path
    log: MetricsLog = field(init=False)
    checkpoints: Checkpoints = field(init=False)
    rows: list[dict] = field(default_factory=list)
    best: float = -math.inf
    error: str | None = None

    def __post_init__(self) -> None:
        self.log = distributed.metrics_log(self.run_dir / "metrics.jsonl")
        self.checkpoints = distributed.checkpoints(self.run_dir)

    @classmethod
    def open(cls, config: TrainConfig, run_dir: Path, dataset: Dataset, **notes: Any) -> "RunRecord":
        """Start writing ``run_dir`` (prepared by ``prepare_run_dir``): its ``config.json`` holds
        the resolved settings, the data's origin, the backend and any ``notes``."""
        if distributed.is_primary():
            write_json(run_dir / "config.json", {"config": config.to_json(), "dataset": {
                "name": dataset.name, "source": dataset.source, "class_names": list(dataset.class_names),
                "info": dataset.info}, "backend": jax.default_backend(), **notes})
        return cls(config, run_dir)

    def resume(self, state: TrainState, *, quiet: bool) -> tuple[int, TrainState]:
        """The latest checkpoint's epoch and state (0 and ``state`` when there is none yet); the
        metrics log is cut back to the epochs that checkpoint covers."""
        start_epoch = 0
        if self.checkpoints.latest_epoch() is not None:
            start_epoch, state = self.checkpoints.restore("latest", state)
            say(f"resumed from the checkpoint of epoch {start_epoch} in {self.run_dir}", quiet=quiet)
        else:
            say(f"no checkpoint in {self.run_dir} yet: starting from epoch 1", quiet=quiet)
        self.rows = self.log.truncate_after(start_epoch)
        self.best = max((r["val_accuracy"] for r in self.rows), default=-math.inf)
        return start_epoch, state


def end_of_epoch(record: RunRecord, session: Session, epoch: int, state: TrainState, sums: dict[str, float],
                 seconds: float) -> dict:
    """After each epoch of each run: refuse a non-finite loss, evaluate, log the row, save the
    latest (every ``checkpoint_every`` epochs and at the end) and the best checkpoint."""
    config = record.config
    if not all(np.isfinite(value) for value in sums.values()):
        last = record.checkpoints.latest_epoch()
        raise Diverged(
            f"the training loss became {sums['objective']} in epoch {epoch}; stopped. "
            + (f"The last good checkpoint (epoch {last}) is kept in {record.run_dir / 'checkpoints'}. "
               if last is not None else "")
            + f"Lower the learning rate (--lr {config.lr:g} now) or check the input data."
        )
    split = session.val_split
    row = epoch_row(epoch, sums, seconds, session.evaluate(state, split), split,
                    float(learning_rate_of(state.opt_state)))
    record.log.append(row)
    record.rows.append(row)
    if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
        record.checkpoints.save_latest(epoch, state)
    if row["val_accuracy"] > record.best:
        record.best = row["val_accuracy"]
        record.checkpoints.save_best(epoch, state, {"metric": f"{split}_accuracy", "value": record.best})
    return row


# ----------------------------------------------------------------------------- the epoch loop

def run_epochs(session: Session, state: TrainState, records: Sequence[RunRecord], first_epoch: int = 1, *,
               quiet: bool = False) -> TrainState:
    """Train from ``first_epoch`` to the last, ending each epoch of each model with
    :func:`end_of_epoch` on its record (``records[k]`` for model ``k`` of the state).

    A model whose loss diverges stops alone (its record keeps the error); when none is left the
    error is raised. Checkpoint saves in flight are finished before this returns or raises."""
    config = session.config
    batches = -(-len(session.dataset.train) // config.batch_size)
    progress = EpochProgress(batches, enabled=not quiet and is_interactive())
    try:
        for epoch in range(first_epoch, config.epochs + 1):
            progress.start(epoch, config.epochs)
            state, sums, seconds = train_epoch(session, state, epoch, progress)
            progress.close()
            rows: list[dict | None] = [None] * len(records)
            for k, record in enumerate(records):
                if record.error is not None:
                    continue
                try:
                    member_sums = {name: float(np.atleast_1d(value)[k]) for name, value in sums.items()}
                    rows[k] = end_of_epoch(record, session, epoch, session.member(state, k), member_sums, seconds)
                except Diverged as error:
                    record.error = str(error)
                    if all(r.error is not None for r in records):
                        raise
            say(epoch_line(epoch, config.epochs, rows, seconds, session.val_split), quiet=quiet)
    finally:
        progress.close()
        for record in records:
            record.checkpoints.close()
    return state


def epoch_line(epoch: int, epochs: int, rows: Sequence[dict | None], seconds: float, split: str) -> str:
    """What the screen shows after an epoch: one model's numbers, or every stacked model's accuracy."""
    if len(rows) == 1 and rows[0] is not None:
        row = rows[0]
        return (f"epoch {epoch:>3}/{epochs}  loss {row['train_loss']:.4f}  (lab sum {row['train_loss_sum']:.2f})"
                f"  train acc {row['train_accuracy_running']:.3f}  {split} acc {row['val_accuracy']:.3f}"
                f"  {row['samples_per_second']:,.0f} samples/s")
    return (f"epoch {epoch:>3}/{epochs}  {len(rows)} models in {seconds:.1f} s  {split} acc "
            + " ".join(f"{row['val_accuracy']:.3f}" if row else "failed" for row in rows))


def finish_run(record: RunRecord, session: Session, state: TrainState, wall_seconds: float) -> dict[str, Any]:
    """The run's summary (final evaluation), written with its curves by process 0."""
    summary = summarize(session, state, record.rows, wall_seconds, record.config)
    if distributed.is_primary():
        write_json(record.run_dir / "summary.json", summary)
        if record.rows:
            plot_curves(record.rows, record.run_dir / "curves.png",
                        f"{record.config.model} on {session.dataset.name}")
    return summary


# ----------------------------------------------------------------------------- fit

def fit(config: TrainConfig, *, resume: bool = False, quiet: bool = False, overwrite: bool = False,
        dataset: Dataset | None = None) -> dict[str, Any]:
    """Train a run end to end and return its summary (also written to RUN_DIR/summary.json)."""
    wall_start = time.perf_counter()
    config.validate()  # refuse bad settings before anything is created on disk
    quiet = quiet or not distributed.is_primary()  # several processes: process 0 speaks and writes
    run_dir = distributed.prepare_run_dir(config.out, resume=resume, overwrite=overwrite)
    if resume and (run_dir / "config.json").exists():
        config = config.for_resume(TrainConfig.from_json(read_run_config(run_dir)["config"]))
    session = build_session(config, dataset)
    say(f"data: {session.dataset.source}; training on {distributed.describe(session.config.devices)}", quiet=quiet)
    record = RunRecord.open(session.config, run_dir, session.dataset, cpu_implementations=session.cpu_implementations())
    state, start_epoch = session.state, 0
    if resume:
        start_epoch, state = record.resume(state, quiet=quiet)
    state = run_epochs(session, state, [record], start_epoch + 1, quiet=quiet)
    summary = finish_run(record, session, state, time.perf_counter() - wall_start)
    say(f"final: train accuracy {summary['train_accuracy']:.4f}  test accuracy {summary['test_accuracy']:.4f}"
        f"  ({summary['seconds']:.1f} s training, {summary['samples_per_second']:,.0f} samples/s)  -> {run_dir}",
        quiet=quiet)
    return summary


def summarize(session: Session, state: TrainState, rows: list[dict], wall_seconds: float,
              config: TrainConfig | None = None) -> dict[str, Any]:
    """``config``: the run's own settings (a stacked member's), default the session's."""
    config = config or session.config
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
        "cpu_implementations": session.cpu_implementations(),  # the policy and each layer's implementation
    }
    if session.dataset.val is not None:
        val_eval = session.evaluate(state, "val")
        summary.update(val_accuracy=val_eval["accuracy"], val_loss=val_eval["loss"])
    return summary


def load_run(run_dir: str | Path, which: str = "latest", dataset: Dataset | None = None,
             data_dir: str | None = None) -> tuple[Session, TrainState, int]:
    """Rebuild a run's session and restore a checkpoint (``latest`` or ``best``)."""
    run_dir = Path(run_dir)
    config = TrainConfig.from_json(read_run_config(run_dir)["config"])
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
