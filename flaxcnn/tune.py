"""``flaxcnn tune``: measure each CPU convolution part and max-pool's implementations offline, on
the machine at hand, and write a conv policy file (:mod:`flaxcnn.models.conv_policy`).

For every layer shape the given models train with, every implementation :mod:`flaxcnn.models.ops`
has for a part (C++ kernels, XLA's convolution, XLA on batch slices, banded matmuls, per-row
matmuls; for pools C++, taps, argmax) is compiled and timed on random data of that shape, in
rounds (one call of each candidate per round, best of the rounds), so that a slow spell of a
shared machine falls on every candidate alike. A layer part gets an override where another
implementation beat the rule's by more than :data:`MIN_GAIN`.

A part timed alone is not that part inside its step (XLA runs a step's independent operations
concurrently and fuses across their edges), so the tuned policy is then checked as a whole: each
model's training step is timed under the default and the tuned policy in interleaved rounds
(median over rounds), and the file keeps the overrides only if the tuned steps were faster
overall (geometric mean over the models). Both step times are written into the file.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxcnn import kernels
from flaxcnn.errors import ConfigError
from flaxcnn.models import conv_policy, ops
from flaxcnn.models.conv_policy import CPP, ConvLayer, ConvPolicy, DepthwiseLayer, Layer, PoolLayer

#: timing rounds per layer part (best of them), and the time after which no further round starts
#: (at least three run): these bound the cost of a new layer shape, not a property of a machine
ROUNDS, SECONDS_PER_PART = 7, 0.3
#: an override needs this much gain over the rule's implementation: below it, this 2-core VM's
#: run-to-run spread (up to ~5% between processes for the same program) decides, not the code
MIN_GAIN = 0.05
#: whole-step timing rounds per policy
STEP_ROUNDS, STEPS_PER_ROUND = 7, 4


def _conv_example(layer: ConvLayer, part: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    kh, kw, c, o = layer.kernel_shape
    x = rng.standard_normal(layer.input_shape_for(layer.n)).astype(np.float32)
    w = (rng.standard_normal(layer.kernel_shape) / math.sqrt(kh * kw * c)).astype(np.float32)
    g = rng.standard_normal((layer.n, *layer.out_hw, o)).astype(np.float32)
    return {"forward": (x, w), "kernel_grad": (x, g), "input_grad": (g, w)}[part]


def _pool_example(layer: PoolLayer, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal(layer.x_shape).astype(np.float32)
    g = rng.standard_normal((layer.n, layer.h // layer.k, layer.w // layer.k, layer.c)).astype(np.float32)
    return x, g


def _depthwise_example(layer: DepthwiseLayer, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((layer.n, layer.h, layer.w, layer.c)).astype(np.float32)
    w = (rng.standard_normal(layer.kernel_shape) / math.sqrt(layer.kernel_hw[0] * layer.kernel_hw[1])).astype(np.float32)
    return x, w


def _example(layer: Layer, part: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(layer, PoolLayer):
        return _pool_example(layer, rng)
    if isinstance(layer, DepthwiseLayer):
        return _depthwise_example(layer, rng)
    return _conv_example(layer, part, rng)


def _depthwise_pass(impl: Callable) -> Callable:
    """A depthwise convolution's part is its whole training pass: forward, then the input and
    kernel gradients (by autodiff of that formulation) for an output gradient."""
    def train_pass(x, w, layer):
        y, pullback = jax.vjp(lambda x, w: impl(x, w, layer), x, w)
        return y, pullback(y)
    return train_pass


def _pool_pass(part: str, impl: ops.PoolImpl) -> Callable:
    """``pool_forward`` is the forward pass alone (evaluation), ``pool`` the forward and backward
    pass of training (they share the residual). Both are timed after a tanh: a pool's input is an
    activation in every network here, and XLA fuses the taps formulation into its producer, so a
    pool timed on its own would misstate it."""
    if part == "pool_forward":
        return lambda x, g, layer: impl.forward(jnp.tanh(x), layer)

    def train_pass(x, g, layer):
        y, first = impl.train_forward(jnp.tanh(x), layer)
        return y, impl.backward(first, g, layer, x.shape)
    return train_pass


def candidates(layer: Layer, part: str) -> dict[str, Callable]:
    """The implementations that can run ``part`` of ``layer`` here, each ``(a, b, layer) -> out``."""
    if isinstance(layer, DepthwiseLayer):
        return {name: _depthwise_pass(impl) for name, impl in ops.DEPTHWISE.items()}
    if isinstance(layer, PoolLayer):
        return {name: _pool_pass(part, impl) for name, impl in ops.POOLS.items()
                if name != CPP or layer.has_kernel(part)}
    names = [name for name in ops.PARTS[part] if name != CPP or layer.has_kernel(part)]
    if ops.cores() < 2:
        names = [name for name in names if not name.endswith("-split")]
    return {name: ops.PARTS[part][name] for name in names}


def time_part(layer: Layer, part: str) -> dict[str, float]:
    """Best-of-rounds seconds of each candidate implementation of ``part`` for ``layer``."""
    rng = np.random.default_rng(0)
    args = _example(layer, part, rng)
    args = [jax.device_put(a, jax.local_devices(backend="cpu")[0]) for a in args]
    compiled = {}
    for name, impl in candidates(layer, part).items():
        compiled[name] = jax.jit(lambda a, b, impl=impl: impl(a, b, layer)).lower(*args).compile()
        jax.block_until_ready(compiled[name](*args))  # first call: allocation, thread pool start
    best = dict.fromkeys(compiled, math.inf)
    spent = 0.0
    for round_ in range(ROUNDS):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            elapsed = time.perf_counter() - start
            best[name], spent = min(best[name], elapsed), spent + elapsed
        if spent > SECONDS_PER_PART and round_ >= 2:
            break
    return best


def _step_timer(model: nnx.Module, shape: tuple[int, ...]) -> Callable[[], float]:
    """A function timing :data:`STEPS_PER_ROUND` chained SGD steps of ``model`` (seconds per step)
    on random inputs; the loss is the mean square of the output (its cost does not depend on
    the loss: any scalar of the output has the same backward pass through the network)."""
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(1e-3)
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)

    def step(params, opt_state, rest):
        def loss(p):
            m = nnx.merge(graph, p, jax.tree.map(lambda v: v, rest))  # fresh Variables in the trace
            m.train()
            return jnp.mean(jnp.square(m(x))), nnx.state(m, ...)
        grads, _ = jax.grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, rest

    jitted = jax.jit(step)
    state = (params, tx.init(params), rest)
    jax.block_until_ready(jitted(*state))  # compile

    def timed() -> float:
        s = state
        start = time.perf_counter()
        for _ in range(STEPS_PER_ROUND):
            s = jitted(*s)
        jax.block_until_ready(s)
        return (time.perf_counter() - start) / STEPS_PER_ROUND
    return timed


def model_input_chw(model: nnx.Module, given: Sequence[int] | None = None) -> tuple[int, int, int]:
    """``given``, else the ``(C, H, W)`` the model declares as ``input_chw`` (ported models do)."""
    chw = given if given is not None else getattr(model, "input_chw", None)
    if chw is None:
        raise ConfigError(f"{type(model).__name__} declares no input_chw; pass --input-shape C,H,W")
    return tuple(int(v) for v in chw)


def tune(models: Mapping[str, tuple[nnx.Module, tuple[int, ...]]], out: str | Path, *,
         say: Callable[[str], None] = print) -> dict[str, Any]:
    """Measures ``models`` (name -> (model, training input shape)), writes the policy file ``out``
    and returns what it wrote."""
    if jax.default_backend() != "cpu":
        raise ConfigError("flaxcnn tune measures CPU implementations; run it on a CPU host "
                                      "(JAX_PLATFORMS=cpu)")
    isa = kernels.selected_isa()
    base = ConvPolicy(isa=isa)
    measured: dict[tuple[str, str], dict[str, Any]] = {}
    for name, (model, shape) in models.items():
        for layer, part, rule_choice in conv_policy.traced_layers(model, shape, base):
            key = (layer.key(), part)
            if key in measured:
                continue
            seconds = time_part(layer, part)
            fastest = min(seconds, key=seconds.get)
            gain = 1 - seconds[fastest] / seconds[rule_choice]
            measured[key] = {"layer": layer.key(), "part": part, "rule": rule_choice, "fastest": fastest,
                             "ms": {n: round(t * 1e3, 4) for n, t in seconds.items()}}
            say(f"  {layer.key()} {part}: " + ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in seconds.items())
                + (f" -> {fastest} ({gain:.0%} faster than {rule_choice})" if fastest != rule_choice
                   and gain > MIN_GAIN else f" -> {rule_choice} (the rule)"))
    overrides = tuple((m["layer"], m["part"], m["fastest"]) for m in measured.values()
                      if m["fastest"] != m["rule"] and 1 - m["ms"][m["fastest"]] / m["ms"][m["rule"]] > MIN_GAIN)
    tuned = ConvPolicy(isa=isa, overrides=overrides, source=str(out))
    steps: dict[str, dict[str, float]] = {}
    kept = bool(overrides)
    if overrides:
        ratios = []
        for name, (model, shape) in models.items():
            timers = {label: _step_timer(conv_policy.apply(nnx.clone(model), policy), shape)
                      for label, policy in (("default", base), ("tuned", tuned))}
            rounds: dict[str, list[float]] = {label: [] for label in timers}
            for _ in range(STEP_ROUNDS):
                for label, timer in timers.items():
                    rounds[label].append(timer())
            steps[name] = {label: round(statistics.median(t) * 1e3, 3) for label, t in rounds.items()}
            ratios.append(steps[name]["default"] / steps[name]["tuned"])
            say(f"  {name} training step: default {steps[name]['default']} ms, tuned {steps[name]['tuned']} ms")
        kept = math.prod(ratios) ** (1 / len(ratios)) > 1.0
        if not kept:
            say("  the tuned steps were not faster overall: the file keeps the default rule")
    final = tuned if kept else ConvPolicy(isa=isa, source=str(out))
    body = {"cpu": kernels.cpu_identity().splitlines()[0] if kernels.cpu_identity() else "unknown",
            "models": list(models), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "step_ms": steps, "overrides_kept": kept, "parts": list(measured.values())}
    conv_policy.save(final, out, **body)
    return {"policy": final, **body}


def resolve_models(names: Sequence[str], batch: int, input_chw: Sequence[int] | None = None
                   ) -> dict[str, tuple[nnx.Module, tuple[int, ...]]]:
    """Registered model names or ``FILE.py:NAME`` specs -> (model, training input shape)."""
    from flaxcnn.models import from_file
    from flaxcnn.models.registry import get_model

    out = {}
    for name in names:
        if from_file.is_file_spec(name):
            model = from_file.build(name)
            out[name] = (model, (batch, *model_input_chw(model, input_chw)))
        else:
            spec = get_model(name)
            out[name] = (spec.build(), (batch, *spec.input_chw))
    return out
