"""The worker side of ``train_throughput``: time a list of (model, batch size, path) rows of one
framework in this process and return one result dict per row.

A row that fails (say, ``torch.compile`` without a working compiler) is reported with its
``error`` instead of numbers, and the other rows still run.
"""

from __future__ import annotations

import gc
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from benchmarks.data import BenchData, bench_data
from benchmarks.settings import LR, lab_batch_size, lab_momentum
from benchmarks.timing import WARMUP_METHOD, peak_rss_mb, time_evaluation, time_training_interleaved
from flaxcnn.models.registry import ModelSpec, get_model

FRAMEWORKS = ("torch", "flaxcnn")


def framework_info(framework: str, device: str, torch_threads: int | None = None) -> dict[str, Any]:
    """Versions, thread settings and backend of ``framework`` as this process sees them
    (``torch_threads``: the explicit ``--torch-threads``, applied here)."""
    if framework == "torch":
        from benchmarks.torch_paths import set_threads, torch_info

        from flaxcnn import cpu_memory

        set_threads(torch_threads)
        return {**torch_info(device), "torch_threads_set_by_option": torch_threads,
                "torch_freed_memory": os.environ.get(cpu_memory.ENV, "1")}
    from benchmarks.flax_paths import jax_info, setup_jax

    setup_jax(device)
    return jax_info()


def make_trainer(framework: str, spec: ModelSpec, path: str, data: BenchData, batch_size: int, *,
                 seed: int, device: str, init_dir: Path | None, policy_file: str | None = None):
    """A trainer of ``framework`` in ``path`` with the lab's optimizer settings for ``spec``."""
    settings = dict(lr=LR, momentum=lab_momentum(spec), seed=seed, init_dir=init_dir)
    if framework == "torch":
        from benchmarks.torch_paths import TorchTrainer

        return TorchTrainer(spec, path, data, batch_size, device=device, **settings)
    from benchmarks.flax_paths import FlaxTrainer

    return FlaxTrainer(spec, path, data, batch_size, policy_file=policy_file, **settings)


def is_default_path(framework: str, path: str) -> bool:
    """Whether ``path`` is what ``flaxcnn train --path auto`` picks on this backend."""
    if framework != "flaxcnn":
        return False
    from flaxcnn.train.steps import default_path

    return path == default_path()  # "step-xla"/"step-tuned" run another policy: never the default


def row_header(framework: str, spec: ModelSpec, path: str, data: BenchData, batch_size: int) -> dict[str, Any]:
    return {
        "framework": framework, "path": path, "model": spec.name, "batch_size": batch_size,
        "default_path": is_default_path(framework, path), "lab_batch_size": batch_size == lab_batch_size(spec),
        "samples": len(data.y), "data": data.source, "lr": LR, "momentum": lab_momentum(spec),
        "warmup_method": WARMUP_METHOD,
    }


def _error(error: Exception) -> str:
    traceback.print_exc()
    return f"{type(error).__name__}: {error}".splitlines()[0]


def measure_group(framework: str, spec: ModelSpec, paths: list[str], data: BenchData, batch_size: int,
                  job: dict[str, Any], eval_cache: dict[tuple, dict[str, Any]]) -> list[dict[str, Any]]:
    """Time the rows of one model and batch size (one per path) with their epochs interleaved
    (:func:`benchmarks.timing.time_training_interleaved`), so that their ratios are not moved by
    when each ran. Evaluation does not depend on the training batch size, so it is measured once
    per (framework, path, model) in this process and copied to the other batch sizes."""
    rows = {path: row_header(framework, spec, path, data, batch_size) for path in paths}
    trainers = {}
    for path in paths:
        try:
            trainers[path] = make_trainer(framework, spec, path, data, batch_size, seed=job["seed"],
                                          device=job["device"], policy_file=job.get("conv_policy"),
                                          init_dir=Path(job["init_dir"]) if job.get("init_dir") else None)
        except Exception as error:  # one broken path must not lose the other rows' numbers
            rows[path]["error"] = _error(error)

    def after_warmup(path: str) -> None:
        trainer = trainers[path]
        key = (framework, path, spec.name)
        if key not in eval_cache:  # evaluation's first pass traces it (under this row's settings)
            eval_cache[key] = {**time_evaluation(trainer, *trainer.eval_arrays(data), len(data.eval_y)),
                               "eval_measured_at_batch_size": batch_size}

    timed = time_training_interleaved(trainers, len(data.y), job["epochs"], after_warmup)
    for path, trainer in trainers.items():
        row = rows[path]
        row.update(timed[path])
        if "error" not in row:
            row.update(eval_cache[(framework, path, spec.name)])
        if hasattr(trainer, "init"):
            row["init"] = trainer.init
        if hasattr(trainer, "policy_record"):
            row["conv_policy"] = trainer.policy_record()
    peak = peak_rss_mb()
    for row in rows.values():
        row["peak_rss_mb"] = peak
    return list(rows.values())


def run_rows(job: dict[str, Any]) -> dict[str, Any]:
    """Entry point of a worker process (see :mod:`benchmarks.process`)."""
    framework = job["framework"]
    info = framework_info(framework, job["device"], job.get("torch_threads"))
    groups: dict[tuple[str, int], list[str]] = {}
    for spec_row in job["rows"]:
        groups.setdefault((spec_row["model"], spec_row["batch_size"]), []).append(spec_row["path"])
    results, data, data_model, eval_cache = [], None, None, {}
    for (model, batch_size), paths in groups.items():
        spec = get_model(model)
        if data_model != spec.name:
            data, data_model = None, None
            gc.collect()
            data = bench_data(spec, job["samples"], job["seed"], job["data_dirs"])
            data_model = spec.name
        for row in measure_group(framework, spec, paths, data, batch_size, job, eval_cache):
            results.append(row)
            print(progress_line(row), file=sys.stderr, flush=True)
        gc.collect()
    return {"info": info, "results": results}


def progress_line(row: dict[str, Any]) -> str:
    head = f"  {row['framework']:>7} {row['path']:<13} {row['model']:<13} batch {row['batch_size']:>4}: "
    if "error" in row:
        return head + "FAILED " + row["error"]
    return (head + f"{row['samples_per_second']:>9,.0f} samples/s  warm-up {row['warmup_seconds']:6.1f} s  "
            f"eval {row['eval_samples_per_second']:>9,.0f} samples/s  peak RSS {row['peak_rss_mb']:,.0f} MB")
