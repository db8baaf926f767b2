"""Wall-clock seconds until a model reaches a target test accuracy: flaxcnn vs the PyTorch lab loop.

    python -m benchmarks.time_to_accuracy --data-dir /work/shared/data/cifar2 --target 0.87

Same protocol on both sides: the real data set normalized by ``flaxcnn.data.load_dataset``, the
same initial weights (the PyTorch process saves its init, the flaxcnn process loads it), SGD with
the lab's settings, test accuracy evaluated after every epoch, at most ``--max-epochs`` epochs.
The clock starts after the data is loaded and includes building the model, compiling,
training and the per-epoch evaluations. Each framework runs in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.data import real
from benchmarks.machine import load_average, machine_info
from benchmarks.measure import framework_info, make_trainer
from benchmarks.process import run_isolated
from benchmarks.report import threads_note
from benchmarks.settings import LR, lab_batch_size, lab_momentum
from benchmarks.train_throughput import RESULTS_DIR, worker_env
from flaxcnn.errors import ConfigError, FlaxcnnError
from flaxcnn.models.registry import get_model

FRAMEWORKS = ("torch", "flaxcnn")


def race(job: dict[str, Any]) -> dict[str, Any]:
    """Entry point of a worker process: train one framework until the target or the cap."""
    framework, spec = job["framework"], get_model(job["model"])
    info = framework_info(framework, job["device"], job.get("torch_threads"))
    start = time.perf_counter()
    data = real(spec, job["data_dir"], sys.maxsize)
    data_seconds = time.perf_counter() - start
    path = job["path"]
    if framework == "flaxcnn" and path == "auto":
        from flaxcnn.train.steps import default_path

        path = default_path()

    start = time.perf_counter()
    trainer = make_trainer(framework, spec, path, data, job["batch_size"], seed=job["seed"], device=job["device"],
                           init_dir=Path(job["init_dir"]))
    eval_x, eval_y = trainer.eval_arrays(data)
    history, train_seconds = [], 0.0
    for epoch in range(1, job["max_epochs"] + 1):
        epoch_start = time.perf_counter()
        loss_sum = trainer.train_epoch(epoch)
        train_seconds += time.perf_counter() - epoch_start
        accuracy = trainer.evaluate(eval_x, eval_y)["accuracy"]
        history.append({"epoch": epoch, "seconds": time.perf_counter() - start, "train_seconds": train_seconds,
                        "train_loss_sum": loss_sum, "test_accuracy": accuracy})
        print(f"  {framework:>7} {path}: epoch {epoch:>3}  test accuracy {accuracy:.4f}  "
              f"{history[-1]['seconds']:7.1f} s", file=sys.stderr, flush=True)
        if accuracy >= job["target"]:
            break
    reached = history[-1]["test_accuracy"] >= job["target"]
    return {"info": info, "result": {
        "framework": framework, "path": path, "model": spec.name, "target": job["target"], "reached": reached,
        "seconds_to_target": history[-1]["seconds"] if reached else None,
        "train_seconds_to_target": history[-1]["train_seconds"] if reached else None,
        "epochs_to_target": history[-1]["epoch"] if reached else None,
        "epochs_run": len(history), "best_test_accuracy": max(h["test_accuracy"] for h in history),
        "data_seconds_excluded": data_seconds, "train_samples": len(data.y), "test_samples": len(data.eval_y),
        "data": data.source, "init": getattr(trainer, "init", "torch.manual_seed"), "history": history,
    }}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.time_to_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="real data (CIFAR-2: a cifar-10-batches-py folder or its parent)")
    p.add_argument("--target", type=float, default=0.87, help="test accuracy to reach (default 0.87)")
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--model", default="net")
    p.add_argument("--batch-size", type=int, default=None, help="default: the lab's (64 for CIFAR models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--path", choices=("auto", "step", "scan"), default="auto", help="flaxcnn path (auto: default)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads(N) in the PyTorch process (default: leave torch's own)")
    p.add_argument("--json", default=str(RESULTS_DIR / "time_to_accuracy.json"))
    p.add_argument("--markdown", default=str(RESULTS_DIR / "time_to_accuracy.md"))
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    spec = get_model(args.model)
    if not 0 < args.target <= 1:
        raise ConfigError(f"--target is an accuracy in (0, 1], got {args.target}")
    if args.max_epochs < 1:
        raise ConfigError(f"--max-epochs must be >= 1, got {args.max_epochs}")
    if not Path(args.data_dir).exists():
        raise ConfigError(f"--data-dir {args.data_dir} does not exist")
    if args.torch_threads is not None and args.torch_threads < 1:
        raise ConfigError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    batch_size = args.batch_size or lab_batch_size(spec)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    return {"model": spec.name, "data_dir": args.data_dir, "target": args.target, "max_epochs": args.max_epochs,
            "batch_size": batch_size, "seed": args.seed, "path": args.path, "device": args.device,
            "lr": LR, "momentum": lab_momentum(spec), "torch_threads": args.torch_threads}


def run(settings: dict[str, Any]) -> dict[str, Any]:
    machine = {**machine_info(), "loadavg_before": load_average()}
    results = []
    with tempfile.TemporaryDirectory(prefix="flaxcnn-tta-init-") as init_dir:
        for framework in FRAMEWORKS:  # torch first: it saves the init flaxcnn starts from
            job = {**settings, "framework": framework, "init_dir": init_dir,
                   "path": "lab-loop" if framework == "torch" else settings["path"]}
            print(f"[{framework}] training until test accuracy {settings['target']}", file=sys.stderr, flush=True)
            out = run_isolated("benchmarks.time_to_accuracy:race", job, env=worker_env(framework, settings),
                               label=framework)
            machine.update(out["info"])
            results.append(out["result"])
    machine["loadavg_after"] = load_average()
    return {"machine": machine, "settings": settings, "results": results}


def _fmt(value, spec: str) -> str:
    return "not reached" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"# Time to {s['target']:.2f} test accuracy: {s['model']}, batch {s['batch_size']}, SGD lr {s['lr']:g}",
        "",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} cores; load average before {m.get('loadavg_before')}, "
        f"after {m.get('loadavg_after')}; torch {m.get('torch')} ({threads_note(m)}), "
        f"jax {m.get('jax')} ({m.get('jax_backend')}); device {s['device']}",
        "- wall seconds from after data loading (model build, compile, training and per-epoch test "
        f"evaluation included) until test accuracy >= {s['target']}; at most {s['max_epochs']} epochs",
        "",
        "| framework | path | seconds to target | epochs | train seconds | s/epoch | best test acc "
        "| data load s (excluded) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        per_epoch = r["history"][-1]["train_seconds"] / r["epochs_run"]
        lines.append(f"| {r['framework']} | {r['path']} | {_fmt(r['seconds_to_target'], '.1f')} | "
                     f"{_fmt(r['epochs_to_target'], 'd')} | {_fmt(r['train_seconds_to_target'], '.1f')} | "
                     f"{per_epoch:.2f} | {r['best_test_accuracy']:.4f} | {r['data_seconds_excluded']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(settings_from(args))
    except FlaxcnnError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for target in (args.json, args.markdown):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    Path(args.markdown).write_text(table)
    print(table + f"\nwrote {args.json}, {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
