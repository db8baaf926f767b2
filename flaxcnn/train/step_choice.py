"""Which variant of the training step runs: the whole step timed on the machine at hand.

:mod:`flaxcnn.models.dispatch` times each convolution part and max-pool alone and picks the
fastest. A part timed alone is not that part inside its step: XLA's CPU runtime runs a step's
independent operations concurrently on the cores and fuses across their edges, so the sum of
the parts' best times need not be the best step. In one benchmark run on an AMD EPYC with AVX-512
(2 cores, batch 64), the per-part choices made NetDepth's epochs 0.90x as fast as the C++ kernels
everywhere, and with the AVX2 kernels SpeechNet's 0.81x; in each case the choices differed in
their pools.

So the ``step`` path traces the training step in each of dispatch's :data:`policies
<flaxcnn.models.dispatch.POLICIES>` (per-part fastest, C++ kernels wherever they apply, XLA
only), compiles the distinct ones, times them in interleaved rounds on the run's own first batch
(state copies: nothing trains), each round a burst of :data:`BURST` chained steps per variant as
an epoch runs them (dispatched ahead, not waited for one by one), after a warm-up burst of each
(a new executable's first calls page-fault its buffers into the heap: one call each had timed
NetBatchNorm's kernels variant at twice its steady time), and runs the fastest. The choice is cached with dispatch's,
keyed by the lowered step itself (model, batch shape, optimiser, the per-part choices), so the
same machine and cache run the same variant, and the same bits, every time.

A run that knows how many steps it will take (``planned_steps``: ``flaxcnn train`` and ``cv``)
skips the timing, and runs the per-part choices, when the timing would cost more than
:data:`MAX_SHARE_OF_TRAINING` of the training it chooses for (the cost is estimated from the
per-part variant's own compile and step time): the README's 600-image sample run and the test
suite's tiny runs, say, where the other variants' compiles alone would outweigh any gain.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from flaxcnn.models import dispatch

#: timed rounds (one call of every variant each), the time after which no round starts (at least
#: MIN_ROUNDS run), and how far behind after MIN_ROUNDS a variant is timed no further: a bound on
#: the one-time cost of a new step (SpeechResNet's step takes about 60 ms on 2 cores)
MAX_ROUNDS, MIN_ROUNDS, TIME_BUDGET_S, HOPELESS_FACTOR = 15, 4, 1.5, 1.5
#: chained steps per variant per round (and in the warm-up)
BURST = 3
#: the most of a run's planned training time the timing may cost (a bound on overhead, not a
#: property of any machine)
MAX_SHARE_OF_TRAINING = 0.1


def under_policy(name: str, step: Callable) -> Callable:
    """``step`` traced under dispatch's policy ``name`` (see :func:`flaxcnn.models.dispatch.policy`)."""
    def step_under_policy(*args):
        with dispatch.policy(name):
            return step(*args)
    return step_under_policy


def policy_variants(step: Callable, **jit_kwargs: Any) -> dict[str, Callable]:
    """One jitted ``step`` (state donated) per dispatch policy."""
    return {name: jax.jit(under_policy(name, step), donate_argnums=0, **jit_kwargs) for name in dispatch.POLICIES}


def fastest(variants: Mapping[str, Callable], args: Sequence[Any], platform: str,
            planned_steps: int | None = None) -> Callable:
    """The fastest of ``variants`` (policy -> jitted step taking ``args``, state first and
    donated) on ``args``: the cached choice, or one timed now. Variants that trace to the same
    per-part choices are one; where only one is left, or off CPU, or under a forced
    ``--conv-impl``, or where timing would not repay itself in ``planned_steps`` steps (None:
    unknown, time them), nothing is timed."""
    if platform != "cpu" or dispatch.mode() != "auto":
        return variants["measured"]
    choices, traced = {}, {}
    for name, step in variants.items():
        with dispatch.recording() as record:
            traced[name] = step.trace(*args)
        choices[name] = dict(record)
        if name == "measured" and not record:  # nothing dispatched (e.g. a sharded step)
            return step
    distinct: dict[frozenset, str] = {}
    for name in variants:
        distinct.setdefault(frozenset(choices[name].items()), name)
    names = list(distinct.values())
    aliases = {name: [other for other in variants if choices[other] == choices[name]] for name in names}
    if len(names) == 1:
        return variants["measured"]
    # keyed by the step and by how it is timed here: a change to either times it anew
    key = "step " + hashlib.sha256(traced["measured"].lower().as_text().encode()
                                   + Path(__file__).read_bytes()).hexdigest()[:16]
    entry = dispatch.cached(key)
    if entry is None or entry.get("choice") not in names:
        if planned_steps is not None and not _repays(variants["measured"], args, len(names), planned_steps):
            return variants["measured"]
        entry = _measure({name: variants[name] for name in names}, args, key, aliases)
        dispatch.save(key, entry)
    dispatch.note_used(choices[entry["choice"]])
    dispatch.note_step(entry)
    return variants[entry["choice"]]


def _seconds_per_call(step: Callable, args: Sequence[Any], calls: int = 1) -> float:
    """``calls`` chained calls of ``step`` (state in, state out) from a copy of the (donated)
    state, dispatched without waiting in between as an epoch does; seconds per call."""
    state = jax.block_until_ready(jax.tree.map(lambda a: a.copy(), args[0]))
    begin = time.perf_counter()
    for _ in range(calls):
        state = step(state, *args[1:])
    jax.block_until_ready(state)
    return (time.perf_counter() - begin) / calls


def _repays(measured: Callable, args: Sequence[Any], num_variants: int, planned_steps: int) -> bool:
    """Whether timing ``num_variants`` variants costs at most :data:`MAX_SHARE_OF_TRAINING` of
    ``planned_steps`` steps: the per-part variant's first call (its compile) stands for each
    other variant's compile, its second call for a step."""
    compile_s = _seconds_per_call(measured, args)
    step_s = _seconds_per_call(measured, args)
    cost = (num_variants - 1) * compile_s + (MIN_ROUNDS + 1) * BURST * num_variants * step_s
    return cost <= MAX_SHARE_OF_TRAINING * planned_steps * step_s


def _measure(variants: Mapping[str, Callable], args: Sequence[Any], key: str,
             aliases: Mapping[str, list[str]]) -> dict[str, Any]:
    print(f"flaxcnn: timing the training step in {len(variants)} variants ({', '.join(variants)}) "
          f"on this machine (once; cached in {dispatch.cache_path()})", file=sys.stderr, flush=True)
    started = time.perf_counter()
    for step in variants.values():
        _seconds_per_call(step, args)  # compile and first call
    for step in variants.values():
        _seconds_per_call(step, args, BURST)  # warm-up
    best = dict.fromkeys(variants, math.inf)
    alive, spent = list(variants), 0.0
    for round_ in range(MAX_ROUNDS):
        for name in alive:
            elapsed = _seconds_per_call(variants[name], args, BURST)
            best[name], spent = min(best[name], elapsed), spent + BURST * elapsed
        if round_ + 1 >= MIN_ROUNDS:
            alive = [name for name in alive if best[name] <= HOPELESS_FACTOR * min(best.values())]
            if spent > TIME_BUDGET_S:
                break
    dispatch.add_measuring_seconds(time.perf_counter() - started)
    return {"choice": min(best, key=best.get), "ms": {name: round(t * 1e3, 4) for name, t in best.items()},
            "same_as": {name: others for name, others in aliases.items() if len(others) > 1},
            "step": key, "timed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
