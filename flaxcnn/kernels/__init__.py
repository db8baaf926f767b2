"""Hand-written CPU convolution kernels (``conv_cpu.cc``), built on first use and called from XLA
through ``jax.ffi``.

Why: on CPU, XLA runs each convolution as one YNNPACK call on one thread, and the lab networks'
shapes (3-64 channels, 3x3 or 10x10 kernels, many positions) are where those kernels are
weakest; :func:`flaxcnn.models.ops.conv_general_dilated` (which routes convolutions here) and
the README's Performance section say what was measured. The C++ source is compiled once per
machine with the system C++ compiler (``-O3 -march=native``: the library is built on the
machine that runs it) into a cache folder (``$FLAXCNN_CACHE_DIR``, default
``~/.cache/flaxcnn``), keyed by the source, flags and JAX version; without a compiler, or with
``FLAXCNN_FFI_CONV=0``, flaxcnn falls back to the XLA formulations in
:mod:`flaxcnn.models.ops` and says so once.
"""

from __future__ import annotations

import contextlib
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
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SOURCE = Path(__file__).with_name("conv_cpu.cc")
#: compiler flags: -march=native because the library is built on the machine that runs it
CXXFLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC",
            "-w")
TARGETS = {"flaxcnn_conv_forward": "FlaxcnnConvForward",
           "flaxcnn_conv_kernel_grad": "FlaxcnnConvKernelGrad",
           "flaxcnn_max_pool_forward": "FlaxcnnMaxPoolForward",
           "flaxcnn_max_pool_backward": "FlaxcnnMaxPoolBackward"}


def cache_dir() -> Path:
    """Where built libraries are kept: ``$FLAXCNN_CACHE_DIR``, default ``~/.cache/flaxcnn``."""
    return Path(os.environ.get("FLAXCNN_CACHE_DIR") or Path.home() / ".cache" / "flaxcnn")


def cpu_identity() -> str:
    """The CPU's model and instruction-set flags: with ``-march=native`` a library built for one CPU
    may not run on another (say, AVX-512 code on a CPU without it), so a home folder shared between
    machines keeps one build per kind of CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(dict.fromkeys(line for line in lines if line.split(":")[0].strip() in wanted))


def library_path() -> Path:
    """Where the compiled library for this source, compiler flags, jaxlib version and CPU lives."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CXXFLAGS).encode() + jax.__version__.encode()
                         + cpu_identity().encode()).hexdigest()[:16]
    return cache_dir() / f"conv_cpu-{key}.so"


def compiler() -> str | None:
    """The C++ compiler to build with: ``$CXX``, else the first of g++, c++, clang++ on PATH."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def build(path: Path) -> None:
    """Compiles ``conv_cpu.cc`` to ``path`` (atomically: a concurrent build never sees half a file)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (looked for $CXX, g++, c++, clang++)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        cmd = [cxx, *CXXFLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as err:
            raise RuntimeError(f"cannot run the C++ compiler {cxx!r}: {err}") from err
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(out, path)


@functools.cache
def available() -> bool:
    """Builds (once per machine) and registers the kernels; False, with one warning, if that fails
    or ``FLAXCNN_FFI_CONV=0``."""
    if os.environ.get("FLAXCNN_FFI_CONV", "1") == "0":
        return False
    try:
        path = library_path()
        if not path.exists():
            print(f"flaxcnn: compiling CPU convolution kernels into {path} (once per machine)",
                  file=sys.stderr)
            build(path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as err:
        warnings.warn(f"flaxcnn: CPU convolution kernels unavailable, using XLA's convolutions ({err})",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


#: output channel counts ``conv_cpu.cc`` has kernels for (others go to XLA's convolution)
CHANNELS = (8, 10, 16, 24, 32, 48, 64)


_switched_off = threading.local()


@contextlib.contextmanager
def switched_off() -> Iterator[None]:
    """Within this block (while a function is traced), convolutions and pools do not use the C++
    kernels.

    Used for the data-parallel step over a mesh: XLA's SPMD partitioner cannot split a custom
    call, so it would gather the whole batch onto every device and compute each convolution
    there in full; XLA's own convolutions are split over the devices.
    """
    depth = getattr(_switched_off, "depth", 0)
    _switched_off.depth = depth + 1
    try:
        yield
    finally:
        _switched_off.depth = depth


def _on() -> bool:
    return jax.default_backend() == "cpu" and not getattr(_switched_off, "depth", 0) and available()


def supports_pool(x: jax.Array) -> bool:
    """Whether :func:`max_pool` runs this pooling with the C++ kernels (float32 on CPU)."""
    return x.dtype == jnp.float32 and x.ndim == 4 and _on()


def supports(x: jax.Array, w: jax.Array) -> bool:
    """Whether :func:`conv2d` runs this float32 NHWC/HWIO convolution with the C++ kernels
    (its output channel count has one) -- building them first if needed."""
    return x.dtype == w.dtype == jnp.float32 and w.shape[3] in CHANNELS and _on()


def _xla_valid_conv(xp: jax.Array, w: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(xp, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _require() -> None:
    if not available():
        raise RuntimeError("flaxcnn's C++ convolution kernels are not available (see the warning above, "
                           "or FLAXCNN_FFI_CONV=0); use flaxcnn.models.ops.conv_general_dilated, which falls back")


def _forward(xp: jax.Array, w: jax.Array) -> jax.Array:
    _require()
    n, hp, wp, _ = xp.shape
    kh, kw, _, o = w.shape
    if o not in CHANNELS:
        return _xla_valid_conv(xp, w)
    out = jax.ShapeDtypeStruct((n, hp - kh + 1, wp - kw + 1, o), jnp.float32)
    return jax.ffi.ffi_call("flaxcnn_conv_forward", out, vmap_method="sequential")(xp, w)


def _kernel_grad(xp: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
    if kernel_shape[3] not in CHANNELS:
        w0 = jnp.zeros(kernel_shape, jnp.float32)  # the convolution is linear in w: any w will do
        return jax.vjp(lambda w: _xla_valid_conv(xp, w), w0)[1](g)[0]
    _require()
    out = jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32)
    return jax.ffi.ffi_call("flaxcnn_conv_kernel_grad", out, vmap_method="sequential")(xp, g)


def _pad(x: jax.Array, padding) -> jax.Array:
    (t, b), (l, r) = padding
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (t, b, 0), (l, r, 0), (0, 0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Stride-1 float32 convolution of an NHWC batch with an HWIO kernel and explicit
    ``((top, bottom), (left, right))`` padding, forward and both gradients by the C++ kernels."""
    return _forward(_pad(x, padding), w)


def _conv2d_fwd(x, w, padding):
    xp = _pad(x, padding)
    return _forward(xp, w), (xp, w)


def _conv2d_bwd(padding, residuals, g):
    xp, w = residuals
    kh, kw, c, _ = w.shape
    (t, b), (l, r) = padding
    if c in CHANNELS:
        # input gradient: the output gradient, padded so that the result has the input's size,
        # convolved with the kernel flipped in space and with in/out channels swapped
        gp = _pad(g, ((kh - 1 - t, kh - 1 - b), (kw - 1 - l, kw - 1 - r)))
        grad_x = _forward(gp, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
    else:  # (the first layer's: usually not needed, and then removed by XLA)
        x = xp[:, t:xp.shape[1] - b, l:xp.shape[2] - r]
        grad_x = jax.vjp(lambda a: _xla_valid_conv(_pad(a, padding), w), x)[1](g)[0]
    return grad_x, _kernel_grad(xp, g, w.shape)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, k: int) -> jax.Array:
    """``F.max_pool2d(x, k)`` (stride k, floor mode) of an NHWC float32 batch by the C++ kernel;
    the gradient goes to each window's first maximum (PyTorch's rule on ties)."""
    return _pool_forward(x, k)[0]


def _pool_forward(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    _require()
    n, h, w, c = x.shape
    out = (jax.ShapeDtypeStruct((n, h // k, w // k, c), jnp.float32),
           jax.ShapeDtypeStruct((n, h // k, w // k, c), jnp.int32))
    return jax.ffi.ffi_call("flaxcnn_max_pool_forward", out, vmap_method="sequential")(x, k=np.int64(k))


def _max_pool_fwd(x, k):
    y, first = _pool_forward(x, k)
    return y, (first, x.shape)


def _max_pool_bwd(k, residuals, g):
    first, shape = residuals
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    return (jax.ffi.ffi_call("flaxcnn_max_pool_backward", out, vmap_method="sequential")(g, first, k=np.int64(k)),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
