"""One prepared command that measures flaxcnn on a GPU machine: one JSON and one markdown report.

    PYTHONPATH=. python3 -m benchmarks.gpu_check --out $OUT --data gpu-data    # on the GPU machine
    python -m benchmarks.gpu_check --dry-run --out /tmp/gpu-check               # here, CPU, tiny sizes
    python -m benchmarks.gpu_check --prepare-data gpu-data --cifar-dir ../shared/data/cifar2

Parts, in this order, each one command in processes of its own with a time box
(:mod:`benchmarks.timebox`; a part that fails or overruns is recorded so, and the rest goes on):

``machine``        ``nvidia-smi`` facts, package versions, what JAX and PyTorch see.
``parity``         the parity suite (``parity.checks.check_model``, what ``python -m parity``
                   runs): every model against its PyTorch reference, flaxcnn on JAX's default
                   device (the GPU), the PyTorch reference on the CPU (the suite's reference),
                   float32 with ``highest`` matmul precision, TF32 off; batch 64, seed 0.
``throughput``     ``benchmarks.train_throughput --device gpu``: every model at batch 64 and 256,
                   PyTorch CUDA's lab loop and sliced tensors next to flaxcnn's ``step`` and ``scan``.
``net100``         ``flaxcnn train`` of lab 8's ``Net`` for 100 epochs on the real CIFAR-2 (``--data``).
``sweep``          ``benchmarks.scaling --platform gpu``: 8 seeds of ``Net`` as one vmapped program
                   against 8 sequential runs (throughput, then ``flaxcnn sweep`` end to end).
``torch_compile``  ``benchmarks.train_throughput --torch-compile``: PyTorch's compiled path, last
                   because its compiles take longest; whatever finishes in the time left is kept.

Every process gets ``JAX_DEFAULT_MATMUL_PRECISION=highest`` and ``NVIDIA_TF32_OVERRIDE=0`` (no
TF32 in cuBLAS/cuDNN on either side; the PyTorch workers also set ``allow_tf32 = False``).
Results land in ``--out``: ``gpu_check.json``, ``gpu_check.md``, one folder per part and
``logs/<part>.log``; both reports are rewritten after every part. ``--dry-run`` runs the same
parts on the CPU with tiny sizes (without torch.compile, whose CPU compiles take minutes, and
without the end-to-end sweep), so that a test keeps the command working. See docs/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import gpu_data
from benchmarks.timebox import MIN_PART_SECONDS, Outcome, run_command, time_box

REPO_ROOT = Path(__file__).resolve().parents[1]
#: the whole command must fit the 8 minutes a lent machine gives it, with room to write the report
DEFAULT_BUDGET_S = 450.0
#: dry runs (CPU, tiny sizes) only need a bound that catches a hang: all parts share one deadline
DRY_RUN_BUDGET_S = 900.0
#: samples per epoch for the throughput parts: a multiple of 64 and 256, so that no partial last
#: batch adds compiles (flaxcnn) or recompiles (torch.compile) to the warm-up
GPU_SAMPLES = 8192
GPU_ENV = {"JAX_DEFAULT_MATMUL_PRECISION": "highest", "NVIDIA_TF32_OVERRIDE": "0"}
NVIDIA_SMI_FIELDS = ("name", "driver_version", "memory.total", "compute_cap", "power.limit", "clocks.max.sm",
                     "clocks.max.memory", "pcie.link.gen.max", "temperature.gpu", "utilization.gpu",
                     "mig.mode.current")
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt",
            "flax", "optax", "orbax-checkpoint", "numpy", "torch", "torchvision", "triton", "nvidia-cudnn-cu13",
            "nvidia-cudnn-cu12", "matplotlib", "tqdm", "pytest")


# ----------------------------------------------------------------------------- the run's settings

@dataclass
class Context:
    """What every part needs: where to write, which data, and dry run or not."""

    out: Path
    data: Path | None
    dry_run: bool
    models: list[str]
    python: str = sys.executable
    facts: dict[str, Any] = field(default_factory=dict)  # filled by the machine part

    @property
    def cifar(self) -> Path | None:
        return gpu_data.cifar_data_dir(self.data)

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "gpu"

    def env(self) -> dict[str, str]:
        env = {**os.environ, **GPU_ENV}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        if self.dry_run:
            env["JAX_PLATFORMS"] = "cpu"
        return env


@dataclass(frozen=True)
class Part:
    """One measurement: ``command(ctx)`` gives the command line, or a string saying why the part
    is skipped; ``collect(ctx)`` reads what it wrote (also after a failure or a time-out)."""

    name: str
    share_s: float
    command: Callable[[Context], list[str] | str]
    collect: Callable[[Context], Any]
    needs_gpu: bool = True


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------- machine

def versions_worker(job: dict[str, Any]) -> dict[str, Any]:
    """(Child process.) Package versions and what JAX and PyTorch see on this machine."""
    import importlib.metadata as metadata

    from benchmarks.machine import machine_info

    info: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable, "packages": {},
                            "host": machine_info()}
    for name in PACKAGES:
        try:
            info["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        import jax

        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()]
        info["jax_default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
    except Exception as error:  # noqa: BLE001 - a broken plugin must be reported, not crash the report
        info["jax_error"] = f"{type(error).__name__}: {error}"
    try:
        import torch

        info["torch_cuda_build"] = torch.version.cuda
        info["torch_cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["torch_device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                                    "memory_gib": round(props.total_memory / 2**30, 1),
                                    "multiprocessors": props.multi_processor_count}
            info["cudnn"] = torch.backends.cudnn.version()
    except Exception as error:  # noqa: BLE001
        info["torch_error"] = f"{type(error).__name__}: {error}"
    return info


def nvidia_smi_facts(out: Path) -> dict[str, Any]:
    """The GPUs as ``nvidia-smi`` reports them (its full text goes to ``out/nvidia-smi.txt``)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not found on PATH"}
    facts: dict[str, Any] = {}
    try:
        text = subprocess.run([exe], capture_output=True, text=True, timeout=30).stdout
        (out / "nvidia-smi.txt").write_text(text)
        match = re.search(r"CUDA Version:\s*([\d.]+)", text)
        facts["driver_cuda_version"] = match.group(1) if match else None
        for fields in (NVIDIA_SMI_FIELDS, NVIDIA_SMI_FIELDS[:3]):  # older drivers lack some fields
            done = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30)
            if done.returncode == 0:
                facts["gpus"] = [dict(zip(fields, (v.strip() for v in line.split(","))))
                                 for line in done.stdout.strip().splitlines()]
                break
            facts["query_error"] = done.stdout.strip() or done.stderr.strip()
    except (OSError, subprocess.SubprocessError) as error:
        facts["error"] = f"{type(error).__name__}: {error}"
    return facts


def _machine_command(ctx: Context) -> list[str]:
    folder = ctx.out / "machine"
    folder.mkdir(parents=True, exist_ok=True)
    ctx.facts["nvidia_smi"] = nvidia_smi_facts(ctx.out)
    (folder / "job.json").write_text("{}")
    return [ctx.python, "-m", "benchmarks.process", "benchmarks.gpu_check:versions_worker",
            str(folder / "job.json"), str(folder / "versions.json")]


def _machine_collect(ctx: Context) -> dict[str, Any]:
    versions = _read_json(ctx.out / "machine" / "versions.json")
    if versions:
        ctx.facts["jax_backend"] = versions.get("jax_backend")
    return {"nvidia_smi": ctx.facts.get("nvidia_smi"), "versions": versions}


# ----------------------------------------------------------------------------- the measurements

def parity_worker(job: dict[str, Any]) -> dict[str, Any]:
    """(Child process.) The parity suite one model at a time (as ``python -m parity`` runs it),
    its JSON rewritten after each model, so that a time box keeps the models already checked."""
    from flaxcnn.models.registry import get_model
    from parity.checks import check_model

    results: list[dict[str, Any]] = []
    for name in job["models"]:
        results.append(check_model(get_model(name), batch=job["batch"], seed=0).as_json())
        Path(job["out"]).write_text(json.dumps({
            "models": results, "passed": all(r["passed"] for r in results), "batch": job["batch"], "seed": 0,
            "complete": len(results) == len(job["models"])}, indent=2) + "\n")
    return {"checked": len(results)}


def _parity_command(ctx: Context) -> list[str]:
    folder = ctx.out / "parity"
    folder.mkdir(parents=True, exist_ok=True)
    job = {"models": ["net"] if ctx.dry_run else ctx.models, "batch": 8 if ctx.dry_run else 64,
           "out": str(folder / "parity.json")}
    (folder / "job.json").write_text(json.dumps(job))
    return [ctx.python, "-m", "benchmarks.process", "benchmarks.gpu_check:parity_worker", str(folder / "job.json"),
            str(folder / "worker.json")]


def _throughput_args(ctx: Context, out_dir: str) -> list[str]:
    sizes = (["--models", "net", "--batch-sizes", "16", "--samples", "64", "--epochs", "1"] if ctx.dry_run else
             ["--models", *ctx.models, "--batch-sizes", "64", "256", "--samples", str(GPU_SAMPLES), "--epochs", "2"])
    return [ctx.python, "-m", "benchmarks.train_throughput", "--device", ctx.device, *sizes,
            "--out-dir", str(ctx.out / out_dir)]


def _throughput_command(ctx: Context) -> list[str]:
    # one process per framework: two start-ups instead of two per model
    return _throughput_args(ctx, "throughput") + ["--paths", "torch-sliced", "step", "scan",
                                                  "--process-per", "framework"]


def _torch_compile_command(ctx: Context) -> list[str] | str:
    # one process per model, so that the models finished before the time box ends are kept
    cmd = _throughput_args(ctx, "torch_compile") + ["--paths", "torch-sliced", "--torch-compile",
                                                    "--process-per", "model"]
    if ctx.dry_run:
        return ("dry run: not run, torch.compile's CPU compiles take minutes; with the dry run's sizes the "
                "command would be: " + " ".join(cmd))
    return cmd


def _net100_command(ctx: Context) -> list[str] | str:
    if ctx.cifar is None and not ctx.dry_run:
        return ("no CIFAR-2 folder: give --data with a folder made by --prepare-data "
                f"(looked in {ctx.data}/cifar2)" if ctx.data else "no --data folder given")
    data = ["--data-dir", str(ctx.cifar)] if ctx.cifar else []  # dry run: the shipped sample
    return [ctx.python, "-m", "flaxcnn.cli", "train", "--model", "net", "--dataset", "cifar2", *data,
            "--epochs", "1" if ctx.dry_run else "100", "--out", str(ctx.out / "net100"), "--overwrite", "--quiet"]


def _net100_collect(ctx: Context) -> dict[str, Any] | None:
    summary = _read_json(ctx.out / "net100" / "summary.json")
    reference = _read_json(REPO_ROOT / "benchmarks" / "results" / "net100" / "summary.json")
    return {"summary": summary, "cpu_reference": reference} if summary else None


def _sweep_command(ctx: Context) -> list[str]:
    if ctx.dry_run:
        # the throughput of 2 models as one program against one; the end-to-end sweep (two more
        # processes) is left out: tests/test_sweep.py runs run_sweep with both strategies
        sizes = ["--platform", "cpu", "--ks", "2", "--samples", "64", "--batch-size", "16", "--epochs", "1",
                 "--no-sweep"]
    else:
        sizes = ["--platform", "gpu", "--ks", "1", "8", "--samples", str(GPU_SAMPLES), "--epochs", "2",
                 "--sweep-k", "8", "--sweep-epochs", "2", *(["--data-dir", str(ctx.cifar)] if ctx.cifar else [])]
    return [ctx.python, "-m", "benchmarks.scaling", "--model", "net", "--devices", *sizes,
            "--out-dir", str(ctx.out / "sweep")]


PARTS = (
    Part("machine", 20, _machine_command, _machine_collect, needs_gpu=False),
    Part("parity", 60, _parity_command, lambda ctx: _read_json(ctx.out / "parity" / "parity.json")),
    Part("throughput", 160, _throughput_command,
         lambda ctx: _read_json(ctx.out / "throughput" / "train_throughput.json")),
    Part("net100", 60, _net100_command, _net100_collect),
    Part("sweep", 90, _sweep_command, lambda ctx: _read_json(ctx.out / "sweep" / "scaling.json")),
    Part("torch_compile", 60, _torch_compile_command,
         lambda ctx: _read_json(ctx.out / "torch_compile" / "train_throughput.json")),
)
PART_NAMES = tuple(p.name for p in PARTS)


# ----------------------------------------------------------------------------- running

def run_parts(ctx: Context, parts: tuple[Part, ...], budget_s: float,
              on_part_done: Callable[[dict[str, Any]], None] | None = None, *, shared: bool = True
              ) -> dict[str, Any]:
    """Run ``parts`` in order within ``budget_s`` seconds; the report after each part goes to
    ``on_part_done``. ``shared``: each part gets its share (scaled so that the shares add up to
    the budget) plus what the parts before it left; otherwise every part may use all the time
    left (a dry run, where the only aim of a time box is to stop a hang)."""
    scale = budget_s / sum(p.share_s for p in parts)
    shares = [p.share_s * scale if shared else 0.0 for p in parts]
    start = time.perf_counter()
    report: dict[str, Any] = {
        "tool": "benchmarks.gpu_check", "dry_run": ctx.dry_run, "device": ctx.device,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": budget_s, "models": ctx.models,
        "data": str(ctx.data) if ctx.data else None, "cifar2": str(ctx.cifar) if ctx.cifar else None,
        "env": {**GPU_ENV, **({"JAX_PLATFORMS": "cpu"} if ctx.dry_run else {})},
        "time_boxes": "shares" if shared else "one deadline", "parts": {}, "complete": False,
    }
    for i, part in enumerate(parts):
        box = time_box(shares, i, budget_s - (time.perf_counter() - start))
        entry = run_part(ctx, part, box)
        report["parts"][part.name] = entry
        report["wall_s"] = time.perf_counter() - start
        if on_part_done:
            on_part_done(report)
    report["complete"] = True
    return report


def run_part(ctx: Context, part: Part, box: float) -> dict[str, Any]:
    """One part: skipped (with why), or run within ``box`` seconds and its results collected."""
    entry: dict[str, Any] = {"time_box_s": round(box, 1)}
    print(f"[gpu_check] {part.name}: time box {box:.0f} s", file=sys.stderr, flush=True)
    if part.needs_gpu and not ctx.dry_run and ctx.facts.get("jax_backend") not in (None, "gpu"):
        return {**entry, "status": "skipped", "error": f"JAX sees no GPU (backend {ctx.facts['jax_backend']})"}
    if box < MIN_PART_SECONDS:
        return {**entry, "status": "skipped", "error": f"only {box:.0f} s of the budget left"}
    try:
        cmd = part.command(ctx)
    except Exception as error:  # noqa: BLE001 - one broken part must not stop the others
        return {**entry, "status": "failed", "error": f"{type(error).__name__}: {error}"}
    if isinstance(cmd, str):
        return {**entry, "status": "skipped", "error": cmd}
    log = ctx.out / "logs" / f"{part.name}.log"
    outcome: Outcome = run_command(cmd, timeout=box, log_path=log, env=ctx.env(), cwd=REPO_ROOT)
    try:
        entry["result"] = part.collect(ctx)  # also after a failure: what was written before it
    except Exception as error:  # noqa: BLE001
        entry["result"] = None
        entry["collect_error"] = f"{type(error).__name__}: {error}"
    status = outcome.status
    entry.update(status=status, seconds=round(outcome.seconds, 1), returncode=outcome.returncode,
                 command=" ".join(cmd), log=str(log.relative_to(ctx.out)))
    if status != "ok":
        entry["error"] = outcome.error
        entry["log_tail"] = _tail(log)
    print(f"[gpu_check] {part.name}: {status} in {outcome.seconds:.0f} s", file=sys.stderr, flush=True)
    return entry


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def write_report(report: dict[str, Any], out: Path) -> None:
    """``gpu_check.json`` and ``gpu_check.md`` in ``out``."""
    from benchmarks.gpu_report import markdown

    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for the reports and every part's files (on a lent machine: $OUT)")
    p.add_argument("--data", default=None,
                   help="folder made by --prepare-data (default: gpu-data/ of the checkout when it exists)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no torch.compile: checks the command")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds for all parts (default {DEFAULT_BUDGET_S:.0f}; dry run {DRY_RUN_BUDGET_S:.0f})")
    p.add_argument("--parts", nargs="+", default=list(PART_NAMES), help=f"default: all of {' '.join(PART_NAMES)}")
    p.add_argument("--models", nargs="+", default=None, help="models to measure (default: every registered one)")
    p.add_argument("--prepare-data", metavar="DIR", default=None,
                   help="only copy the real CIFAR-2 batches into DIR/cifar2 (needs --cifar-dir) and exit")
    p.add_argument("--cifar-dir", default=None, help="with --prepare-data: a cifar-10-batches-py folder or its parent")
    return p.parse_args(argv)


def context_from(args: argparse.Namespace) -> Context:
    """Validated settings; every mistake is a ConfigError naming what is accepted."""
    from flaxcnn.errors import ConfigError
    from flaxcnn.models.registry import MODELS, get_model

    if not args.out:
        raise ConfigError("--out DIR is required (the folder for the reports), unless --prepare-data is given")
    bad = [name for name in args.parts if name not in PART_NAMES]
    if bad:
        raise ConfigError(f"unknown --parts {', '.join(bad)}; accepted: {', '.join(PART_NAMES)}")
    models = args.models or list(MODELS)
    for name in models:
        get_model(name)
    data = Path(args.data) if args.data else (REPO_ROOT / "gpu-data" if (REPO_ROOT / "gpu-data").is_dir() else None)
    if data is not None and not data.is_dir():
        raise ConfigError(f"--data {data} is not a folder; make one with --prepare-data DIR --cifar-dir ...")
    return Context(out=Path(args.out).resolve(), data=data.resolve() if data else None, dry_run=args.dry_run,
                   models=models)


def main(argv: list[str] | None = None) -> int:
    from flaxcnn.errors import ConfigError, FlaxcnnError

    args = parse_args(argv)
    try:
        if args.prepare_data:
            if not args.cifar_dir:
                raise ConfigError("--prepare-data needs --cifar-dir (a cifar-10-batches-py folder)")
            manifest = gpu_data.prepare(args.prepare_data, args.cifar_dir)
            print(f"wrote {args.prepare_data}: {manifest['cifar2']['train_images']} train and "
                  f"{manifest['cifar2']['test_images']} test images, {manifest['total_bytes'] / 1e6:.1f} MB")
            return 0
        ctx = context_from(args)
        budget = args.budget_s if args.budget_s is not None else (DRY_RUN_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S)
        if budget <= 0:
            raise ConfigError(f"--budget-s must be > 0, got {budget:g}")
    except FlaxcnnError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    parts = tuple(p for p in PARTS if p.name in args.parts)
    report = run_parts(ctx, parts, budget, on_part_done=lambda partial: write_report(partial, ctx.out),
                       shared=not args.dry_run)
    write_report(report, ctx.out)
    statuses = ", ".join(f"{name} {entry['status']}" for name, entry in report["parts"].items())
    print(f"wrote {ctx.out / 'gpu_check.json'} and {ctx.out / 'gpu_check.md'} ({statuses})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
