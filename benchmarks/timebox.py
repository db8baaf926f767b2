"""Time-boxed parts of a longer run: each part is one command with a deadline, and one that
fails or overruns is recorded as such while the rest goes on.

Used by :mod:`benchmarks.gpu_check`, which must finish within a fixed budget on a lent machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: a part is not started with less than this many seconds left (it could not even import JAX)
MIN_PART_SECONDS = 10.0
#: after SIGTERM, a timed-out process group gets this long to exit before SIGKILL
KILL_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class Outcome:
    """How one command ended: ``ok`` (exit 0), ``failed`` (another exit status or could not
    start) or ``timed_out`` (killed at its deadline)."""

    status: str
    returncode: int | None
    seconds: float
    error: str | None = None


def time_box(shares: Sequence[float], index: int, seconds_left: float) -> float:
    """Seconds part ``index`` may run: what is left of the budget minus the shares of the parts
    after it. A part that finishes early passes its unused time on to the next one; a part never
    eats into the shares of the parts after it."""
    return seconds_left - sum(shares[index + 1:])


def run_command(cmd: Sequence[str], *, timeout: float, log_path: Path, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> Outcome:
    """Run ``cmd`` in a new process group with its stdout and stderr appended to ``log_path``;
    on timeout the whole group (the command and any processes it started) is terminated."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=True)
        except OSError as error:
            return Outcome("failed", None, time.perf_counter() - start, f"could not start {cmd[0]}: {error}")
        try:
            code = proc.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            _end_group(proc)
            return Outcome("timed_out", proc.returncode, time.perf_counter() - start,
                           f"stopped at its time box of {timeout:.0f} s")
    seconds = time.perf_counter() - start
    if code != 0:
        return Outcome("failed", code, seconds, f"exit status {code}; see {log_path.name}")
    return Outcome("ok", 0, seconds)


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this module started (the command and its children), then,
    after the grace period, SIGKILL to whatever of the group is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=KILL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
