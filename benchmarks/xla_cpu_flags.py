"""XLA's CPU library flags as candidates for flaxcnn's XLA-only path (``--conv-impl xla``).

    python -m benchmarks.xla_cpu_flags --models net-batchnorm speechnet convnet --repeats 2

``XLA_FLAGS`` is read once per process, so each (model, flag set) runs in a process of its own
(:func:`benchmarks.process.run_isolated`), the flag sets in turn, ``--repeats`` times; each
process times ``--epochs`` epochs of the ``step-xla`` path after a warm-up epoch. Processes run
one after another, not interleaved epoch by epoch, so a difference of a few percent is not
resolved; the final loss sums show that the flags change the arithmetic (other bits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_info
from benchmarks.process import run_isolated

FLAG_SETS = ("", "--xla_cpu_use_onednn=true",
             "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
             "--xla_cpu_use_xnnpack=true")


def time_xla_path(job: dict[str, Any]) -> dict[str, Any]:
    """Worker: median and fastest epoch of the step-xla path for ``job["model"]``."""
    from benchmarks.data import bench_data
    from benchmarks.flax_paths import FlaxTrainer
    from benchmarks.settings import LR, lab_momentum
    from flaxcnn.models.registry import get_model

    spec = get_model(job["model"])
    data = bench_data(spec, job["samples"], job["seed"], {"cifar": None, "speech": None})
    trainer = FlaxTrainer(spec, "step-xla", data, job["batch_size"], lr=LR, momentum=lab_momentum(spec),
                          seed=job["seed"])
    seconds, loss = [], None
    for epoch in range(job["epochs"] + 1):
        start = time.perf_counter()
        loss = trainer.train_epoch(epoch)
        seconds.append(time.perf_counter() - start)
    return {"median_epoch_s": statistics.median(seconds[1:]), "fastest_epoch_s": min(seconds[1:]),
            "first_epoch_s": seconds[0], "last_loss_sum": loss}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.xla_cpu_flags", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["net-batchnorm", "speechnet", "convnet"])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default="benchmarks/results/xla_cpu_flags.json")
    args = p.parse_args(argv)
    results = []
    for repeat in range(args.repeats):
        for model in args.models:
            for flags in FLAG_SETS:
                job = {"model": model, "epochs": args.epochs, "samples": args.samples, "seed": 0, "batch_size": 64}
                out = run_isolated("benchmarks.xla_cpu_flags:time_xla_path", job,
                                   env={"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}, label=model)
                results.append({"model": model, "flags": flags, "repeat": repeat, **out})
                print(f"{model:13s} {flags or '(none)':75s} median epoch {out['median_epoch_s']:.3f} s",
                      file=sys.stderr, flush=True)
    Path(args.json).write_text(json.dumps({"machine": machine_info(), "settings": vars(args),
                                           "results": results}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
