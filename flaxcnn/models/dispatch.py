"""Which implementation runs each CPU convolution and max-pool: measured on the machine at hand.

A convolution's training step has three parts -- forward, kernel gradient, input gradient -- and
each has several implementations in :mod:`flaxcnn.models.ops` (flaxcnn's C++ kernels, XLA's
convolution, XLA's convolution on batch slices, banded matmuls, per-row matmuls). Which is
fastest depends on the CPU (vector ISA, cores, caches) and the layer's shape: the C++ kernels
were 2-8x faster than XLA on an AVX-512 Xeon and 3.5-8x slower on an AVX2 EPYC with the same
code. So nothing here is a constant: the first time a layer shape is traced on a machine, each
applicable implementation of the part being traced is compiled and timed on random data of that
shape (the gradients only when a backward pass is traced), the fastest is kept, and the choice is
cached in a JSON file beside the built kernels (``$FLAXCNN_CACHE_DIR``), keyed like them by the
CPU, the kernel source and flags, the JAX version, and by this module's and ``ops.py``'s source,
the usable cores, ``$XLA_FLAGS`` (which change XLA's side of the comparison) and whether freed
memory is kept in the heap (:mod:`flaxcnn.cpu_memory`, applied before anything is measured: without
it, every step page-faults its buffers and a measurement would time the faults).
Same machine, same cache, same seed: same implementations, same bits.

Setting (``--conv-impl`` / ``TrainConfig.conv_impl`` / ``$FLAXCNN_CONV_IMPL``):

``auto``     the measured fastest of all implementations (default)
``kernels``  the C++ kernels wherever they have the part (no measurement); the measured fastest
             XLA formulation elsewhere
``xla``      the measured fastest XLA formulation; the C++ kernels are never used

A layer part timed alone is not that part inside its training step (XLA runs a step's independent
ops concurrently and fuses across their edges), so the step path also times the whole training
step in each of its variants -- ``measured`` (each part's fastest), ``kernels`` (the C++ kernels
wherever they apply) and ``xla`` (XLA's formulations only), built from the same measurements
under :func:`policy` -- and runs the fastest (:mod:`flaxcnn.train.step_choice`).

Every batch size is measured at 64, the lab's batch: a run's last partial batch, the speech
lab's 256 and evaluation's 1000 share that measurement (per-sample costs at 64 stand for them;
measuring each size would multiply the one-time cost, which is bounded to keep a first run short).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxcnn import cpu_memory, kernels

MODES = ("auto", "kernels", "xla")
#: the variants of a traced function under ``auto`` (see :func:`policy`)
POLICIES = ("measured", "kernels", "xla")
#: the batch every measurement uses (see the module docstring)
MEASURED_BATCH = 64
#: timing rounds per layer part (each times every remaining candidate once), the time after which
#: no further round starts (at least three run), and how far behind the best a candidate may be
#: after two rounds and still be timed: these bound the one-time cost of a new layer shape
TIMED_ROUNDS, TIME_PER_LAYER_PART_S, HOPELESS_FACTOR = 7, 0.15, 3.0

_lock = threading.RLock()
_mode_override: str | None = None
_switched_off = threading.local()
_tracing = threading.local()  # this thread's policy and recording (policy(), recording())
_choices: dict[str, dict[str, Any]] | None = None  # the cache file's content
_used: dict[str, dict[str, str]] = {}  # what this process used, by layer description
_announced = False
_measuring_seconds = 0.0  # spent measuring in this process
_steps: list[dict[str, Any]] = []  # whole-step choices this process made or read (flaxcnn.train.step_choice)


class DispatchConfigError(ValueError):
    """An unknown ``conv_impl`` setting."""


def set_mode(mode: str | None) -> None:
    """Sets the implementation choice for this process (``None``: back to ``$FLAXCNN_CONV_IMPL``).
    Applies to functions traced afterwards."""
    global _mode_override
    if mode is not None and mode not in MODES:
        raise DispatchConfigError(f"conv_impl must be one of {', '.join(MODES)}, got {mode!r}")
    _mode_override = mode


def mode() -> str:
    """The implementation choice in force: :func:`set_mode`, else ``$FLAXCNN_CONV_IMPL``, else
    ``auto``; ``FLAXCNN_FFI_CONV=0`` (the kernels switched off) means ``xla``."""
    chosen = _mode_override or os.environ.get("FLAXCNN_CONV_IMPL", "").strip().lower() or "auto"
    if chosen not in MODES:
        raise DispatchConfigError(f"FLAXCNN_CONV_IMPL must be one of {', '.join(MODES)}, got {chosen!r}")
    return "xla" if not kernels.enabled() else chosen


@contextlib.contextmanager
def switched_off() -> Iterator[None]:
    """Within this block (while a function is traced), convolutions and pools are XLA's own, on
    every platform, unmeasured.

    Used for the data-parallel step over a mesh: XLA's SPMD partitioner cannot split a custom
    call (it would gather the whole batch onto every device), nor does slicing the batch by hand
    make sense there; XLA's own convolutions are split over the devices.
    """
    depth = getattr(_switched_off, "depth", 0)
    _switched_off.depth = depth + 1
    try:
        yield
    finally:
        _switched_off.depth = depth


def is_switched_off() -> bool:
    return bool(getattr(_switched_off, "depth", 0))


@contextlib.contextmanager
def policy(name: str) -> Iterator[None]:
    """Within this block (while a function is traced) under ``auto``, each layer part is chosen by
    ``name``: ``measured`` its measured fastest implementation; ``kernels`` the C++ kernel
    wherever it has the part (as ``--conv-impl kernels``); ``xla`` the fastest XLA formulation
    (as ``--conv-impl xla``). All three read one measurement of every candidate. Other modes
    ignore it."""
    if name not in POLICIES:
        raise DispatchConfigError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
    outer = getattr(_tracing, "policy", "measured")
    _tracing.policy = name
    try:
        yield
    finally:
        _tracing.policy = outer


def current_policy() -> str:
    return getattr(_tracing, "policy", "measured")


@contextlib.contextmanager
def recording() -> Iterator[dict[tuple[str, str], str]]:
    """Collects ``{(layer description, part): implementation}`` for every choice made in this
    thread within the block (what a traced function uses)."""
    outer = getattr(_tracing, "record", None)
    record: dict[tuple[str, str], str] = {}
    _tracing.record = record
    try:
        yield record
    finally:
        _tracing.record = outer
        if outer is not None:
            outer.update(record)


def cores() -> int:
    """Cores this process may run on (the batch-slice implementations cut one slice per core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def batch_class(n: int) -> int:
    """The batch size a batch of ``n`` is measured at (one class: :data:`MEASURED_BATCH`)."""
    return MEASURED_BATCH


def _kernel_isa() -> str | None:
    """The C++ kernel variant to use, or None when the kernels are off or cannot be built. On a
    GPU/TPU host (where ``lax.platform_dependent`` still traces the CPU branch) an unbuilt
    variant is not built: that branch then uses XLA's formulations, unmeasured (see choose)."""
    if mode() == "xla":
        return None
    isa = kernels.selected_isa()
    if jax.default_backend() != "cpu" and not kernels.library_path(isa).exists():
        return None
    return isa if kernels.available(isa) else None


@dataclass(frozen=True)
class ConvLayer:
    """One CPU convolution as dispatch sees it: shapes, padding, precision and kernel variant."""

    n: int
    h: int
    w: int
    kernel_shape: tuple[int, int, int, int]  # HWIO
    padding: tuple[tuple[int, int], tuple[int, int]]
    precision: Any
    isa: str | None  # the C++ variant, None when the kernels are not used
    # how the part is chosen (policy()); a field, so that a function traced under another
    # policy never shares a cached trace with this one; not in the measurement's key
    policy: str = "measured"

    def input_shape_for(self, n: int) -> tuple[int, int, int, int]:
        return (n, self.h, self.w, self.kernel_shape[2])

    @property
    def out_hw(self) -> tuple[int, int]:
        (t, b), (l, r) = self.padding
        return self.h + t + b - self.kernel_shape[0] + 1, self.w + l + r - self.kernel_shape[1] + 1

    def describe(self) -> str:
        kh, kw, c, o = self.kernel_shape
        return f"conv {c}->{o} {kh}x{kw} pad {list(map(list, self.padding))} on {self.h}x{self.w}, batch {self.n}"

    def key(self) -> str:
        """The cache key: the layer with its batch class, the precision and the mode."""
        kh, kw, c, o = self.kernel_shape
        return (f"conv n{batch_class(self.n)} {self.h}x{self.w}x{c} k{kh}x{kw}x{o} p{self.padding} "
                f"prec {self.precision} isa {self.isa} mode {mode()}")

    def at_batch(self, n: int) -> "ConvLayer":
        return dataclasses.replace(self, n=n)

    def candidates(self, part: str, table: Mapping[str, Any]) -> list[str]:
        """The names in ``table`` (ops' implementations of ``part``) that can run this layer."""
        cpp = self.isa is not None and kernels.supports_conv(self.kernel_shape[2], self.kernel_shape[3],
                                                             jnp.float32)[part]
        if cpp and mode() == "kernels":
            return ["cpp"]
        names = [name for name in table if name != "cpp" or cpp]
        if cores() < 2:
            names = [name for name in names if not name.endswith("-split")]
        return names

    def example(self, part: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        kh, kw, c, o = self.kernel_shape
        x = rng.standard_normal(self.input_shape_for(self.n)).astype(np.float32)
        w = (rng.standard_normal(self.kernel_shape) / math.sqrt(kh * kw * c)).astype(np.float32)
        g = rng.standard_normal((self.n, *self.out_hw, o)).astype(np.float32)
        return {"forward": (x, w), "kernel_grad": (x, g), "input_grad": (g, w)}[part]

    def implementation(self, part: str, impl: Callable) -> Callable:
        return impl


@dataclass(frozen=True)
class PoolLayer:
    """One CPU max-pool (k x k, stride k) as dispatch sees it."""

    n: int
    h: int
    w: int
    c: int
    k: int
    isa: str | None
    policy: str = "measured"  # as ConvLayer.policy

    def describe(self) -> str:
        return f"max_pool {self.k}x{self.k} on {self.h}x{self.w}x{self.c}, batch {self.n}"

    def key(self) -> str:
        return f"pool n{batch_class(self.n)} {self.h}x{self.w}x{self.c} k{self.k} isa {self.isa} mode {mode()}"

    def at_batch(self, n: int) -> "PoolLayer":
        return dataclasses.replace(self, n=n)

    def candidates(self, part: str, table: Mapping[str, Any]) -> list[str]:
        """The names in ``table`` (ops' pool implementations) that can run this pool."""
        if self.isa is not None and mode() == "kernels":
            return ["cpp"]
        return [name for name in table if name != "cpp" or self.isa is not None]

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.h, self.w, self.c)

    def example(self, part: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((self.n, self.h, self.w, self.c)).astype(np.float32)
        g = rng.standard_normal((self.n, self.h // self.k, self.w // self.k, self.c)).astype(np.float32)
        return x, g

    def implementation(self, part: str, impl: Any) -> Callable:
        """"pool_forward" is the forward pass alone (evaluation), "pool" the forward and backward
        pass of training (they share the residual). Both are timed after a tanh: a pool's input
        is an activation in every network here, and XLA fuses the "taps" formulation into its
        producer (and recomputes the producer in each consumer), so a pool timed on its own would
        misstate it."""
        if part == "pool_forward":
            return lambda x, g, layer: impl.forward(jnp.tanh(x), layer)

        def train_pass(x, g, layer):
            y, first = impl.train_forward(jnp.tanh(x), layer)
            return y, impl.backward(first, g, layer, x.shape)
        return train_pass


def conv_layer(x_shape, w_shape, padding, dtype, precision) -> ConvLayer | None:
    """The layer a float32 NHWC/HWIO convolution is dispatched as; None when it is XLA's own
    convolution everywhere (inside :func:`switched_off`, or another dtype)."""
    if is_switched_off() or jnp.dtype(dtype) != jnp.float32:
        return None
    n, h, w, _ = (int(v) for v in x_shape)
    return ConvLayer(n, h, w, tuple(int(v) for v in w_shape), padding, precision, _kernel_isa(), current_policy())


def pool_layer(x_shape, k: int, dtype) -> PoolLayer | None:
    if is_switched_off() or jnp.dtype(dtype) != jnp.float32 or len(x_shape) != 4:
        return None
    n, h, w, c = (int(v) for v in x_shape)
    return PoolLayer(n, h, w, c, int(k), _kernel_isa(), current_policy())


# --- the cache -------------------------------------------------------------------------------------

def cache_path() -> Path:
    """The choices file: beside the kernels, keyed like them (CPU, kernel source and flags, JAX)
    and by the source of this module and ops.py (a new formulation is measured anew)."""
    isa = kernels.selected_isa()
    ops_source = Path(__file__).with_name("ops.py").read_bytes()
    key = hashlib.sha256(kernels.library_key(isa).encode() + Path(__file__).read_bytes() + ops_source
                         + str(cores()).encode() + os.environ.get("XLA_FLAGS", "").encode()
                         + cpu_memory.keep_freed_memory().encode()).hexdigest()[:16]
    return kernels.cache_dir() / f"dispatch-{isa}-{key}.json"


def _load() -> dict[str, dict[str, Any]]:
    global _choices
    if _choices is None:
        try:
            _choices = json.loads(cache_path().read_text())
        except (OSError, ValueError):
            _choices = {}
    return _choices


def _save(key: str, entry: dict[str, Any]) -> None:
    """Adds one choice to the file (re-read first: another process may have added others)."""
    path = cache_path()
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        current = {}
    current[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(current, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache: the choice still holds for this process
        print(f"flaxcnn: cannot save implementation choices to {path} ({err})", file=sys.stderr)


def clear_memory() -> None:
    """Forgets the loaded choices and what this process used (tests; a new cache folder)."""
    global _choices
    with _lock:
        _choices = None
        _used.clear()
        _steps.clear()


# --- choosing --------------------------------------------------------------------------------------

def choose(layer: ConvLayer | PoolLayer, part: str, table: Mapping[str, Any]) -> str:
    """The name of the implementation of ``part`` ("forward", "kernel_grad", "input_grad";
    "pool_forward" or "pool") for ``layer``, out of ``table`` (name -> implementation, given by
    :mod:`flaxcnn.models.ops`, so that this module never imports it): the only candidate, or
    by the layer's :func:`policy` from the cached measurement or one made now."""
    with _lock:
        cpu_memory.keep_freed_memory()
        names = layer.candidates(part, table)
        chosen_by = layer.policy if mode() == "auto" else "measured"
        allowed = [name for name in names if name != "cpp"] if chosen_by == "xla" else names
        key = f"{layer.key()} | {part}"
        cached = _load().get(key, {})
        if len(allowed) == 1:
            choice = allowed[0]
        elif chosen_by == "kernels" and "cpp" in allowed:
            choice = "cpp"
        elif cached.get("choice") in names and set(allowed) <= set(cached.get("ms", {})):
            choice = cached["choice"] if chosen_by == "measured" else min(allowed, key=cached["ms"].get)
        elif jax.default_backend() != "cpu":
            # A CPU branch traced on a GPU/TPU host (lax.platform_dependent traces every branch):
            # XLA's convolution is correct on CPU too, and measuring CPU code there would cost
            # time for a branch that usually never runs.
            choice = "xla" if "xla" in allowed else allowed[0]
        else:
            entry = measure(layer, part, {name: table[name] for name in names})
            _load()[key] = entry
            _save(key, entry)
            choice = entry["choice"] if chosen_by == "measured" else min(allowed, key=entry["ms"].get)
        _used.setdefault(layer.describe(), {})[part] = choice
        record = getattr(_tracing, "record", None)
        if record is not None:
            record[(layer.describe(), part)] = choice
        return choice


def cached(key: str) -> dict[str, Any] | None:
    """A cache entry by its key (layer parts' keys are made here; others, e.g. a whole step's,
    by their module)."""
    with _lock:
        return _load().get(key)


def save(key: str, entry: dict[str, Any]) -> None:
    with _lock:
        _load()[key] = entry
        _save(key, entry)


def note_step(entry: dict[str, Any]) -> None:
    """Records a whole-step choice this process runs (for :func:`summary`)."""
    with _lock:
        _steps.append(entry)


def note_used(choices: Mapping[tuple[str, str], str]) -> None:
    """Records ``choices`` (from :func:`recording`) as what this process uses: the variant of a
    function that runs, after others were traced beside it."""
    with _lock:
        for (layer, part), choice in choices.items():
            _used.setdefault(layer, {})[part] = choice


def add_measuring_seconds(seconds: float) -> None:
    global _measuring_seconds
    _measuring_seconds += seconds


def measure(layer: ConvLayer | PoolLayer, part: str, implementations: Mapping[str, Any]) -> dict[str, Any]:
    """Times each candidate implementation of ``part`` on random data of the layer's shape (its
    batch class) on a CPU device, in a thread of its own (so that it is never staged into the
    function being traced), and returns the choice with the times in ms."""
    global _announced, _measuring_seconds
    started = time.perf_counter()
    if not _announced:
        print(f"flaxcnn: timing CPU implementations of each new layer shape on this machine (once; "
              f"cached in {cache_path()})", file=sys.stderr, flush=True)
        _announced = True
    at = layer.at_batch(batch_class(layer.n))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        times = pool.submit(_time_candidates, at, part, implementations).result()
    choice = min(times, key=times.get)
    _measuring_seconds += time.perf_counter() - started
    return {"choice": choice, "ms": {name: round(t * 1e3, 4) for name, t in times.items()},
            "layer": at.describe(), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _time_candidates(layer: ConvLayer | PoolLayer, part: str, implementations: Mapping[str, Any]
                     ) -> dict[str, float]:
    """Best-of-several time per candidate, taken in rounds (one call of each candidate per round),
    so that a slow spell of the machine -- frequent on small shared VMs, where the same step can
    vary by 20% from one run to the next -- falls on every candidate alike rather than on one."""
    cpu = jax.local_devices(backend="cpu")[0]  # this process's own (jax.distributed lists all hosts')
    rng = np.random.default_rng(0)
    args = [jax.device_put(a, cpu) for a in layer.example(part, rng)]
    compiled = {}
    names = list(implementations)
    for name in names:
        impl = layer.implementation(part, implementations[name])
        compiled[name] = jax.jit(lambda a, b, impl=impl: impl(a, b, layer)).lower(*args).compile()
        jax.block_until_ready(compiled[name](*args))  # first call: allocation, thread pool start
    best = dict.fromkeys(names, math.inf)
    alive = list(names)
    spent = 0.0
    for round_ in range(TIMED_ROUNDS):
        for name in alive:
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](*args))
            elapsed = time.perf_counter() - start
            best[name], spent = min(best[name], elapsed), spent + elapsed
        if round_ >= 1:  # candidates far behind after two rounds are not timed further
            alive = [name for name in alive if best[name] <= HOPELESS_FACTOR * min(best.values())]
        if spent > TIME_PER_LAYER_PART_S and round_ >= 2:
            break
    return best


def used() -> list[dict[str, Any]]:
    """The implementation of every part of every layer traced in this process (for run records)."""
    with _lock:
        return [{"layer": layer, **parts} for layer, parts in sorted(_used.items())]


def reset_used() -> None:
    with _lock:
        _used.clear()
        _steps.clear()


def summary() -> dict[str, Any]:
    """What a run records about its CPU implementations: setting, kernel variant, per-layer choices."""
    try:
        isa = kernels.selected_isa()
    except kernels.KernelConfigError as err:
        isa = f"invalid ({err})"
    return {"conv_impl": mode(), "kernel_isa": isa, "kernels_available": mode() != "xla" and _kernel_isa() is not None,
            "cpu_cores": cores(), "freed_memory": cpu_memory.state(),
            "measuring_seconds_this_process": round(_measuring_seconds, 2), "layers": used(),
            "training_steps": list(_steps)}
