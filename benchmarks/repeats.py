"""One row from the same job measured in several processes (``train_throughput --repeats N``).

Why processes and not more epochs: on a 2-core VM something fixed for a process's lifetime
(where its buffers landed, say) moved one row against another by about 6% either way between
processes, more than one process's bootstrap interval. Repeating the process samples that.

A merged row keeps every process's epochs (``epoch_seconds_by_process``, which
:func:`benchmarks.report.paired_ratio` resamples process by process) and reports, for each
single-number field, the median over processes of that process's figure, so that a row
measured in N processes is not favoured over a row measured in one (the fastest epoch of N
processes would be).
"""

from __future__ import annotations

import statistics
from typing import Any

#: fields that are the median over processes of each process's value
MEDIAN_FIELDS = ("samples_per_second", "samples_per_second_median", "warmup_seconds", "first_epoch_seconds",
                 "eval_samples_per_second")


def merge_processes(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``runs[k]`` are the rows one process returned for a job (the same rows in the same
    order in every process); returns one merged row per row. A row that failed in any process
    is returned as it failed there."""
    if len(runs) == 1:
        return runs[0]
    if len({len(rows) for rows in runs}) != 1:
        raise ValueError(f"repeated processes returned different row counts: {[len(rows) for rows in runs]}")
    merged = []
    for rows in zip(*runs):
        failed = [r for r in rows if "error" in r]
        if failed:
            merged.append({**failed[0], "processes": len(rows)})
            continue
        row = dict(rows[0])
        for key in MEDIAN_FIELDS:
            if key in row:
                row[key] = statistics.median(r[key] for r in rows)
        row["samples_per_second_by_process"] = [r["samples_per_second"] for r in rows]
        row["epoch_seconds_by_process"] = [r["epoch_seconds"] for r in rows]
        row["epoch_seconds"] = [s for r in rows for s in r["epoch_seconds"]]
        row["train_finite"] = all(r.get("train_finite", True) for r in rows)
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rows)
        row["processes"] = len(rows)
        row["throughput_method"] = f"the median over {len(rows)} processes of {rows[0]['throughput_method']}"
        merged.append(row)
    return merged
