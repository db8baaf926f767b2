"""Scaling: training throughput vs number of devices (data parallel) and vs number of models
trained in one program (``flaxcnn sweep --strategy vmap``), plus the sweep end to end.

    python -m benchmarks.scaling                                   # CPU, forced devices 1 2 4; K 1 2 4 8
    python -m benchmarks.scaling --devices 1 2 --ks 1 4 --samples 2000 --epochs 2 --no-sweep
    python -m benchmarks.scaling --data-dir ../shared/data/cifar2 --sweep-epochs 3   # real CIFAR-2
    python -m benchmarks.scaling --platform gpu --devices 1 --ks 1 4 16 64

Three parts, each run in fresh processes (``benchmarks.process.run_isolated``):

``devices``  one process per device count N trains ``--model`` through ``flaxcnn``'s session
             with ``TrainConfig(devices=N)`` at the same global batch. On CPU the N devices are
             forced with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``: they share this
             machine's cores, so the figure is the cost of the sharded program, not a speed-up.
``models``   ``sequential``: one model in the engine's ``EpochRunner`` (what each run of a
             sequential sweep executes); ``vmap``: K stacked models in the sweep's ``VmapRunner``.
             Throughput counts model-samples (K x samples per epoch / epoch seconds); the ratio is
             vmap's over sequential's, > 1 when one program beats K runs one after another.
``sweep``    ``flaxcnn.train.sweep.run_sweep`` with K seeds, once per strategy, whole runs
             (data loading, compilation, evaluation, checkpoints and files included).

Throughput: one warm-up epoch, then the median of ``--epochs`` timed epochs
(``benchmarks.timing.time_training``). Writes ``scaling.json`` and ``scaling.png`` into
``--out-dir`` (default ``benchmarks/results``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.data import bench_data
from benchmarks.machine import load_average, machine_info
from benchmarks.process import run_isolated
from benchmarks.timing import WARMUP_METHOD, peak_rss_mb, time_training
from flaxcnn.errors import ConfigError, FlaxcnnError

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- workers (child processes)

def _setup(job: dict[str, Any]):
    """JAX settings, the data set and the base config of a worker."""
    import jax

    from flaxcnn.data import Dataset, SplitArrays
    from flaxcnn.models.registry import get_model
    from flaxcnn.train.config import TrainConfig

    if job["platform"] == "gpu":
        jax.config.update("jax_default_matmul_precision", "highest")
    spec = get_model(job["model"])
    data = bench_data(spec, job["samples"], job["seed"], {spec.domain: job.get("data_dir")})
    dataset = Dataset("cifar2" if spec.domain == "cifar" else "speech", SplitArrays(data.x, data.y),
                      SplitArrays(data.eval_x, data.eval_y),
                      tuple(str(i) for i in range(int(max(data.y.max(), data.eval_y.max())) + 1)), source=data.source)
    config = TrainConfig(model=spec.name, dataset=dataset.name, batch_size=job["batch_size"], epochs=job["epochs"],
                         seed=job["seed"], path=job["path"])
    return dataset, config


def _jax_info() -> dict[str, Any]:
    import os

    import jax

    return {"jax": jax.__version__, "backend": jax.default_backend(), "local_devices": jax.local_device_count(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


class _SessionTrainer:
    """``benchmarks.timing``'s trainer over a flaxcnn session (one model, any number of devices)."""

    def __init__(self, session):
        self.session, self.state = session, session.state

    def train_epoch(self, epoch: int) -> float:
        import numpy as np

        from flaxcnn.train.loop import train_epoch

        self.state, sums, _ = train_epoch(self.session, self.state, epoch)
        return float(np.sum(sums["objective"]))


class _VmapTrainer:
    """K stacked models of the sweep's vmap strategy."""

    def __init__(self, session, k: int):
        from flaxcnn.train.steps import make_train_step
        from flaxcnn.train.sweep import VmapRunner, member_configs, stack_states, sweep_sgd

        config = session.config
        self.session, self.configs = session, member_configs(config, "unused", seeds=range(config.seed,
                                                                                          config.seed + k))
        self.state = stack_states(session, self.configs)
        tx = sweep_sgd(config.lr, config.weight_decay, config.momentum or 0.0)
        self.runner = VmapRunner(make_train_step(session.graphs, session.spec.loss, tx, config.l2), config.path)

    def train_epoch(self, epoch: int) -> float:
        import numpy as np

        from flaxcnn.train.loop import epoch_order

        n = len(self.session.dataset.train)
        orders = np.stack([epoch_order(c, epoch, n) for c in self.configs])
        self.state = self.runner.run(self.state, *self.session.device_arrays["train"], orders,
                                     self.session.config.batch_size)
        return float(np.asarray(self.state.metrics.objective).sum())


def devices_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Throughput of one model trained data parallel over ``job["devices"]`` devices."""
    import dataclasses

    from flaxcnn.train.loop import build_session

    dataset, config = _setup(job)
    session = build_session(dataclasses.replace(config, devices=job["devices"]), dataset)
    row = {"devices": job["devices"], "runner": type(session.runner).__name__, "path": session.config.path,
           **time_training(_SessionTrainer(session), len(dataset.train), job["epochs"])}
    return {"info": _jax_info(), "row": {**row, "peak_rss_mb": peak_rss_mb()}}


def models_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Throughput of K models: ``sequential`` (one model; K runs take K times as long) or ``vmap``."""
    import dataclasses

    from flaxcnn.train.loop import build_session

    dataset, config = _setup(job)
    session = build_session(dataclasses.replace(config, devices=1), dataset)
    k = job["k"]
    trainer = _SessionTrainer(session) if job["strategy"] == "sequential" else _VmapTrainer(session, k)
    timing = time_training(trainer, len(dataset.train), job["epochs"])
    per_program = timing["samples_per_second"]
    row = {"strategy": job["strategy"], "k": k, "path": session.config.path, **timing,
           "model_samples_per_second": per_program * (k if job["strategy"] == "vmap" else 1),
           "peak_rss_mb": peak_rss_mb()}
    return {"info": _jax_info(), "row": row}


def sweep_worker(job: dict[str, Any]) -> dict[str, Any]:
    """``run_sweep`` end to end for one strategy; wall seconds and what the runs report."""
    import time

    from flaxcnn.train.sweep import run_sweep

    dataset, config = _setup(job)
    with tempfile.TemporaryDirectory(prefix="flaxcnn-bench-sweep-") as out:
        start = time.perf_counter()
        report = run_sweep(config, out, seeds=list(range(job["seed"], job["seed"] + job["k"])),
                           strategy=job["strategy"], quiet=True, dataset=dataset)
        wall = time.perf_counter() - start
    ok = [m for m in report["members"] if m["status"] == "ok"]
    train_seconds = (max(m["seconds"] for m in ok) if report["strategy"] == "vmap"  # members share epochs
                     else sum(m["seconds"] for m in ok))
    row = {"strategy": report["strategy"], "k": job["k"], "epochs": job["epochs"], "wall_seconds": wall,
           "train_seconds": train_seconds, "runs_written": len(ok),
           "test_accuracy": [m["test_accuracy"] for m in ok], "peak_rss_mb": peak_rss_mb()}
    return {"info": _jax_info(), "row": row}


# ----------------------------------------------------------------------------- parent

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="net")
    p.add_argument("--platform", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: devices forced with XLA_FLAGS; gpu: the machine's own devices")
    p.add_argument("--devices", type=int, nargs="*", default=[1, 2, 4], help="device counts (default 1 2 4)")
    p.add_argument("--ks", type=int, nargs="*", default=[1, 2, 4, 8], help="models per program (default 1 2 4 8)")
    p.add_argument("--samples", type=int, default=2000, help="training images per epoch (default 2000)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (default 64, lab 8's)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up one (default 3)")
    p.add_argument("--path", choices=("auto", "step", "scan"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="real CIFAR-2 (cifar-10-batches-py) instead of synthetic images")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the end-to-end sweep part")
    p.add_argument("--sweep-k", type=int, default=4, help="seeds in the end-to-end sweep (default 4)")
    p.add_argument("--sweep-epochs", type=int, default=2, help="epochs of each end-to-end run (default 2)")
    p.add_argument("--sweep-samples", type=int, default=None,
                   help="training images of the end-to-end sweep (default: all of --data-dir, else --samples)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    from flaxcnn.models.registry import get_model

    get_model(args.model)
    for name, values in (("--devices", args.devices), ("--ks", args.ks)):
        if any(v < 1 for v in values):
            raise ConfigError(f"{name} takes integers >= 1, got {values}")
    for name, value in (("--samples", args.samples), ("--batch-size", args.batch_size), ("--epochs", args.epochs),
                        ("--sweep-k", args.sweep_k), ("--sweep-epochs", args.sweep_epochs)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    sweep_samples = args.sweep_samples or (10**9 if args.data_dir else args.samples)
    return {"model": args.model, "platform": args.platform, "devices": args.devices, "ks": args.ks,
            "samples": args.samples, "batch_size": args.batch_size, "epochs": args.epochs, "path": args.path,
            "seed": args.seed, "data_dir": args.data_dir, "sweep": args.sweep, "sweep_k": args.sweep_k,
            "sweep_epochs": args.sweep_epochs, "sweep_samples": sweep_samples, "warmup_method": WARMUP_METHOD}


def _env(settings: dict[str, Any], devices: int | None = None) -> dict[str, str]:
    if settings["platform"] != "cpu":
        return {}
    env = {"JAX_PLATFORMS": "cpu"}
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run(settings: dict[str, Any], on_part_done=None) -> dict[str, Any]:
    common = {k: settings[k] for k in ("model", "platform", "samples", "batch_size", "epochs", "path", "seed",
                                       "data_dir")}
    report = {"machine": {**machine_info(), "loadavg_before": load_average()}, "settings": settings,
              "devices": [], "models": [], "sweep": [], "complete": False}

    def record(part: str, out: dict[str, Any]) -> None:
        report[part].append({**out["row"], "jax": out["info"]})
        report["machine"]["loadavg_latest"] = load_average()
        print(f"  {part}: {summary_line(part, out['row'])}", file=sys.stderr, flush=True)
        if on_part_done:
            on_part_done(report)

    for n in settings["devices"]:
        env = _env(settings, n)
        record("devices", run_isolated("benchmarks.scaling:devices_worker", {**common, "devices": n}, env=env,
                                       label=f"{n}-device"))
    if settings["ks"]:
        record("models", run_isolated("benchmarks.scaling:models_worker",
                                      {**common, "strategy": "sequential", "k": 1}, env=_env(settings, 1),
                                      label="sequential"))
    for k in settings["ks"]:
        record("models", run_isolated("benchmarks.scaling:models_worker", {**common, "strategy": "vmap", "k": k},
                                      env=_env(settings, 1), label=f"vmap K={k}"))
    if settings["sweep"]:
        sweep_job = {**common, "samples": settings["sweep_samples"], "epochs": settings["sweep_epochs"],
                     "k": settings["sweep_k"]}
        for strategy in ("sequential", "vmap"):
            record("sweep", run_isolated("benchmarks.scaling:sweep_worker", {**sweep_job, "strategy": strategy},
                                         env=_env(settings, 1), label=f"sweep {strategy}"))
    report["machine"]["loadavg_after"] = load_average()
    report["complete"] = True
    return report


def attach_ratios(report: dict[str, Any]) -> None:
    """devices: samples/s over the 1-device row's; models: model-samples/s over sequential's;
    sweep: sequential wall seconds over each strategy's (> 1: faster than sequential)."""
    one = [r for r in report["devices"] if r["devices"] == 1]
    for row in report["devices"]:
        row["speedup_vs_1_device"] = row["samples_per_second"] / one[0]["samples_per_second"] if one else None
    seq = [r for r in report["models"] if r["strategy"] == "sequential"]
    for row in report["models"]:
        row["ratio_vs_sequential"] = (row["model_samples_per_second"] / seq[0]["model_samples_per_second"]
                                      if seq else None)
    seq = [r for r in report["sweep"] if r["strategy"] == "sequential"]
    for row in report["sweep"]:
        row["speedup_vs_sequential"] = seq[0]["wall_seconds"] / row["wall_seconds"] if seq else None


def summary_line(part: str, row: dict[str, Any]) -> str:
    if part == "devices":
        return f"{row['devices']} device(s): {row['samples_per_second']:,.0f} samples/s"
    if part == "models":
        return f"{row['strategy']} K={row['k']}: {row['model_samples_per_second']:,.0f} model-samples/s"
    return f"{row['strategy']} K={row['k']}: {row['wall_seconds']:.1f} s wall, {row['runs_written']} runs"


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    lines = [f"# Scaling: {s['model']}, batch {s['batch_size']}, {s['platform']}",
             f"- machine: {m['cpu_model']}, {m['cpu_count']} cores; load average before {m.get('loadavg_before')}, "
             f"after {m.get('loadavg_after')}",
             f"- throughput: median of {s['epochs']} epochs of {s['samples']} images after one warm-up epoch", ""]
    if report["devices"]:
        lines += ["| devices | runner | samples/s | vs 1 device |", "|---:|---|---:|---:|"]
        lines += [f"| {r['devices']} | {r['runner']} | {r['samples_per_second']:,.0f} | "
                  f"{_fmt(r['speedup_vs_1_device'], '.2f')}x |" for r in report["devices"]]
        lines.append("")
    if report["models"]:
        lines += ["| strategy | K | model-samples/s | vs sequential | warm-up s |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['strategy']} | {r['k']} | {r['model_samples_per_second']:,.0f} | "
                  f"{_fmt(r['ratio_vs_sequential'], '.2f')}x | {r['warmup_seconds']:.1f} |" for r in report["models"]]
        lines.append("")
    if report["sweep"]:
        lines += [f"| sweep strategy | K | epochs | wall s | training s | vs sequential |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['strategy']} | {r['k']} | {r['epochs']} | {r['wall_seconds']:.1f} | "
                  f"{r['train_seconds']:.1f} | {_fmt(r['speedup_vs_sequential'], '.2f')}x |" for r in report["sweep"]]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rows = report["devices"]
    if rows:
        left.plot([r["devices"] for r in rows], [r["samples_per_second"] for r in rows], "o-")
        left.set_xticks([r["devices"] for r in rows])
    left.set_xlabel("devices (data parallel" + (", forced on CPU)" if report["settings"]["platform"] == "cpu"
                                                  else ")"))
    left.set_ylabel("training samples/s")
    left.set_ylim(bottom=0)
    left.set_title("Data parallel, same global batch")
    vmap = [r for r in report["models"] if r["strategy"] == "vmap"]
    seq = [r for r in report["models"] if r["strategy"] == "sequential"]
    if vmap:
        right.plot([r["k"] for r in vmap], [r["model_samples_per_second"] for r in vmap], "o-", label="vmap (one program)")
        right.set_xticks([r["k"] for r in vmap])
    if seq:
        right.axhline(seq[0]["model_samples_per_second"], color="black", linestyle="--", label="sequential runs")
    right.set_xlabel("models K")
    right.set_ylabel("model-samples/s")
    right.set_ylim(bottom=0)
    right.set_title("K models of a sweep")
    if vmap or seq:
        right.legend(fontsize=8)
    fig.suptitle(f"{report['settings']['model']}, batch {report['settings']['batch_size']}, "
                 f"{report['machine']['cpu_count']}-core {report['settings']['platform']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    attach_ratios(report)
    (out_dir / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out_dir / "scaling.png")
    return table(report)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    try:
        report = run(settings_from(args), on_part_done=lambda partial: write_outputs(partial, out_dir))
    except FlaxcnnError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(write_outputs(report, out_dir) + f"\nwrote {out_dir / 'scaling.json'}, {out_dir / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
