"""Training speed of two commits of flaxcnn, side by side in one run: ``python -m benchmarks.ab_commits``.

Each commit is checked out into a git worktree of its own; for every model, processes of the two
alternate (before, after, after, before, ...: neither always goes first), each training the
engine's default ``flaxcnn train`` session on the same generated data set: one untimed epoch
(compiles, and in older commits their trace-time measuring), then ``--epochs`` timed epochs.

The statistic, fixed before measuring: per model, the ratio of the median epoch time before to
after (above 1: the later commit trains faster), with a 95% interval from a two-level bootstrap
(processes of each commit, then epochs within them), so that the spread between processes of
this VM (about 5%) is in the interval.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LAB_MODELS = ("net", "net-width", "net-depth", "net-dropout", "net-batchnorm", "convnet", "speechnet", "speechresnet")

#: what each process runs from its checkout: the engine's session on generated data, timed per epoch
WORKER = r"""
import json, sys, time
import jax
import numpy as np
try:
    from flaxcnn import cpu_memory
    cpu_memory.keep_freed_memory()
except Exception:
    pass
from flaxcnn.data import Dataset, SplitArrays
from flaxcnn.data.batching import epoch_permutation
from flaxcnn.models.registry import get_model
from flaxcnn.train.config import TrainConfig
from flaxcnn.train.loop import build_session
model, samples, epochs, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
spec = get_model(model)
rng = np.random.default_rng(0)
x = rng.standard_normal((samples, *spec.input_chw), dtype=np.float32)
y = (np.arange(samples) % 2).astype(np.int32)
name = "cifar2" if spec.domain == "cifar" else "speech"
data = Dataset(name, SplitArrays(x, y), SplitArrays(x[:64], y[:64]), ("a", "b"), source="generated")
session = build_session(TrainConfig(model=model, dataset=name, epochs=epochs + 1, batch_size=batch), data)
x_all, y_all = session.device_arrays["train"]
state, times = session.state, []
for epoch in range(epochs + 1):
    order = epoch_permutation(0, epoch, samples)
    start = time.perf_counter()
    state = session.runner.run(state, x_all, y_all, order, batch)
    jax.block_until_ready(state.metrics)  # a vector in older commits, named sums in newer ones
    times.append(time.perf_counter() - start)
print(json.dumps({"epoch_seconds": times[1:], "first_epoch_seconds": times[0]}))
"""


def worktree(rev: str, where: Path) -> Path:
    """``rev`` checked out at ``where`` (a detached worktree of this repository)."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(where), rev],
                   check=True, capture_output=True, text=True)
    return where


def run_worker(checkout: Path, model: str, samples: int, epochs: int, batch: int) -> dict[str, Any]:
    env = {"PYTHONPATH": str(checkout), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    import os

    env.update({k: v for k, v in os.environ.items() if k.startswith(("FLAXCNN_CACHE", "XLA_", "VIRTUAL_ENV"))})
    done = subprocess.run([sys.executable, "-c", WORKER, model, str(samples), str(epochs), str(batch)],
                          cwd=checkout, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{checkout} {model}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def paired_ratio(before: list[list[float]], after: list[list[float]], resamples: int = 4000,
                 seed: int = 0) -> dict[str, float]:
    """median(before epochs) / median(after epochs), and a two-level bootstrap 95% interval."""
    rng = np.random.default_rng(seed)

    def draw(processes: list[list[float]]) -> float:
        picked = [processes[i] for i in rng.integers(0, len(processes), len(processes))]
        return float(np.median(np.concatenate([rng.choice(p, len(p)) for p in picked])))

    ratios = [draw(before) / draw(after) for _ in range(resamples)]
    point = float(np.median(np.concatenate(before)) / np.median(np.concatenate(after)))
    low, high = np.percentile(ratios, [2.5, 97.5])
    return {"ratio": round(point, 4), "low": round(float(low), 4), "high": round(float(high), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the earlier commit (e.g. the one before a change)")
    p.add_argument("--after", default="HEAD", help="the later commit (default HEAD)")
    p.add_argument("--models", nargs="+", default=list(LAB_MODELS))
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    args = p.parse_args(argv)
    from benchmarks.machine import machine_info

    results: dict[str, Any] = {"before": args.before, "after": args.after, "settings": vars(args) | {"out": str(args.out)},
                               "machine": machine_info(), "statistic": __doc__.split("The statistic, fixed before measuring: ")[1],
                               "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": worktree(args.before, Path(tmp) / "before"), "after": worktree(args.after, Path(tmp) / "after")}
        try:
            for model in args.models:
                epochs: dict[str, list[list[float]]] = {"before": [], "after": []}
                for i in range(args.processes):
                    for side in (("before", "after") if i % 2 == 0 else ("after", "before")):
                        out = run_worker(trees[side], model, args.samples, args.epochs, args.batch_size)
                        epochs[side].append(out["epoch_seconds"])
                stats = paired_ratio(epochs["before"], epochs["after"])
                results["models"][model] = {**stats, "epoch_seconds": epochs,
                                            "samples_per_second": {s: round(args.samples / float(np.median(np.concatenate(e))), 1)
                                                                   for s, e in epochs.items()}}
                print(f"{model:<15} after/before speed {stats['ratio']:.3f} [{stats['low']:.3f}-{stats['high']:.3f}]  "
                      f"samples/s {results['models'][model]['samples_per_second']}", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
