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
only), compiles the distinct ones, times them in interleaved rounds on the run's own first
:data:`BURST` batches (state copies: nothing trains), each round one burst of chained steps per
variant over those batches, as an epoch runs them (dispatched ahead, not waited for one by one,
each batch gathering other rows), after a warm-up burst of each (a new executable's first calls
page-fault its buffers into the heap: one call each had timed NetBatchNorm's kernels variant at
twice its steady time), and runs the variant with the lowest median over rounds of its time
relative to the round's fastest. Paired within rounds, a slow spell of the machine falls on every
variant of that round alike; the median, unlike the fastest burst, is not won by one lucky burst.
(Timing 3 repeats of the first batch and taking each variant's fastest burst chose SpeechNet's
per-part variant with the AVX2 kernels at 20.2 against 20.6 ms; over the epoch's own batches its
kernels variant was 3-5% faster, in medians of 20 rounds and in whole epochs alike.) The choice is cached with dispatch's,
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
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from flaxcnn.models import dispatch

#: timed rounds (one burst of every variant each), the time after which no round starts (at least
#: MIN_ROUNDS run), and how far behind after MIN_ROUNDS a variant is timed no further: a bound on
#: the one-time cost of a new step (SpeechResNet's step takes about 60 ms on 2 cores); enough
#: rounds that the median resolves a few percent where one burst varies by 10-20%
MAX_ROUNDS, MIN_ROUNDS, TIME_BUDGET_S, HOPELESS_FACTOR = 25, 7, 3.0, 1.5
#: chained steps per variant per round (and in the warm-up): the epoch's first batches
BURST = 4
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


def fastest(variants: Mapping[str, Callable], state: Any, batches: Sequence[Sequence[Any]], platform: str,
            planned_steps: int | None = None) -> Callable:
    """The fastest of ``variants`` (policy -> jitted step taking ``(state, *batch)``, state
    donated) on ``state`` and ``batches`` (the arguments after the state of the run's next steps,
    all of one shape; the first :data:`BURST` are timed, cycled if fewer): the cached choice, or
    one timed now. Variants that trace to the same per-part choices are one; where only one is
    left, or off CPU, or under a forced ``--conv-impl``, or where timing would not repay itself
    in ``planned_steps`` steps (None: unknown, time them), nothing is timed."""
    if platform != "cpu" or dispatch.mode() != "auto":
        return variants["measured"]
    if not batches:
        raise ValueError("fastest() needs at least one batch to trace and time the step on")
    burst = [tuple(batches[i % len(batches)]) for i in range(BURST)]
    choices, traced = {}, {}
    for name, step in variants.items():
        with dispatch.recording() as record:
            traced[name] = step.trace(state, *burst[0])
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
        if planned_steps is not None and not _repays(variants["measured"], state, burst, len(names), planned_steps):
            return variants["measured"]
        entry = _measure({name: variants[name] for name in names}, state, burst, key, aliases)
        dispatch.save(key, entry)
    dispatch.note_used(choices[entry["choice"]])
    dispatch.note_step(entry)
    return variants[entry["choice"]]


def _seconds_per_call(step: Callable, state: Any, batches: Sequence[Sequence[Any]]) -> float:
    """One chained call of ``step`` per batch (state in, state out) from a copy of the (donated)
    ``state``, dispatched without waiting in between as an epoch does; seconds per call."""
    state = jax.block_until_ready(jax.tree.map(lambda a: a.copy(), state))
    begin = time.perf_counter()
    for batch in batches:
        state = step(state, *batch)
    jax.block_until_ready(state)
    return (time.perf_counter() - begin) / len(batches)


def _repays(measured: Callable, state: Any, burst: Sequence[Sequence[Any]], num_variants: int,
            planned_steps: int) -> bool:
    """Whether timing ``num_variants`` variants costs at most :data:`MAX_SHARE_OF_TRAINING` of
    ``planned_steps`` steps: the per-part variant's first call (its compile) stands for each
    other variant's compile, its second call for a step."""
    compile_s = _seconds_per_call(measured, state, burst[:1])
    step_s = _seconds_per_call(measured, state, burst[:1])
    cost = (num_variants - 1) * compile_s + (MIN_ROUNDS + 1) * BURST * num_variants * step_s
    return cost <= MAX_SHARE_OF_TRAINING * planned_steps * step_s


def _measure(variants: Mapping[str, Callable], state: Any, burst: Sequence[Sequence[Any]], key: str,
             aliases: Mapping[str, list[str]]) -> dict[str, Any]:
    print(f"flaxcnn: timing the training step in {len(variants)} variants ({', '.join(variants)}) "
          f"on this machine (once; cached in {dispatch.cache_path()})", file=sys.stderr, flush=True)
    started = time.perf_counter()
    for step in variants.values():
        _seconds_per_call(step, state, burst[:1])  # compile and first call
    for step in variants.values():
        _seconds_per_call(step, state, burst)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    relative: dict[str, list[float]] = {name: [] for name in variants}  # to the round's fastest
    alive, spent = list(variants), 0.0
    for round_ in range(MAX_ROUNDS):
        this_round = {name: _seconds_per_call(variants[name], state, burst) for name in alive}
        fastest_now = min(this_round.values())
        for name, elapsed in this_round.items():
            seconds[name].append(elapsed)
            relative[name].append(elapsed / fastest_now)
            spent += len(burst) * elapsed
        if round_ + 1 >= MIN_ROUNDS:
            alive = [name for name in alive if statistics.median(relative[name]) <= HOPELESS_FACTOR]
            if spent > TIME_BUDGET_S:
                break
    dispatch.add_measuring_seconds(time.perf_counter() - started)
    score = {name: statistics.median(ratios) for name, ratios in relative.items()}
    choice = min(alive, key=score.get)
    return {"choice": choice, "relative": {name: round(s, 4) for name, s in score.items()},
            "ms": {name: round(statistics.median(s) * 1e3, 4) for name, s in seconds.items()},
            "rounds": len(seconds[choice]), "same_as": {name: others for name, others in aliases.items() if len(others) > 1},
            "step": key, "timed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
