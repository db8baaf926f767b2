"""The run directory's text files: config.json, metrics.jsonl (one line per epoch), summary.json.

Every write goes to a temporary file that is renamed over the old one (or, for the jsonl, is
appended and fsync-ed), so a killed process never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from flaxcnn.errors import ConfigError, TrainingError

MIN_FREE_BYTES = 50 * 2**20


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A run directory's ``config.json`` (settings, data, backend); ConfigError without one."""
    if not (run_dir / "config.json").exists():
        raise ConfigError(f"{run_dir} is not a flaxcnn run directory (no config.json)")
    return read_json(run_dir / "config.json")


def prepare_run_dir(run_dir: str | os.PathLike, *, resume: bool, overwrite: bool = False) -> Path:
    """Create RUN_DIR and prove it is writable with room to spare, before any training starts."""
    path = Path(run_dir)
    has_run = holds_a_run(path)
    if has_run and not resume and not overwrite:
        raise TrainingError(
            f"{path} already holds a run (metrics.jsonl / checkpoints); continue it with --resume, "
            "replace it with --overwrite, or choose another --out"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise TrainingError(f"cannot write to run directory {path}: {error.strerror or error}") from None
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise TrainingError(
            f"only {free / 2**20:.1f} MiB free on the disk of {path}; checkpoints need at least "
            f"{MIN_FREE_BYTES // 2**20} MiB"
        )
    if overwrite and has_run:
        for name in ("metrics.jsonl", "summary.json"):
            (path / name).unlink(missing_ok=True)
        shutil.rmtree(path / "checkpoints", ignore_errors=True)
    return path


def holds_a_run(path: Path) -> bool:
    """Whether ``path`` holds at least one finished epoch (a metrics row or a checkpoint step).

    A run stopped before its first epoch ended (bad setting, NaN in epoch 1) left nothing worth
    keeping, so starting again there needs neither --resume nor --overwrite.
    """
    metrics = path / "metrics.jsonl"
    has_rows = metrics.is_file() and metrics.stat().st_size > 0
    return has_rows or any(p.name.isdigit() for p in (path / "checkpoints").glob("*/*"))


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is not trusted
        return rows

    def truncate_after(self, epoch: int) -> list[dict]:
        """Keep the rows of epochs <= ``epoch`` (those a checkpoint covers) and return them."""
        rows = [r for r in self.read() if r.get("epoch", 0) <= epoch]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)
        return rows

    def append(self, row: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as error:  # a full disk: the earlier rows and checkpoints are intact
            raise TrainingError(
                f"cannot append epoch {row.get('epoch')} to {self.path}: {error.strerror or error}. "
                "Earlier epochs are kept: make room and continue with --resume"
            ) from error
