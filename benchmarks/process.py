"""Run one function in a fresh Python process and get its JSON result back.

Each framework is measured in a process of its own, so its peak RSS (``ru_maxrss``) is its
own and neither framework's thread pools or imports slow the other. The parent writes the
job as JSON, the child (``python -m benchmarks.process ENTRY JOB OUT``) imports
``module:function``, calls it with the job and writes the returned dict to OUT.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from flaxcnn.errors import TrainingError

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_isolated(entry: str, job: dict[str, Any], *, env: dict[str, str] | None = None,
                 label: str = "worker") -> dict[str, Any]:
    """Call ``entry`` (``"module:function"``) on ``job`` in a child process; its output streams
    to this process's stdout/stderr. ``env`` entries are added to the child's environment."""
    with tempfile.TemporaryDirectory(prefix="flaxcnn-bench-") as tmp:
        job_path, out_path = Path(tmp, "job.json"), Path(tmp, "out.json")
        job_path.write_text(json.dumps(job))
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
        code = subprocess.run([sys.executable, "-m", "benchmarks.process", entry, str(job_path), str(out_path)],
                              env=child_env, cwd=REPO_ROOT).returncode
        if code != 0 or not out_path.exists():
            raise TrainingError(f"the {label} process ({entry}) exited with status {code}; its output is above")
        return json.loads(out_path.read_text())


def main(argv: list[str] | None = None) -> int:
    entry, job_path, out_path = argv if argv is not None else sys.argv[1:]
    # Process-wide, before JAX or torch start their threads; FLAXCNN_KEEP_FREED_MEMORY=0 (the
    # parent's choice for PyTorch rows) leaves the allocator at glibc's defaults.
    from flaxcnn import cpu_memory

    freed_memory = cpu_memory.keep_freed_memory()
    module_name, _, function_name = entry.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(json.loads(Path(job_path).read_text()))
    result.setdefault("keep_freed_memory", freed_memory)
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
