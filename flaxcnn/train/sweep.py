"""Many small models at once: ``flaxcnn sweep`` trains every combination of seeds, learning
rates and weight decays, and writes one run directory per combination, like ``flaxcnn train``.

Strategies (``--strategy``):

``sequential``  one :func:`flaxcnn.train.loop.fit` per combination, one after another in this
                process (the data set is loaded once). Each run is exactly ``flaxcnn train``.
``vmap``        the K models stacked along a leading axis and trained by the engine's own loop
                (:func:`flaxcnn.train.loop.run_epochs`) with a vmapped step: each model draws
                its own batches (its own seed's epoch order) and augmentation, and its learning
                rate and weight decay are values in its optimizer state, so one compiled
                program serves all K. Runs differ from ``sequential`` only by float rounding
                (the batched convolutions sum in another order).
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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from flaxcnn.data import Dataset, dataset_domain, load_dataset
from flaxcnn.errors import ConfigError, TrainingError
from flaxcnn.train.config import STRATEGIES, TrainConfig
from flaxcnn.train.loop import (
    Diverged, RunRecord, Session, build_session, finish_run, fit, initial_states, member_state, run_epochs,
)
from flaxcnn.train.optim import stackable_sgd
from flaxcnn.train.progress import say
from flaxcnn.train.runlog import prepare_run_dir, write_json
from flaxcnn.train.state import TrainState
from flaxcnn.train.steps import EpochRunner, placement_platform

__all__ = ["run_sweep", "member_configs", "choose_strategy", "member_state", "stack_states", "sweep_sgd",
           "VmapRunner", "STRATEGIES"]


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


# ----------------------------------------------------------------------------- vmap

def sweep_sgd(lr: float, weight_decay: float, momentum: float):
    """The stacked models' optimizer (:func:`flaxcnn.train.optim.stackable_sgd`)."""
    return stackable_sgd(lr, momentum, weight_decay)


def stack_states(session: Session, configs: Sequence[TrainConfig]) -> TrainState:
    """Each member's initial state (its seed's weights, its lr and weight decay), stacked."""
    return initial_states(session.spec, session.config.num_classes or session.dataset.num_classes, configs)


def VmapRunner(train_step: Callable[[TrainState, jax.Array, jax.Array], TrainState], path: str  # noqa: N802
               ) -> EpochRunner:
    """The engine's :class:`~flaxcnn.train.steps.EpochRunner` over K stacked models (the name
    ``benchmarks/scaling.py`` uses)."""
    return EpochRunner(train_step, path, stacked=True)


def train_vmapped(configs: Sequence[TrainConfig], dataset: Dataset, *, overwrite: bool, quiet: bool
                  ) -> list[dict[str, Any]]:
    """Train all members in one program; returns one result per member (summary or error)."""
    wall_start = time.perf_counter()
    base = dataclasses.replace(configs[0], devices=1)  # one device holds all K models
    session = build_session(base, dataset, members=configs)
    records = [RunRecord.open(config, prepare_run_dir(config.out, resume=False, overwrite=overwrite), dataset,
                              sweep={"strategy": "vmap"}) for config in session.members]
    try:
        state = run_epochs(session, session.state, records, quiet=quiet)
    except Diverged as error:  # the last member left diverged: each record holds its own error
        say(f"every member failed: {error}", quiet=quiet)
        return [{"error": record.error} for record in records]
    return [{"error": record.error} if record.error else
            {"summary": finish_run(record, session, session.member(state, k), time.perf_counter() - wall_start)}
            for k, record in enumerate(records)]


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
