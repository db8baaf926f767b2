"""How every path is timed, the same way for both frameworks.

A trainer is anything with ``train_epoch(epoch) -> float`` (returns the epoch's summed batch
loss, the lab's ``loss_train``, after all its work is finished) and ``evaluate(x, y) -> dict``
(forward only, evaluation mode, also finished when it returns). Timing only wraps those calls,
so what is measured is exactly one epoch or one evaluation pass, data feeding included.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any, Protocol

import numpy as np

WARMUP_METHOD = "first epoch minus the median steady epoch"
THROUGHPUT_METHOD = "the fastest of the timed epochs"
EVAL_BATCH = 1000  # forward-only passes run in batches of this size (or the whole split if smaller)


class Trainer(Protocol):
    def train_epoch(self, epoch: int) -> float: ...

    def evaluate(self, x: Any, y: Any) -> dict[str, float]: ...


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def time_training(trainer: Trainer, samples: int, epochs: int) -> dict[str, Any]:
    """One warm-up epoch (epoch 0), then ``epochs`` timed ones; throughput from the fastest.

    Why the fastest and not the median: on a small shared VM the same epoch varies by 20% from
    one run to the next, and interference only ever adds time, so the fastest epoch is the
    estimate of the code's speed least moved by the neighbours (``timeit``'s reasoning); the
    median is kept beside it (``samples_per_second_median``)."""
    return time_training_interleaved({"only": trainer}, samples, epochs)["only"]


def time_training_interleaved(trainers: dict[str, Trainer], samples: int, epochs: int,
                              after_warmup: Any = None) -> dict[str, dict[str, Any]]:
    """:func:`time_training` for several trainers at once, their epochs interleaved: every
    trainer's warm-up epoch, then timed epoch 1 of each, epoch 2 of each, and so on (in the order
    of :func:`round_order`), so that a slow spell of the machine falls on all of them alike rather
    than on whichever ran then (rows timed one after another differed by 10-20% on the same
    program). ``after_warmup(name)``, if given, runs after each trainer's warm-up epoch. A
    trainer that raises gets ``{"error": ...}`` and the others go on."""
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    losses: dict[str, list[float]] = {name: [] for name in trainers}
    results: dict[str, dict[str, Any]] = {}
    for epoch in range(epochs + 1):
        for name in round_order(list(trainers), epoch):
            trainer = trainers[name]
            if name in results:
                continue
            try:
                start = time.perf_counter()
                losses[name].append(trainer.train_epoch(epoch))
                seconds[name].append(time.perf_counter() - start)
                if epoch == 0 and after_warmup is not None:
                    after_warmup(name)
            except Exception as error:  # noqa: BLE001 -- one broken path must not lose the others
                results[name] = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
    for name in trainers:
        if name in results:
            continue
        steady = statistics.median(seconds[name][1:])
        results[name] = {
            "samples_per_second": samples / min(seconds[name][1:]),
            "samples_per_second_median": samples / steady,
            "throughput_method": THROUGHPUT_METHOD,
            "warmup_seconds": seconds[name][0] - steady,
            "warmup_method": WARMUP_METHOD,
            "first_epoch_seconds": seconds[name][0],
            "epoch_seconds": seconds[name][1:],
            "train_loss_sum_per_epoch": losses[name],
            "train_finite": bool(np.all(np.isfinite(losses[name]))),
        }
    return results


def round_order(names: list[str], epoch: int) -> list[str]:
    """The order the trainers run in ``epoch``: as given for the warm-up (epoch 0), then rotated
    by one place each timed epoch, so that every trainer runs in every position of a round
    equally often (epochs a multiple of the trainers): a row's place in the round (say, always
    right after the slowest row, whose buffers it then evicts from the cache) must not move its
    ratios (the same program in two rows of one fixed-order run had timed 8% apart: Net on the
    AVX2 kernels, the default path against one forcing the kernels)."""
    if epoch == 0 or not names:
        return names
    shift = (epoch - 1) % len(names)
    return names[shift:] + names[:shift]


def time_evaluation(trainer: Trainer, x: Any, y: Any, samples: int, repeats: int = 3) -> dict[str, Any]:
    """One warm-up pass over the eval split, then the median of ``repeats`` timed passes."""
    trainer.evaluate(x, y)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = trainer.evaluate(x, y)
        seconds.append(time.perf_counter() - start)
    return {
        "eval_samples_per_second": samples / statistics.median(seconds),
        "eval_samples": samples,
        "eval_accuracy": result["accuracy"],
    }
