"""Hand-written CPU convolution and max-pool kernels (``conv_cpu.cc``), built on first use for the
CPU at hand and called from XLA through ``jax.ffi``.

Why: on CPU, XLA runs each convolution as one YNNPACK call on one thread, and the lab networks'
shapes (3-64 channels, 3x3 or 10x10 kernels, many positions) are where those kernels are
weakest. :mod:`flaxcnn.models.conv_policy` runs them wherever they apply (its default rule) and
``flaxcnn tune`` measures them against XLA's formulations on the machine at hand.

ISA variants. The source is compiled for one of three targets, and its vector width and
register blocking follow the target's vector registers (see ``Blocking`` in ``conv_cpu.cc``):

========  ==========================================  ==========================================
variant   compiler target                             vectors
========  ==========================================  ==========================================
avx512    ``-march=native`` (``-march=skylake-avx512``  32 registers x 16 floats
          where the CPU has no AVX-512: builds only)
avx2      ``-march=native -mno-avx512f`` (``-march=     16 registers x 8 floats, FMA
          haswell`` where the CPU has no AVX2)
generic   the compiler's default target (x86-64:      128-bit SSE / NEON, 4 floats
          SSE2; ``-mcpu=native`` on Arm)
========  ==========================================  ==========================================

The variant is the best one the CPU runs, or ``FLAXCNN_KERNEL_ISA=avx512|avx2|generic`` (an
AVX-512 machine can so build, test and time the AVX2 code). Each variant is its own library in
the cache folder (``$FLAXCNN_CACHE_DIR``, default ``~/.cache/flaxcnn``), keyed by the source,
flags, JAX version and CPU, and registers its own FFI targets (``flaxcnn_conv_forward_avx2``,
...), so one process can load several. Without a C++ compiler flaxcnn uses XLA's
convolutions and says so once; ``--conv-policy xla`` (:data:`flaxcnn.models.conv_policy.XLA_ONLY`)
never calls the kernels.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("conv_cpu.cc")
ISAS = ("avx512", "avx2", "generic")
#: flags common to every variant (the target flags are in :func:`target_flags`)
CXXFLAGS = ("-O3", "-std=c++17", "-fPIC", "-w")
#: the C++ symbols of each FFI handler; the registered target is ``<name>_<isa>``
TARGETS = {"flaxcnn_conv_forward": "FlaxcnnConvForward",
           "flaxcnn_conv_kernel_grad": "FlaxcnnConvKernelGrad",
           "flaxcnn_max_pool_forward": "FlaxcnnMaxPoolForward",
           "flaxcnn_max_pool_backward": "FlaxcnnMaxPoolBackward"}
#: output channel counts ``conv_cpu.cc`` has kernels for (others go to XLA's formulations)
CHANNELS = (8, 10, 16, 24, 32, 48, 64)


def build_units() -> int:
    """Translation units the source is split into when built: one per usable core, at most 4 (each
    instantiates some channel counts and they compile in parallel: 11 s -> about 7 s on 2 cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


class KernelConfigError(ValueError):
    """``FLAXCNN_KERNEL_ISA`` names a variant that does not exist or that this CPU cannot run."""


def cache_dir() -> Path:
    """Where built libraries are kept: ``$FLAXCNN_CACHE_DIR``, default ``~/.cache/flaxcnn``."""
    return Path(os.environ.get("FLAXCNN_CACHE_DIR") or Path.home() / ".cache" / "flaxcnn")


def cpu_identity() -> str:
    """The CPU's model and instruction-set flags: a library built for one CPU may not run on
    another (say, AVX-512 code on a CPU without it), so a home folder shared between machines
    keeps one build per kind of CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(dict.fromkeys(line for line in lines if line.split(":")[0].strip() in wanted))


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags ``/proc/cpuinfo`` lists (empty where there is none)."""
    flags: set[str] = set()
    for line in cpu_identity().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def runnable_isas() -> tuple[str, ...]:
    """The variants this CPU can run, best first."""
    flags = cpu_flags()
    out = []
    if _x86() and "avx512f" in flags:
        out.append("avx512")
    if _x86() and {"avx2", "fma"} <= flags:
        out.append("avx2")
    return (*out, "generic")


def selected_isa() -> str:
    """``$FLAXCNN_KERNEL_ISA`` if set (checked), else the best variant this CPU runs."""
    forced = os.environ.get("FLAXCNN_KERNEL_ISA", "").strip().lower()
    if not forced or forced == "auto":
        return runnable_isas()[0]
    if forced not in ISAS:
        raise KernelConfigError(f"FLAXCNN_KERNEL_ISA={forced!r} is not a kernel variant; "
                                f"accepted: auto, {', '.join(ISAS)}")
    if forced not in runnable_isas():
        raise KernelConfigError(f"FLAXCNN_KERNEL_ISA={forced}: this CPU cannot run that variant "
                                f"(it runs: {', '.join(runnable_isas())}); build_only() still compiles it")
    return forced


def target_flags(isa: str) -> tuple[str, ...]:
    """Compiler target flags of a variant: the native CPU where it runs the variant (tuning for
    it too), else a generic CPU of that ISA, so that any variant can at least be built."""
    native = isa in runnable_isas()
    if isa == "avx512":
        return ("-march=native", "-mprefer-vector-width=512") if native else ("-march=skylake-avx512",)
    if isa == "avx2":
        return ("-march=native", "-mno-avx512f") if native else ("-march=haswell",)
    if isa == "generic":
        return ("-mcpu=native",) if platform.machine().lower() in ("aarch64", "arm64") else ()
    raise KernelConfigError(f"unknown kernel variant {isa!r}; accepted: {', '.join(ISAS)}")


def library_key(isa: str) -> str:
    """What a built library depends on: source, flags, jaxlib version and CPU."""
    text = (SOURCE.read_bytes() + " ".join((*CXXFLAGS, *target_flags(isa))).encode()
            + jax.__version__.encode() + cpu_identity().encode())
    return hashlib.sha256(text).hexdigest()[:16]


def library_path(isa: str | None = None) -> Path:
    """Where the compiled library of a variant (default: the selected one) lives."""
    isa = isa or selected_isa()
    return cache_dir() / f"conv_cpu-{isa}-{library_key(isa)}.so"


def compiler() -> str | None:
    """The C++ compiler to build with: ``$CXX``, else the first of g++, c++, clang++ on PATH."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _run(cmd: list[str]) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise RuntimeError(f"cannot run the C++ compiler {cmd[0]!r}: {err}") from err
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")


def build(path: Path, isa: str | None = None) -> None:
    """Compiles ``conv_cpu.cc`` for a variant to ``path``: :func:`build_units` object files in
    parallel, then one link; atomically (a concurrent build never sees half a file)."""
    isa = isa or selected_isa()
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (looked for $CXX, g++, c++, clang++)")
    flags = [*CXXFLAGS, *target_flags(isa), f"-I{jax.ffi.include_dir()}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        count = build_units()
        objects = [Path(tmp) / f"unit{u}.o" for u in range(count)]
        units = [[cxx, *flags, f"-DFLAXCNN_UNIT={u}", f"-DFLAXCNN_UNITS={count}", "-c", str(SOURCE),
                  "-o", str(obj)] for u, obj in enumerate(objects)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(_run, units))
        out = Path(tmp) / path.name
        _run([cxx, "-shared", *[str(o) for o in objects], "-o", str(out)])
        os.replace(out, path)


def build_only(isa: str, path: Path) -> None:
    """Compiles a variant without loading it (a variant the CPU cannot run can still be built)."""
    build(path, isa)


_builds: dict[str, concurrent.futures.Future] = {}
_builds_lock = threading.Lock()


def _ensure_built(isa: str) -> Path:
    path = library_path(isa)
    if not path.exists():
        print(f"flaxcnn: compiling the {isa} CPU kernels into {path} (once per machine) ...",
              file=sys.stderr, flush=True)
        start = time.perf_counter()
        build(path, isa)
        print(f"flaxcnn: compiled the {isa} CPU kernels in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
    return path


def start_build(isa: str | None = None) -> None:
    """Starts building a variant (default: the selected one) in a background thread, if it is not
    built yet, so that the compiler runs while the caller loads data and builds the model; the
    first use of the kernels waits for it."""
    try:
        isa = isa or selected_isa()
    except KernelConfigError:
        return  # reported when the kernels are first used
    with _builds_lock:
        if isa not in _builds and not library_path(isa).exists():
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="flaxcnn-build")
            _builds[isa] = pool.submit(_ensure_built, isa)
            pool.shutdown(wait=False)


@functools.cache
def load(isa: str) -> bool:
    """Builds (once per machine) and registers one variant; False, with one warning, if that fails."""
    try:
        with _builds_lock:
            pending = _builds.pop(isa, None)
        path = pending.result() if pending is not None else _ensure_built(isa)
        lib = ctypes.cdll.LoadLibrary(str(path))
        lib.FlaxcnnKernelIsa.restype = ctypes.c_char_p
        built_as = lib.FlaxcnnKernelIsa().decode()
        if built_as != isa:
            raise RuntimeError(f"{path} was built as {built_as!r}, not {isa!r} (compiler target macros)")
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(f"{target}_{isa}", jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as err:
        warnings.warn(f"flaxcnn: CPU convolution kernels unavailable, using XLA's convolutions ({err})",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


def available(isa: str | None = None) -> bool:
    """Whether the kernels (of ``isa``, default the selected variant) can be used: built and
    registered (building them on first call)."""
    return load(isa or selected_isa())


def supports_conv(in_channels: int, out_channels: int, dtype) -> dict[str, bool]:
    """Which convolution parts have a kernel: ``forward`` and ``kernel_grad`` need the output
    channel count in :data:`CHANNELS`, ``input_grad`` (a forward pass with channels swapped) the
    input channel count; float32 only."""
    ok = jnp.dtype(dtype) == jnp.float32
    return {"forward": ok and out_channels in CHANNELS, "kernel_grad": ok and out_channels in CHANNELS,
            "input_grad": ok and in_channels in CHANNELS}


def conv_forward(xp: jax.Array, w: jax.Array, isa: str) -> jax.Array:
    """Valid (unpadded) stride-1 convolution of a padded NHWC batch with an HWIO kernel."""
    n, hp, wp, _ = xp.shape
    kh, kw, _, o = w.shape
    out = jax.ShapeDtypeStruct((n, hp - kh + 1, wp - kw + 1, o), jnp.float32)
    return jax.ffi.ffi_call(f"flaxcnn_conv_forward_{isa}", out, vmap_method="sequential")(xp, w)


def conv_kernel_grad(xp: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...], isa: str) -> jax.Array:
    """The HWIO kernel gradient of :func:`conv_forward` given the output gradient ``g``."""
    out = jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32)
    return jax.ffi.ffi_call(f"flaxcnn_conv_kernel_grad_{isa}", out, vmap_method="sequential")(xp, g)


def max_pool_forward(x: jax.Array, k: int, isa: str) -> tuple[jax.Array, jax.Array]:
    """``F.max_pool2d(x, k)`` (stride k, floor mode) of an NHWC float32 batch, and each window's
    first maximum (row-major index in the window: PyTorch's rule on ties; a NaN counts as the
    maximum, the last NaN of a window, as in PyTorch's CPU kernel)."""
    n, h, w, c = x.shape
    out = (jax.ShapeDtypeStruct((n, h // k, w // k, c), jnp.float32),
           jax.ShapeDtypeStruct((n, h // k, w // k, c), jnp.int32))
    return jax.ffi.ffi_call(f"flaxcnn_max_pool_forward_{isa}", out, vmap_method="sequential")(x, k=np.int64(k))


def max_pool_backward(first: jax.Array, g: jax.Array, k: int, x_shape: tuple[int, ...], isa: str) -> jax.Array:
    """The input gradient of :func:`max_pool_forward`: each window's gradient at its first
    maximum, zero elsewhere (cropped rows and columns included)."""
    out = jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32)
    return jax.ffi.ffi_call(f"flaxcnn_max_pool_backward_{isa}", out, vmap_method="sequential")(g, first, k=np.int64(k))
