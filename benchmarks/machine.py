"""What the numbers were measured on: CPU, cores, load, Python; each worker adds its framework's
versions and thread settings (see ``measure.framework_info``)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def memory_total_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def code_version() -> dict[str, Any]:
    """The commit being measured, and whether flaxcnn/ had uncommitted changes (the engine
    changes often; a number is only meaningful with the code that produced it)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--", "flaxcnn")
    return {"git_commit": git("rev-parse", "HEAD"), "flaxcnn_uncommitted_changes": bool(status) if status is not None
            else None}


def vector_isa() -> dict[str, Any]:
    """The CPU's vector instruction sets and the flaxcnn kernel variants it runs (best first)."""
    from flaxcnn import kernels

    flags = kernels.cpu_flags()
    return {"cpu_vector_flags": sorted(f for f in flags if f.startswith(("avx", "fma", "sse4", "asimd", "sve", "neon"))),
            "kernel_isas_runnable": list(kernels.runnable_isas()),
            "kernel_isa_env": os.environ.get("FLAXCNN_KERNEL_ISA", "")}


def machine_info() -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": cpu_model(),
        **vector_isa(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_total_mb": memory_total_mb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS",
                                                  "JAX_PLATFORMS", "FLAXCNN_KERNEL_ISA", "FLAXCNN_CONV_IMPL") if k in os.environ},
        **code_version(),
    }
