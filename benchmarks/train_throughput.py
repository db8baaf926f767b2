"""Training throughput of flaxcnn against the labs' PyTorch loops, side by side.

    python -m benchmarks.train_throughput                       # every model, batch 64 and 256
    python -m benchmarks.train_throughput --models net --batch-sizes 64 --epochs 3
    python -m benchmarks.train_throughput --torch-compile --device gpu

Each framework runs in a process of its own (``--process-per``), on the same arrays and batch
sizes; the PyTorch process runs first and saves its init, which the flaxcnn process loads.
Writes JSON, a markdown table (also printed) and a PNG chart; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

from benchmarks.machine import load_average, machine_info
from benchmarks.process import run_isolated
from benchmarks.repeats import merge_processes
from benchmarks.report import attach_ratios, bar_chart, markdown
from benchmarks.timing import EVAL_BATCH, THROUGHPUT_METHOD, WARMUP_METHOD
from flaxcnn import cpu_memory
from flaxcnn.errors import ConfigError, FlaxcnnError
from flaxcnn.models.registry import MODELS, get_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# lab-loop always runs: it is the baseline; "step" brings "step-xla" (flaxcnn on XLA alone) with it
OPTIONAL_PATHS = ("torch-sliced", "step", "scan", "step-xla", "step-tuned")
DEFAULT_PATHS = ("torch-sliced", "step", "scan")
PROCESS_PER = ("framework", "model", "row")


def _list(text: str) -> list[str]:
    return [part for part in text.replace(",", " ").split() if part]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, help=f"registered models (default: all: {', '.join(MODELS)})")
    p.add_argument("--batch-sizes", nargs="+", default=["64", "256"], help="default: 64 256")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up epoch (default 3)")
    p.add_argument("--samples", type=int, default=10_000, help="training samples per epoch (default 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile (torch-sliced loop)")
    p.add_argument("--paths", nargs="+", default=list(DEFAULT_PATHS),
                   help=f"paths besides the lab loop, of {', '.join(OPTIONAL_PATHS)} (default: "
                        f"{' '.join(DEFAULT_PATHS)}; step brings step-xla, flaxcnn on XLA alone, with it)")
    p.add_argument("--conv-policy", default=None, metavar="FILE",
                   help="a policy file from `flaxcnn tune`: adds the step-tuned row, the step path under it")
    p.add_argument("--data-dir", default=None, help="real CIFAR-2 (cifar-10-batches-py) for the CIFAR models")
    p.add_argument("--speech-dir", default=None, help="real speech features (melspec_feats.npy) for speech models")
    p.add_argument("--process-per", choices=PROCESS_PER, default="model",
                   help="a new process per framework and model (default), per framework, or per row")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each flaxcnn process this many times and merge its rows (benchmarks/repeats.py): "
                        "the default-vs-forced interval then carries the spread between processes "
                        "(default 1; PyTorch processes run once)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads(N) in the PyTorch process (default: leave torch's own)")
    p.add_argument("--torch-keep-freed-memory", action="store_true",
                   help="give the PyTorch process flaxcnn's allocator setting (flaxcnn.cpu_memory) too; "
                        "default: PyTorch as installed, with glibc's own")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only redraw the markdown and PNG from a JSON written earlier")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--json", default=None, help="default: OUT_DIR/train_throughput.json")
    p.add_argument("--markdown", default=None, help="default: OUT_DIR/train_throughput.md")
    p.add_argument("--png", default=None, help="default: OUT_DIR/train_throughput.png")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """Validated settings; every user mistake is a ConfigError naming what is accepted."""
    models = _list(" ".join(args.models)) if args.models else list(MODELS)
    for name in models:
        get_model(name)
    try:
        batch_sizes = [int(b) for b in _list(" ".join(args.batch_sizes))]
    except ValueError:
        raise ConfigError(f"--batch-sizes takes integers, got {' '.join(args.batch_sizes)!r}") from None
    paths = _list(" ".join(args.paths))
    bad = [p for p in paths if p not in OPTIONAL_PATHS]
    if bad:
        raise ConfigError(f"unknown --paths {', '.join(bad)}; accepted: {', '.join(OPTIONAL_PATHS)} "
                          "(lab-loop always runs; torch-compile via --torch-compile)")
    if args.conv_policy:
        from flaxcnn.models import conv_policy

        conv_policy.load(args.conv_policy)  # a bad file fails here, before anything runs
        if "step-tuned" not in paths:
            paths.append("step-tuned")
    elif "step-tuned" in paths:
        raise ConfigError("--paths step-tuned needs --conv-policy FILE (a policy file from `flaxcnn tune`)")
    if "step" in paths and "step-xla" not in paths and args.device == "cpu":
        paths.append("step-xla")  # the XLA-only row beside the default, always
    if not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"--batch-sizes must be integers >= 1, got {batch_sizes}")
    if args.torch_threads is not None and args.torch_threads < 1:
        raise ConfigError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    if args.epochs < 1 or args.samples < 1:
        raise ConfigError(f"--epochs and --samples must be >= 1, got {args.epochs} and {args.samples}")
    data = ", ".join(f"{d}: {f}" for d, f in (("cifar", args.data_dir), ("speech", args.speech_dir)) if f)
    return {
        "models": models, "batch_sizes": batch_sizes, "epochs": args.epochs, "samples": args.samples,
        "seed": args.seed, "device": args.device, "torch_compile": args.torch_compile,
        "paths": ["lab-loop", *[p for p in OPTIONAL_PATHS if p in paths]]
                 + (["torch-compile"] if args.torch_compile else []),
        "data_dirs": {"cifar": args.data_dir, "speech": args.speech_dir},
        "data": "real data for " + data + ", synthetic otherwise" if data else "synthetic N(0, 1) images",
        "process_per": args.process_per, "repeats": args.repeats, "torch_threads": args.torch_threads,
        "torch_keep_freed_memory": args.torch_keep_freed_memory,
        "conv_policy": str(Path(args.conv_policy).resolve()) if args.conv_policy else None,
        "warmup_method": WARMUP_METHOD, "throughput_method": THROUGHPUT_METHOD, "eval_batch": EVAL_BATCH,
        "timing_order": "the rows of one framework, model and batch size interleaved, epoch by epoch",
    }


def framework_of(path: str) -> str:
    return "flaxcnn" if path in ("step", "scan", "step-xla", "step-tuned") else "torch"


def plan_jobs(settings: dict[str, Any], init_dir: str) -> list[dict[str, Any]]:
    """Worker jobs in run order: PyTorch before flaxcnn (it saves the init flaxcnn loads)."""
    rows = [{"model": m, "batch_size": b, "path": p} for m in settings["models"]
            for b in settings["batch_sizes"] for p in settings["paths"]]
    common = {k: settings.get(k) for k in ("epochs", "samples", "seed", "device", "data_dirs", "torch_threads",
                                           "conv_policy")}
    per = settings["process_per"]
    jobs: dict[tuple, dict[str, Any]] = {}  # insertion order: lab-loop (torch) opens each group
    for row in rows:
        fw = framework_of(row["path"])
        key = {"framework": (fw,), "model": (row["model"], fw), "row": tuple(row.values())}[per]
        jobs.setdefault(key, {**common, "framework": fw, "init_dir": init_dir, "rows": []})["rows"].append(row)
    return list(jobs.values())


def worker_env(framework: str, settings: dict[str, Any]) -> dict[str, str]:
    """``--device cpu`` pins JAX to its CPU backend. Threads are left as they are unless
    ``--torch-threads`` says otherwise (applied by the torch worker, recorded in "machine").
    The PyTorch worker imports flaxcnn (the registry), which would apply flaxcnn's allocator
    setting (:mod:`flaxcnn.cpu_memory`) to PyTorch too: it is off there unless
    ``--torch-keep-freed-memory``, so that PyTorch runs as installed."""
    if framework == "torch":
        return {cpu_memory.ENV: "1" if settings.get("torch_keep_freed_memory") else "0"}
    return {"JAX_PLATFORMS": "cpu"} if settings["device"] == "cpu" else {}


def run(settings: dict[str, Any], on_job_done: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every job; ``on_job_done(partial report)`` after each one (``"complete": False``)."""
    machine = {**machine_info(), "loadavg_before": load_average()}
    report = {"machine": machine, "settings": settings, "results": [], "complete": False}
    with tempfile.TemporaryDirectory(prefix="flaxcnn-bench-init-") as init_dir:
        for job in plan_jobs(settings, init_dir):
            fw = job["framework"]
            repeats = settings.get("repeats", 1) if fw == "flaxcnn" else 1
            runs = []
            for repeat in range(repeats):
                print(f"[{fw}] {len(job['rows'])} row(s) in a new process"
                      + (f" ({repeat + 1} of {repeats})" if repeats > 1 else ""), file=sys.stderr, flush=True)
                out = run_isolated("benchmarks.measure:run_rows", job, env=worker_env(fw, settings), label=fw)
                runs.append(out["results"])
            machine.update(out["info"])
            report["results"] = attach_ratios(report["results"] + merge_processes(runs))
            machine["loadavg_latest"] = load_average()
            if on_job_done:
                on_job_done(report)
    machine["loadavg_after"] = load_average()
    report["complete"] = True
    return report


def output_paths(args: argparse.Namespace) -> dict[str, Path]:
    out_dir = Path(args.out_dir)
    return {k: Path(getattr(args, k) or out_dir / f"train_throughput.{ext}")
            for k, ext in (("json", "json"), ("markdown", "md"), ("png", "png"))}


def write_outputs(report: dict[str, Any], targets: dict[str, Path]) -> str:
    """JSON, markdown and PNG; returns the markdown table."""
    for target in targets.values():
        target.parent.mkdir(parents=True, exist_ok=True)
    targets["json"].write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    targets["markdown"].write_text(table)
    bar_chart(report, targets["png"])
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    targets = output_paths(args)
    try:
        if args.render:
            report = json.loads(Path(args.render).read_text())
            report["results"] = attach_ratios(report["results"])  # what this version derives from them
        else:
            report = run(settings_from(args), on_job_done=lambda partial: write_outputs(partial, targets))
    except FlaxcnnError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, json.JSONDecodeError) as error:
        print(f"error: cannot read --render {args.render}: {error}", file=sys.stderr)
        return 2
    print(write_outputs(report, targets) + "\nwrote " + ", ".join(str(t) for t in targets.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
