"""The LR finder, behaving like Ignite's ``FastaiLRFinder`` as the speech lab uses it.

Ignite (0.5.x, ``step_mode="exp"``) sweeps the learning rate exponentially over ``num_iter``
iterations (one epoch by default), smooths the loss, stops when it diverges and suggests the LR
at the steepest descent of the smoothed curve. The details reproduced here, measured against
Ignite in ``tests/test_lr_finder.py``:

* with ``q = end_lr / start_lr`` and ``N = num_iter``, iteration ``i`` (1-based) trains with
  ``start_lr * q ** (max(i - 1, 1) / N)`` and is logged with ``start_lr * q ** (i / N)``
  (Ignite's scheduler steps once when it is created and logs after stepping);
* smoothed loss ``s_i = f * loss_i + (1 - f) * s_{i-1}`` (``s_1 = loss_1``), stop as soon as
  ``s_i > diverge_th * min(s_1..s_i)``;
* suggestion: among the losses up to the minimum, the LR where the central difference
  ``(s_{k+1} - s_{k-1}) / 2`` is most negative.

The model and optimizer are "restored" for free: the sweep runs on a copy of the pure training
state, and training afterwards starts from the untouched initial state.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flaxcnn.errors import ConfigError, TrainingError
from flaxcnn.train.config import TrainConfig
from flaxcnn.train.loop import Session, build_session, epoch_order
from flaxcnn.train.optim import set_learning_rate
from flaxcnn.train.plots import plot_lr_finder
from flaxcnn.train.progress import say
from flaxcnn.train.steps import index_batches


@dataclass
class LRFinderResult:
    lrs: list[float]
    losses: list[float]  # smoothed, as Ignite records them
    suggestion: float
    diverged: bool
    plot: str | None = None


def sweep_lrs(start_lr: float, end_lr: float, num_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """(learning rate used by iteration i, learning rate logged for it), i = 1..num_iter."""
    i = np.arange(1, num_iter + 1)
    q = end_lr / start_lr
    used = start_lr * q ** (np.maximum(i - 1, 1) / num_iter)
    logged = start_lr * q ** (i / num_iter)
    return used, logged


def suggest(losses: list[float], lrs: list[float]) -> float:
    """Ignite's ``lr_suggestion``: steepest descent before the minimum of the smoothed loss."""
    upto = int(np.argmin(losses)) + 1
    decreasing = np.asarray(losses[:upto], np.float64)
    if len(decreasing) < 3:
        raise TrainingError(
            "the LR finder's loss curve has no decreasing part to read a suggestion from; "
            "lower --start-lr or raise --end-lr"
        )
    grads = 0.5 * (decreasing[2:] - decreasing[:-2])
    return float(lrs[int(np.argmin(grads)) + 1])


def run_sweep(session: Session, *, start_lr: float, end_lr: float, num_iter: int | None = None,
              smooth_f: float = 0.05, diverge_th: float = 1.05) -> LRFinderResult:
    if not 0 < start_lr < end_lr:
        raise ConfigError(f"the LR finder needs 0 < start_lr < end_lr, got {start_lr:g} and {end_lr:g}")
    if not 0 <= smooth_f < 1:
        raise ConfigError(f"smooth_f must be in [0, 1), got {smooth_f}")
    if diverge_th < 1:
        raise ConfigError(f"diverge_th must be >= 1, got {diverge_th}")
    config = session.config
    if config.schedule != "constant":  # a schedule would overrule the rate the sweep sets at each step
        raise ConfigError(f"the LR finder sets the learning rate itself: its session needs --schedule constant, "
                          f"not {config.schedule!r}")
    x, y = session.device_arrays["train"]
    num_iter = num_iter or -(-len(y) // config.batch_size)  # one epoch
    if num_iter < 1:
        raise ConfigError(f"num_iter must be >= 1, got {num_iter}")
    used, logged = sweep_lrs(start_lr, end_lr, num_iter)

    runner = session.runner
    state = jax.tree.map(jnp.copy, session.state)  # the session's initial state stays untouched
    lrs: list[float] = []
    losses: list[float] = []
    best = np.inf
    diverged = False
    for i, idx in zip(range(num_iter), _batches(session)):
        state = runner.begin_epoch(state.replace(opt_state=set_learning_rate(state.opt_state, used[i])))
        state = runner.step_fn(state, x, y, runner.indices(idx))
        loss = float(state.metrics.objective)
        if i > 0 and smooth_f > 0:
            loss = smooth_f * loss + (1 - smooth_f) * losses[-1]
        best = min(best, loss)
        lrs.append(float(logged[i]))
        losses.append(loss)
        if not np.isfinite(loss) or loss > diverge_th * best:
            diverged = True
            break
    return LRFinderResult(lrs=lrs, losses=losses, suggestion=suggest(losses, lrs), diverged=diverged)


def _batches(session: Session) -> Iterator[np.ndarray]:
    """The training run's index batches, epoch after epoch (each epoch in its own order)."""
    n = len(session.dataset.train)
    for epoch in itertools.count(1):
        yield from index_batches(epoch_order(session.config, epoch, n), session.config.batch_size)


def find_lr(config: TrainConfig, *, start_lr: float = 1e-8, end_lr: float = 1e-3, num_iter: int | None = None,
            diverge_th: float = 1.05, smooth_f: float = 0.05, out: str | None = "lr_finder.png",
            quiet: bool = False) -> LRFinderResult:
    """Run the sweep on a fresh session of ``config`` and plot it (defaults: the speech lab's).
    The sweep sets the learning rate itself, so ``config``'s schedule does not apply to it."""
    session = build_session(dataclasses.replace(config, path="step", schedule="constant"))
    result = run_sweep(session, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter, smooth_f=smooth_f,
                       diverge_th=diverge_th)
    if out:
        result.plot = str(plot_lr_finder(result.lrs, result.losses, result.suggestion, Path(out)))
    say(f"LR finder: {len(result.lrs)} steps from {start_lr:g} to {end_lr:g}"
        + (" (stopped: loss diverged)" if result.diverged else " (no divergence: consider a larger --end-lr)")
        + f"; suggestion {result.suggestion:.4g}", quiet=quiet)
    return result
