"""Many small models at once: ``flaxcnn sweep`` trains every combination of seeds, learning
rates and weight decays, and writes one run directory per combination, like ``flaxcnn train``.

Strategies (``--strategy``):

``sequential``  one :func:`flaxcnn.train.loop.fit` per combination, one after another in this
                process (the data set is loaded once). Each run is exactly ``flaxcnn train``.
``vmap``        the K models stacked along a leading axis and trained by one jitted, vmapped
                step: each model draws its own batches (its own seed's epoch order), and its
                learning rate and weight decay are values in its optimizer state, so one
                compiled program serves all K. Runs differ from ``sequential`` only by float
                rounding (the batched convolutions sum in another order).
``auto``        ``sequential`` on CPU, ``vmap`` elsewhere (by the platform of the device the
                models are placed on, :func:`flaxcnn.train.steps.placement_platform`, not by
                ``jax.default_backend()``). XLA's CPU backend runs the batched
                convolutions of a vmapped CNN far slower than K separate ones (see
                ``benchmarks/scaling.py`` and docs/scaling.md for the numbers on this
                machine); on a GPU one program of K small models keeps the device busy where
                one small model leaves it mostly idle.

A vmap sweep needs a constant learning rate (``--schedule constant``); each member's run
directory holds the same files as a ``flaxcnn train`` run, and its checkpoints use the optimizer
layout of :func:`flaxcnn.train.optim.sgd` for its own settings, so ``flaxcnn evaluate`` /
``export`` / ``train --resume`` work on it. ``OUT/sweep.json`` lists the members, the strategy
and the times.
"""

from __future__ import annotations

import dataclasses
import itertools
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

from flaxcnn.data import Dataset, dataset_domain, load_dataset
from flaxcnn.errors import ConfigError, TrainingError
from flaxcnn.train.checkpoint import Checkpoints
from flaxcnn.train.config import TrainConfig
from flaxcnn.train.loop import Session, build_session, epoch_order, epoch_row, fit, summarize
from flaxcnn.train.optim import sgd
from flaxcnn.train.plots import plot_curves
from flaxcnn.train.progress import say
from flaxcnn.train.runlog import MetricsLog, prepare_run_dir, write_json
from flaxcnn.train.state import TrainState, split_model
from flaxcnn.train.steps import default_path, make_train_step, placement_platform

STRATEGIES = ("auto", "sequential", "vmap")


# ----------------------------------------------------------------------------- members

def member_name(config: TrainConfig) -> str:
    return f"seed{config.seed}-lr{config.lr:g}-wd{config.weight_decay:g}"


def member_configs(base: TrainConfig, out: str | Path, *, seeds: Sequence[int] | None = None,
                   lrs: Sequence[float] | None = None, weight_decays: Sequence[float] | None = None
                   ) -> list[TrainConfig]:
    """Every combination of the given values (the base's own value where a list is not given),
    each resolved and validated, with ``out = OUT/<seed..-lr..-wd..>``."""
    resolved = base.resolved(dataset_domain(base.dataset))
    grid = itertools.product(seeds if seeds else [resolved.seed], lrs if lrs else [resolved.lr],
                             weight_decays if weight_decays is not None and len(weight_decays) else
                             [resolved.weight_decay])
    configs = []
    for seed, lr, wd in grid:
        config = dataclasses.replace(resolved, seed=int(seed), lr=float(lr), weight_decay=float(wd))
        config = dataclasses.replace(config, out=str(Path(out) / member_name(config)))
        config.validate()
        configs.append(config)
    names = [member_name(c) for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"the sweep repeats a combination: {', '.join(names)}; give each value once")
    return configs


def choose_strategy(strategy: str, config: TrainConfig) -> str:
    """``auto``: sequential when the models are placed on a CPU device (vmapped convolutions are
    slow there; :func:`flaxcnn.train.steps.placement_platform`) and whenever the learning rate
    follows a schedule, vmap otherwise."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "vmap" and config.schedule != "constant":
        raise ConfigError(f"--strategy vmap needs --schedule constant (got {config.schedule!r}); "
                          "use --strategy sequential for scheduled learning rates")
    if strategy != "auto":
        return strategy
    return "sequential" if placement_platform() == "cpu" or config.schedule != "constant" else "vmap"


# ----------------------------------------------------------------------------- optimizer

def sweep_sgd(lr: float, weight_decay: float, momentum: float) -> optax.GradientTransformation:
    """:func:`flaxcnn.train.optim.sgd` with the weight decay injected too, so that it is a
    per-model value in a stacked state (``add_decayed_weights(0)`` adds exactly zero)."""

    def make(learning_rate, weight_decay):
        return optax.chain(optax.add_decayed_weights(weight_decay),
                           optax.sgd(learning_rate, momentum=momentum or None))

    return optax.inject_hyperparams(make)(learning_rate=lr, weight_decay=weight_decay)


def standard_opt_state(opt_state: Any, weight_decay: float) -> Any:
    """One member's :func:`sweep_sgd` state in the layout of ``sgd(lr, momentum, weight_decay)``
    (which has no weight-decay hyperparameter, and no decay stage when it is 0)."""
    inner = opt_state.inner_state if weight_decay else opt_state.inner_state[1:]
    return opt_state._replace(hyperparams={"learning_rate": opt_state.hyperparams["learning_rate"]},
                              inner_state=inner)


# ----------------------------------------------------------------------------- one member's files

@dataclass
class MemberRun:
    """The run directory of one member of a vmap sweep, written as :func:`fit` writes its own."""

    config: TrainConfig
    session: Session
    overwrite: bool
    rows: list[dict] = field(default_factory=list)
    best: float = -math.inf
    error: str | None = None

    def __post_init__(self) -> None:
        self.run_dir = prepare_run_dir(self.config.out, resume=False, overwrite=self.overwrite)
        dataset = self.session.dataset
        write_json(self.run_dir / "config.json", {"config": self.config.to_json(), "dataset": {
            "name": dataset.name, "source": dataset.source, "class_names": list(dataset.class_names),
            "info": dataset.info}, "backend": jax.default_backend(), "sweep": {"strategy": "vmap"}})
        self.log = MetricsLog(self.run_dir / "metrics.jsonl")
        self.checkpoints = Checkpoints(self.run_dir)

    @property
    def active(self) -> bool:
        return self.error is None

    def record(self, epoch: int, sums: np.ndarray, seconds: float, state: TrainState) -> dict | None:
        """Log one epoch (evaluate, checkpoint); a non-finite loss stops this member only."""
        if not np.all(np.isfinite(sums)):
            self.error = (f"the training loss became {sums[0]} in epoch {epoch}; this member stopped "
                          f"(lr {self.config.lr:g})")
            return None
        split = self.session.val_split
        val = self.session.evaluate(state, split)
        row = epoch_row(epoch, sums, seconds, val, split, float(state.opt_state.hyperparams["learning_rate"]))
        self.log.append(row)
        self.rows.append(row)
        if epoch % self.config.checkpoint_every == 0 or epoch == self.config.epochs:
            self.checkpoints.save_latest(epoch, state)
        if row["val_accuracy"] > self.best:
            self.best = row["val_accuracy"]
            self.checkpoints.save_best(epoch, state, {"metric": f"{split}_accuracy", "value": self.best})
        return row

    def finish(self, state: TrainState, wall_seconds: float) -> dict[str, Any]:
        self.checkpoints.close()
        summary = summarize(self.session, state, self.rows, wall_seconds)
        write_json(self.run_dir / "summary.json", summary)
        plot_curves(self.rows, self.run_dir / "curves.png", f"{self.config.model} on {self.session.dataset.name}")
        return summary


# ----------------------------------------------------------------------------- vmap

class VmapRunner:
    """K stacked models through one vmapped ``train_step``; the ``step`` / ``scan`` paths of
    :class:`flaxcnn.train.steps.EpochRunner` with one index batch per model."""

    def __init__(self, train_step, path: str):
        self.path = path

        def gather_step(state, x_all, y_all, idx):
            return train_step(state, x_all[idx], y_all[idx])

        step = jax.vmap(gather_step, in_axes=(0, None, None, 0))

        def scan_steps(state, x_all, y_all, idx_batches):
            return jax.lax.scan(lambda s, idx: (step(s, x_all, y_all, idx), None), state, idx_batches)[0]

        self._step = jax.jit(step, donate_argnums=0)
        self._scan = jax.jit(scan_steps, donate_argnums=0)

    def run(self, state: TrainState, x_all: jax.Array, y_all: jax.Array, orders: np.ndarray,
            batch_size: int) -> TrainState:
        """``orders``: (K, n), one epoch order per model; batches as ``EpochRunner.run``."""
        n = orders.shape[1]
        full = n // batch_size
        state = state.replace(metrics=jnp.zeros_like(state.metrics))
        orders = np.asarray(orders, np.int32)
        if self.path == "scan" and full:
            idx = orders[:, : full * batch_size].reshape(len(orders), full, batch_size).transpose(1, 0, 2)
            state = self._scan(state, x_all, y_all, jnp.asarray(idx))
        else:
            for b in range(full):
                state = self._step(state, x_all, y_all, jnp.asarray(orders[:, b * batch_size:(b + 1) * batch_size]))
        if n % batch_size:
            state = self._step(state, x_all, y_all, jnp.asarray(orders[:, full * batch_size:]))
        return state


def stack_states(session: Session, configs: Sequence[TrainConfig]) -> TrainState:
    """Each member's initial state (its seed's weights, its lr and weight decay), stacked."""
    num_classes = session.config.num_classes or session.dataset.num_classes
    states = []
    for config in configs:
        model = session.spec.build(num_classes, seed=config.seed, init=config.init)
        _, params, rest = split_model(model)
        tx = sweep_sgd(config.lr, config.weight_decay, config.momentum or 0.0)
        states.append(TrainState(params=params, rest=rest, opt_state=tx.init(params),
                                 step=jnp.zeros((), jnp.int32), metrics=jnp.zeros_like(session.state.metrics)))
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def member_state(stacked: TrainState, k: int, config: TrainConfig) -> TrainState:
    """Member ``k`` alone, with the optimizer state laid out as ``flaxcnn train`` saves it."""
    state = jax.tree.map(lambda leaf: leaf[k], stacked)
    state = state.replace(opt_state=standard_opt_state(state.opt_state, config.weight_decay))
    expected = jax.tree.structure(sgd(config.lr, config.momentum or 0.0, config.weight_decay).init(state.params))
    if jax.tree.structure(state.opt_state) != expected:  # optim.sgd changed its layout: keep runs loadable
        raise TrainingError(f"the sweep's optimizer state does not match flaxcnn.train.optim.sgd's layout "
                            f"({jax.tree.structure(state.opt_state)} vs {expected})")
    return state


def train_vmapped(configs: Sequence[TrainConfig], dataset: Dataset, *, overwrite: bool, quiet: bool
                  ) -> list[dict[str, Any]]:
    """Train all members in one program; returns one result per member (summary or error)."""
    wall_start = time.perf_counter()
    base = dataclasses.replace(configs[0], devices=1)  # one device holds all K models
    session = build_session(base, dataset)
    config = session.config
    path = default_path() if config.path == "auto" else config.path
    tx = sweep_sgd(config.lr, config.weight_decay, config.momentum or 0.0)  # hyperparameters come from the state
    runner = VmapRunner(make_train_step(session.graphs, session.spec.loss, tx, config.l2), path)
    members = [MemberRun(dataclasses.replace(c, path=path), dataclasses.replace(
        session, config=dataclasses.replace(c, path=path)), overwrite) for c in configs]
    state = stack_states(session, configs)
    x, y = session.device_arrays["train"]
    n = len(session.dataset.train)
    try:
        for epoch in range(1, config.epochs + 1):
            start = time.perf_counter()
            orders = np.stack([epoch_order(m.config, epoch, n) for m in members])
            state = runner.run(state, x, y, orders, config.batch_size)
            sums = np.asarray(state.metrics)  # (K, 4); blocks until the epoch is done
            seconds = time.perf_counter() - start
            accs = []
            for k, member in enumerate(members):
                if member.active:
                    row = member.record(epoch, sums[k], seconds, member_state(state, k, member.config))
                    accs.append(f"{row['val_accuracy']:.3f}" if row else "failed")
                else:
                    accs.append("failed")
            say(f"epoch {epoch:>3}/{config.epochs}  {len(members)} models in {seconds:.1f} s  "
                f"{session.val_split} acc " + " ".join(accs), quiet=quiet)
    finally:
        for member in members:
            member.checkpoints.close()
    results = []
    for k, member in enumerate(members):
        if member.active:
            summary = member.finish(member_state(state, k, member.config), time.perf_counter() - wall_start)
            results.append({"summary": summary})
        else:
            results.append({"error": member.error})
    return results


# ----------------------------------------------------------------------------- sequential

def train_sequential(configs: Sequence[TrainConfig], dataset: Dataset, *, overwrite: bool, quiet: bool
                     ) -> list[dict[str, Any]]:
    """``fit`` each member in turn; a member that fails (say, its loss diverges) does not stop the rest."""
    results = []
    for config in configs:
        say(f"--- {member_name(config)}", quiet=quiet)
        try:
            results.append({"summary": fit(config, quiet=quiet, overwrite=overwrite, dataset=dataset)})
        except TrainingError as error:
            say(f"{member_name(config)} failed: {error}", quiet=quiet)
            results.append({"error": str(error)})
    return results


# ----------------------------------------------------------------------------- entry point

def run_sweep(base: TrainConfig, out: str | Path, *, seeds: Sequence[int] | None = None,
              lrs: Sequence[float] | None = None, weight_decays: Sequence[float] | None = None,
              strategy: str = "auto", overwrite: bool = False, quiet: bool = False,
              dataset: Dataset | None = None) -> dict[str, Any]:
    """Train every combination and write ``OUT/<member>/`` runs plus ``OUT/sweep.json``."""
    configs = member_configs(base, out, seeds=seeds, lrs=lrs, weight_decays=weight_decays)
    chosen = choose_strategy(strategy, configs[0])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = configs[0]
    if dataset is None:
        dataset = load_dataset(first.dataset, first.data_dir, classes=first.classes, split=first.split,
                               val_fraction=first.val_fraction)
    say(f"sweep: {len(configs)} runs of {first.model} on {dataset.name}, strategy {chosen}"
        f"{' (all models on one device)' if chosen == 'vmap' else ''}"
        f"{' (auto on ' + placement_platform() + ')' if strategy == 'auto' else ''} -> {out}", quiet=quiet)
    start = time.perf_counter()
    train = train_vmapped if chosen == "vmap" else train_sequential
    results = train(configs, dataset, overwrite=overwrite, quiet=quiet)
    seconds = time.perf_counter() - start
    report = {
        "strategy": chosen, "strategy_asked": strategy, "backend": jax.default_backend(),
        "model": first.model, "dataset": dataset.name, "epochs": first.epochs, "batch_size": first.batch_size,
        "train_size": len(dataset.train), "seconds": seconds,
        "members": [_member_entry(config, result, out) for config, result in zip(configs, results)],
    }
    write_json(out / "sweep.json", report)
    if not quiet:
        print(table(report))
    return report


def _member_entry(config: TrainConfig, result: dict[str, Any], out: Path) -> dict[str, Any]:
    entry = {"name": member_name(config), "run_dir": str(Path(config.out).relative_to(out)), "seed": config.seed,
             "lr": config.lr, "weight_decay": config.weight_decay}
    if "error" in result:
        return {**entry, "status": "failed", "error": result["error"]}
    summary = result["summary"]
    keys = ("train_accuracy", "test_accuracy", "val_accuracy", "test_loss", "seconds")
    return {**entry, "status": "ok", **{k: summary[k] for k in keys if k in summary}}


def table(report: dict[str, Any]) -> str:
    lines = [f"{'run':<28} {'train acc':>9} {'test acc':>9}  status",
             *(f"{m['name']:<28} {m.get('train_accuracy', float('nan')):>9.4f} "
               f"{m.get('test_accuracy', float('nan')):>9.4f}  {m['status']}" for m in report["members"]),
             f"{len(report['members'])} runs, strategy {report['strategy']}, {report['seconds']:.1f} s"]
    return "\n".join(lines)
