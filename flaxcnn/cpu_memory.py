"""Keep freed memory in the process heap, so that a training step does not page-fault its buffers.

Why: XLA's CPU runtime allocates a jitted call's temporary and output buffers on every call and
frees them when it returns. glibc's ``malloc`` serves any allocation above its mmap threshold
(128 KiB, rising by itself to at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``,
so every call touches every page of its buffers for the first time: the kernel page-faults and
zeroes each 4 KiB page, per step. NetBatchNorm's step at batch 64 took 9,345 page faults (37 MB)
per call and 26-28 ms; with freed memory kept in the heap, 0-540 faults and 13-18 ms (AMD EPYC
with AVX-512, 2 cores, a virtual machine, where a fault also costs a trip to the hypervisor). A
PyTorch training step gains too, less (its caching is per tensor; measured: 17-20% for
NetBatchNorm and SpeechResNet) -- PyTorch rows of flaxcnn's benchmarks run at PyTorch's defaults.

What: ``mallopt(M_MMAP_THRESHOLD)`` and ``mallopt(M_TRIM_THRESHOLD)`` at :data:`KEEP_BELOW_BYTES`:
allocations below that come from the heap and freed memory stays there for the next step. The
cost is that the process keeps its high-water mark of heap memory instead of returning it to the
system. The value is not tuned to a machine: it only has to exceed the buffers of one step, which
for these networks are tens of MB at batch 64 and scale with the batch.

Only on glibc (Linux); elsewhere (macOS, musl) nothing changes. ``FLAXCNN_KEEP_FREED_MEMORY=0``
turns it off. The setting is process-wide by nature, so the library never applies it on import:
the entry points that train (``flaxcnn`` commands, the benchmarks) call :func:`keep_freed_memory`
first thing, and a script of one's own does the same, before JAX starts its runtime threads
(before the first array is made): a thread's malloc arena is fixed at its first allocation, and
with one arena (:data:`ARENAS`) those threads' buffers come from the main heap too. Calling it
again changes nothing (the same thresholds are set again).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "FLAXCNN_KEEP_FREED_MEMORY"
#: allocations below this size are served from (and freed back to) the heap
KEEP_BELOW_BYTES = 1 << 30
#: malloc arenas: one, so that buffers allocated by XLA's runtime threads also come from the main
#: heap (a thread arena grows in heaps of at most 64 MiB that are unmapped again when empty)
ARENAS = 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's <malloc.h> parameter numbers

def keep_freed_memory() -> str:
    """Applies the setting and returns what happened: ``"kept"``,
    ``"off (FLAXCNN_KEEP_FREED_MEMORY=0)"`` or ``"unavailable (<why>)"``. Call it before JAX
    starts (see the module docstring)."""
    return _apply()


def _apply() -> str:
    setting = os.environ.get(ENV, "1").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return f"off ({ENV}={os.environ[ENV]})"
    if setting not in ("1", "true", "yes", "on", ""):
        raise ValueError(f"{ENV} must be 1 or 0, got {os.environ[ENV]!r}")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return f"unavailable (no glibc mallopt in {name or 'the C library'})"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, KEEP_BELOW_BYTES) and mallopt(_M_TRIM_THRESHOLD, KEEP_BELOW_BYTES)
            and mallopt(_M_ARENA_MAX, ARENAS)):
        return "unavailable (mallopt refused the thresholds)"
    return "kept"
