"""Training throughput of ported models: flaxcnn's jitted step on the ``flaxcnn port`` of a
network against the same torch module in PyTorch eager and ``torch.compile``, one run.

    python -m benchmarks.port_throughput                         # every zoo network, batch 64
    python -m benchmarks.port_throughput --models resnet18 unet --steps 5 --repeats 3

The networks are tests/port_zoo.py's (full size unless ``--size small``), input 3x32x32, 10
classes (the U-Net: a 3-class per-pixel map, cross-entropy over every pixel). Every path
starts from the torch module's initial weights and trains with the same SGD (``--lr``,
``--momentum``) on the same synthetic batches, in the same order. A repeat is ``--steps``
training steps; the first repeat of each path is its warm-up (tracing, compiling) and is not
timed; the timed repeats of the paths run round by round, rotating their order
(:func:`benchmarks.timing.time_training_interleaved`). Reported: the median samples/s over
the repeats with a percentile-bootstrap 95% interval, and flaxcnn's speed over each PyTorch
path as the median of the per-round ratios (:func:`benchmarks.report.paired_ratio`).

All paths run in this one process (the port needs torch beside JAX), so their thread pools
coexist; each path's threads idle while another runs. Writes JSON (default
``benchmarks/results/port_throughput-<cpu>.json``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data import BenchData
from benchmarks.machine import load_average, machine_info
from benchmarks.port_paths import PER_PIXEL, PortedTrainer, TorchSpec
from benchmarks.report import paired_ratio
from benchmarks.timing import time_training_interleaved
from flaxcnn.errors import ConfigError, FlaxcnnError

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: path -> (framework, what it is)
PATHS = {
    "flaxcnn": ("flaxcnn", "the ported NNX module in flaxcnn's jitted training step"),
    "torch-eager": ("torch", "the torch module, eager (benchmarks.torch_paths' torch-sliced loop)"),
    "torch-compile": ("torch", "torch.compile of the torch module in the same loop"),
}
TORCH_PATH = {"torch-eager": "torch-sliced", "torch-compile": "torch-compile"}
INTERVAL = "percentile bootstrap 95% interval of the median (4000 resamples of the timed repeats, seed 0)"
BOOTSTRAP_RESAMPLES = 4000


def _list(values: list[str]) -> list[str]:
    return [part for text in values for part in text.replace(",", " ").split() if part]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from tests.port_zoo import ZOO

    p = argparse.ArgumentParser(prog="python -m benchmarks.port_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, help=f"zoo networks (default: all: {', '.join(ZOO)})")
    p.add_argument("--size", choices=("full", "small"), default="full", help="the zoo's configuration (default full)")
    p.add_argument("--batch", type=int, default=64, help="training batch size (default 64)")
    p.add_argument("--steps", type=int, default=10, help="training steps per repeat (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after the warm-up repeat (default 5)")
    p.add_argument("--paths", nargs="+", default=list(PATHS), help=f"of {', '.join(PATHS)} (default: all)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="the JSON file (default: benchmarks/results/port_throughput-<cpu>.json)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """Validated settings; a mistake is a ConfigError naming what is accepted."""
    from tests.port_zoo import ZOO

    models = _list(args.models) if args.models else list(ZOO)
    unknown = [m for m in models if m not in ZOO]
    if unknown:
        raise ConfigError(f"unknown --models {', '.join(unknown)}; accepted: {', '.join(ZOO)}")
    paths = _list(args.paths)
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        raise ConfigError(f"--paths takes some of {', '.join(PATHS)}, got {' '.join(args.paths)!r}")
    for name in ("batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    return {"models": models, "size": args.size, "batch_size": args.batch, "steps_per_repeat": args.steps,
            "repeats": args.repeats, "paths": [p for p in PATHS if p in paths], "lr": args.lr,
            "momentum": args.momentum, "seed": args.seed,
            "samples_per_repeat": args.batch * args.steps,
            "timing": "1 warm-up repeat per path (not timed), then the timed repeats round by round, "
                      "the paths' order rotated each round",
            "statistic": "median samples/s over the timed repeats", "interval": INTERVAL,
            "path_notes": {p: PATHS[p][1] for p in paths}}


def cpu_slug(cpu_model: str) -> str:
    """A file-name part for a CPU model (``Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz`` ->
    ``intel-xeon-platinum-8481c``)."""
    text = re.sub(r"\((r|tm)\)", "", cpu_model.lower())
    text = re.split(r"\s(cpu\s)?@", text)[0].replace(" cpu", "")
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "cpu"


def synthetic_data(per_pixel: bool, classes: int, chw: tuple[int, int, int], samples: int, seed: int) -> BenchData:
    """Standard-normal images; uniform labels, one per image or one per pixel."""
    rng = np.random.default_rng([seed, samples])
    x = rng.standard_normal((samples, *chw), dtype=np.float32)
    shape = (samples, *chw[1:]) if per_pixel else (samples,)
    y = rng.integers(0, classes, shape).astype(np.int32)
    return BenchData(x, y, x, y, f"synthetic N(0, 1), seed {seed}")


def median_interval(seconds: list[float], samples: int, resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = 0) -> tuple[float, list[float]]:
    """Median samples/s over repeats of ``samples`` each, and its bootstrap 95% interval."""
    times = np.asarray(seconds, float)
    medians = np.median(np.random.default_rng(seed).choice(times, size=(resamples, times.size)), axis=1)
    low, high = np.percentile(samples / medians, [2.5, 97.5])
    return float(samples / np.median(times)), [float(low), float(high)]


def make_trainers(name: str, settings: dict[str, Any], data: BenchData, per_pixel: bool):
    """The torch module (the zoo's, under ``manual_seed(seed)``), its port, and one trainer per
    path, every one starting from the same weights."""
    from benchmarks.torch_paths import TorchTrainer
    from flaxcnn import port
    from tests import port_zoo

    torch_module = port_zoo.build(name, settings["size"], seed=settings["seed"])
    example = data.x[: settings["batch_size"]]
    trainers, errors = {}, {}
    sgd = dict(lr=settings["lr"], momentum=settings["momentum"], seed=settings["seed"])
    for path in settings["paths"]:
        try:
            if path == "flaxcnn":
                ported = port.port(torch_module, example, prove=False).module
                trainers[path] = PortedTrainer(ported, PER_PIXEL if per_pixel else "cross_entropy", data,
                                               settings["batch_size"], **sgd)
            else:
                spec = TorchSpec(name, "cross_entropy", torch_module)
                trainers[path] = TorchTrainer(spec, TORCH_PATH[path], data, settings["batch_size"], **sgd)
        except Exception as error:  # noqa: BLE001 -- one broken path must not lose the others
            errors[path] = f"{type(error).__name__}: {error}".splitlines()[0]
    params = sum(p.numel() for p in torch_module.parameters())
    return trainers, errors, params


def measure_model(name: str, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per path for the zoo network ``name``."""
    from tests import port_zoo

    per_pixel = name == "unet"
    classes = port_zoo.SEGMENT_CLASSES if per_pixel else port_zoo.NUM_CLASSES
    samples = settings["samples_per_repeat"]
    data = synthetic_data(per_pixel, classes, port_zoo.INPUT_CHW, samples, settings["seed"])
    trainers, errors, params = make_trainers(name, settings, data, per_pixel)
    timed = time_training_interleaved(trainers, samples, settings["repeats"])
    rows = []
    for path in settings["paths"]:
        row = {"model": name, "size": settings["size"], "framework": PATHS[path][0], "path": path,
               "batch_size": settings["batch_size"], "params": params,
               "loss": "per-pixel cross_entropy" if per_pixel else "cross_entropy"}
        result = timed.get(path, {"error": errors.get(path)})
        if "error" in result:
            row["error"] = result["error"]
        else:
            median, interval = median_interval(result["epoch_seconds"], samples)
            row.update(samples_per_second=median, samples_per_second_interval_95=interval,
                       samples_per_second_fastest=result["samples_per_second"],
                       warmup_seconds=result["warmup_seconds"], first_repeat_seconds=result["first_epoch_seconds"],
                       repeat_seconds=result["epoch_seconds"], train_loss_sum_per_repeat=result["train_loss_sum_per_epoch"],
                       train_finite=result["train_finite"])
        if path == "flaxcnn" and "flaxcnn" in trainers:
            row["engine_path"] = trainers["flaxcnn"].path
        rows.append(row)
    attach_ratios(rows)
    del trainers
    gc.collect()
    return rows


def attach_ratios(rows: list[dict[str, Any]]) -> None:
    """On the flaxcnn row: its speed over each PyTorch row of the same run (above 1: flaxcnn
    is faster), the median of per-round ratios with its interval."""
    flax = next((r for r in rows if r["path"] == "flaxcnn" and "error" not in r), None)
    if flax is None:
        return
    flax["vs"] = {r["path"]: paired_ratio(flax["repeat_seconds"], r["repeat_seconds"])
                  for r in rows if r["framework"] == "torch" and "error" not in r}


def versions() -> dict[str, Any]:
    from benchmarks.flax_paths import jax_info
    from benchmarks.torch_paths import torch_info

    return {**jax_info(), **torch_info("cpu")}


def _rate(row: dict[str, Any] | None) -> str:
    if row is None:
        return "not run"
    if "error" in row:
        return f"failed: {row['error']}"
    low, high = row["samples_per_second_interval_95"]
    return f"{row['samples_per_second']:,.0f} [{low:,.0f}, {high:,.0f}]"


def _ratio(flax: dict[str, Any] | None, path: str) -> str:
    vs = (flax or {}).get("vs", {}).get(path)
    if vs is None:
        return "-"
    low, high = vs["interval_95"]
    return f"{vs['median']:.2f}x [{low:.2f}, {high:.2f}]"


def markdown(report: dict[str, Any]) -> str:
    """The table, with the machine and the method above it."""
    m, s, v = report["machine"], report["settings"], report["versions"]
    lines = [
        "# Training throughput of ported models: flaxcnn vs PyTorch eager and torch.compile",
        "",
        f"- CPU: {m['cpu_model']} ({m.get('cpus_usable') or m['cpu_count']} usable cores); vector ISA "
        f"{', '.join(m.get('cpu_vector_flags') or []) or 'unknown'}; flaxcnn kernel variants runnable: "
        f"{', '.join(m.get('kernel_isas_runnable') or []) or 'none'}",
        f"- load average before {m.get('loadavg_before')}, after {m.get('loadavg_after')}"
        + ("" if report.get("complete", True) else " (run incomplete: the models measured so far)"),
        f"- torch {v.get('torch')} ({v.get('torch_num_threads')} threads); jax {v.get('jax')}, flax {v.get('flax')} "
        f"(backend {v.get('jax_backend')}); all paths in one process",
        f"- {s['size']}-size tests/port_zoo.py networks, input 3x32x32, batch {s['batch_size']}, SGD lr {s['lr']} "
        f"momentum {s['momentum']}, synthetic data; {s['repeats']} timed repeats of {s['steps_per_repeat']} steps "
        f"after 1 warm-up repeat; samples/s: {s['statistic']} [{s['interval']}]; flaxcnn / PyTorch: the median "
        "per-round ratio of repeat times [its bootstrap 95% interval]; above 1: flaxcnn is faster",
        "",
        "| model | params | flaxcnn (ported, jit) samples/s | PyTorch eager | torch.compile "
        "| flaxcnn / eager | flaxcnn / compile |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in s["models"]:
        rows = {r["path"]: r for r in report["results"] if r["model"] == name}
        if not rows:
            continue
        flax = rows.get("flaxcnn")
        params = next(iter(rows.values()))["params"]
        lines.append(f"| {name} | {params:,} | {_rate(flax)} | {_rate(rows.get('torch-eager'))} | "
                     f"{_rate(rows.get('torch-compile'))} | {_ratio(flax, 'torch-eager')} | "
                     f"{_ratio(flax, 'torch-compile')} |")
    return "\n".join(lines) + "\n"


def run(settings: dict[str, Any], on_model: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every model's rows, with the machine and versions they were measured on; ``on_model(report)``
    after each model (the report so far, ``"complete": False`` until the last one)."""
    machine = {**machine_info(), "loadavg_before": load_average()}
    report = {"benchmark": "port_throughput", "complete": False, "machine": machine, "versions": versions(),
              "settings": settings, "results": []}
    for name in settings["models"]:
        rows = measure_model(name, settings)
        report["results"].extend(rows)
        for row in rows:
            print(f"  {name:<20} {row['path']:<14} {_rate(row)}", file=sys.stderr, flush=True)
        machine["loadavg_after"] = load_average()
        report["complete"] = name == settings["models"][-1]
        if on_model is not None:
            on_model(report)
    return report


def write(report: dict[str, Any], out: Path) -> str:
    """The JSON at ``out`` and the markdown table beside it (``.md``); returns the table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
    except FlaxcnnError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from benchmarks.machine import cpu_model

    out = Path(args.out) if args.out else RESULTS_DIR / f"port_throughput-{cpu_slug(cpu_model())}.json"
    report = run(settings, on_model=lambda partial: write(partial, out))  # a cut-short run keeps its models
    table = write(report, out)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0 if all("error" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
