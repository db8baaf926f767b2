"""Ratios to the lab loop, and the results as a markdown table and a bar chart."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import math

import numpy as np

#: rows that run the step path under another conv policy than the default rule
FORCED_PATHS = ("step-xla", "step-tuned")
PAIRED_METHOD = ("median over the timed epochs of the other policy's epoch time over the default row's in the "
                 "same round of interleaved epochs; 95% percentile-bootstrap interval over those epochs (over "
                 "processes, then their epochs, for rows measured in several processes: --repeats)")
PATH_ORDER = ("lab-loop", "torch-sliced", "torch-compile", "step", "scan", "step-xla", "step-tuned")
BASELINE = ("torch", "lab-loop")


def _key(row: dict[str, Any]) -> tuple[str, int]:
    return row["model"], row["batch_size"]


def attach_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``ratio_vs_lab_loop`` (training) and ``eval_ratio_vs_lab_loop`` to every row: its
    samples/s over the lab loop's for the same model and batch size, None without a baseline."""
    base = {_key(r): r for r in results if (r["framework"], r["path"]) == BASELINE and "error" not in r}
    for row in results:
        lab = base.get(_key(row))
        ok = lab is not None and "error" not in row
        row["ratio_vs_lab_loop"] = row["samples_per_second"] / lab["samples_per_second"] if ok else None
        row["eval_ratio_vs_lab_loop"] = (row["eval_samples_per_second"] / lab["eval_samples_per_second"]
                                         if ok else None)
    best_torch: dict[tuple[str, int], float] = {}
    for r in results:
        if r["framework"] == "torch" and "error" not in r:
            best_torch[_key(r)] = max(best_torch.get(_key(r), 0.0), r["samples_per_second"])
    for row in results:
        best = best_torch.get(_key(row))
        row["ratio_vs_best_torch"] = (row["samples_per_second"] / best
                                      if best and "error" not in row and row["framework"] == "flaxcnn" else None)
    return attach_default_vs_forced(results)


def paired_ratio(default_seconds: Sequence[float] | Sequence[Sequence[float]],
                 other_seconds: Sequence[float] | Sequence[Sequence[float]], resamples: int = 4000,
                 seed: int = 0) -> dict[str, Any]:
    """How much faster the default row is than another row of the same interleaved run: the
    median of their per-round epoch-time ratios (other over default; above 1: the default is
    faster) with a percentile-bootstrap 95% interval.

    Why paired: the fastest epoch of each row (the table's samples/s) compares two minima of
    6-12 noisy epochs; on a 2-core VM it was 0.93 for two rows of one run running the same program.
    Epochs of one round run back to back, so a slow spell of the machine moves both and cancels
    in their ratio. The bootstrap is seeded: the same JSON renders the same interval.

    Rows measured in several processes (``--repeats``) come as one list of epoch times per
    process. Something fixed for a process's lifetime (where its buffers landed) moved one
    row's ratio by about 6% between processes on a 2-core VM, more than one process's interval
    showed; so the rounds of all processes are pooled for the median, and the bootstrap resamples
    processes, then rounds within each drawn process (a two-level, cluster bootstrap), so that
    the interval carries the spread between processes too."""
    default_groups, other_groups = _by_process(default_seconds), _by_process(other_seconds)
    if [len(g) for g in default_groups] != [len(g) for g in other_groups]:
        raise ValueError("paired_ratio needs the same epochs (per process) of both rows")
    ratios = [np.asarray(o, float) / np.asarray(d, float) for d, o in zip(default_groups, other_groups)]
    if not ratios or min(r.size for r in ratios) == 0:
        raise ValueError("paired_ratio needs at least one epoch of each row")
    rng = np.random.default_rng(seed)
    if len(ratios) == 1:
        medians = np.median(rng.choice(ratios[0], size=(resamples, ratios[0].size)), axis=1)
    else:
        medians = np.empty(resamples)
        for i in range(resamples):
            drawn = [ratios[j] for j in rng.integers(len(ratios), size=len(ratios))]
            medians[i] = np.median(np.concatenate([rng.choice(r, size=r.size) for r in drawn]))
    low, high = np.percentile(medians, [2.5, 97.5])
    pooled = np.concatenate(ratios)
    result = {"median": float(np.median(pooled)), "interval_95": [float(low), float(high)],
              "epochs": int(pooled.size)}
    if len(ratios) > 1:
        result["processes"] = len(ratios)
        result["median_by_process"] = [float(np.median(r)) for r in ratios]
    return result


def _by_process(seconds: Sequence[float] | Sequence[Sequence[float]]) -> list[list[float]]:
    """Epoch times as one list per process (a flat list is one process)."""
    seconds = list(seconds)
    if seconds and isinstance(seconds[0], (list, tuple)):
        return [list(group) for group in seconds]
    return [seconds]


def attach_default_vs_forced(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """On every flaxcnn default row with other-policy rows (``step-xla``/``step-tuned``) beside it:
    ``vs_faster_forced``, the paired ratio (:func:`paired_ratio`) against the forced row it does
    worst against, with the fastest-epoch ratio beside it."""
    rows = [r for r in results if "error" not in r]
    for row in rows:
        if not row.get("default_path"):
            continue
        forced = [r for r in rows if _key(r) == _key(row) and r["path"] in FORCED_PATHS]
        epochs = _epochs_by_process(row)
        pairs = {r["path"]: (paired_ratio(epochs, _epochs_by_process(r)), r) for r in forced
                 if list(map(len, _epochs_by_process(r))) == list(map(len, epochs))}
        if not pairs:
            continue
        against = min(pairs, key=lambda p: pairs[p][0]["median"])
        paired, other = pairs[against]
        row["vs_faster_forced"] = {"against": against, "paired": paired, "method": PAIRED_METHOD,
                                   "fastest_epoch_ratio": row["samples_per_second"] / other["samples_per_second"]}
    return results


def _epochs_by_process(row: dict[str, Any]) -> list[list[float]]:
    return row.get("epoch_seconds_by_process") or [row["epoch_seconds"]]


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Per batch size: flaxcnn's default path against the best PyTorch path (each model and the
    geometric mean), and against the forced implementation choices where they were run."""
    rows = [r for r in report["results"] if "error" not in r]
    lines = []
    for batch in sorted({r["batch_size"] for r in rows}):
        at = [r for r in rows if r["batch_size"] == batch]
        default = {r["model"]: r for r in at if r.get("default_path") and r.get("ratio_vs_best_torch")}
        if not default:
            continue
        ratios = [r["ratio_vs_best_torch"] for r in default.values()]
        geo = math.exp(sum(math.log(v) for v in ratios) / len(ratios))
        parts = []
        for model, row in default.items():
            text = f"{model} {row['ratio_vs_best_torch']:.2f}x"
            versus = row.get("vs_faster_forced")
            if versus:
                low, high = versus["paired"]["interval_95"]
                per_process = versus["paired"].get("median_by_process")
                over = (f" over {len(per_process)} processes ({'/'.join(f'{m:.2f}' for m in per_process)})"
                        if per_process else "")
                text += (f" ({versus['paired']['median']:.2f}x {versus['against']} paired{over}, 95% "
                         f"{low:.2f}-{high:.2f}; fastest epochs {versus['fastest_epoch_ratio']:.2f}x)")
            parts.append(text)
        lines.append(f"- batch {batch}: flaxcnn default ({next(iter(default.values()))['path']}) vs the best "
                     f"PyTorch path: {'; '.join(parts)}; geometric mean {geo:.2f}x")
        if any(r.get("vs_faster_forced") for r in default.values()):
            lines.append("  (in brackets: the default against the other conv policy it does worst against, "
                         "--conv-impl kernels or xla; paired = " + PAIRED_METHOD + "; \"the same program\": "
                         "the default's whole-step choice was that forced setting, so the ratio is the run's "
                         "resolution)")
    return lines


def sorted_rows(results: list[dict[str, Any]], models: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows grouped by model (in ``models`` order), then batch size, then path."""
    model_rank = {m: i for i, m in enumerate(models or [])}

    def rank(row):
        path = PATH_ORDER.index(row["path"]) if row["path"] in PATH_ORDER else len(PATH_ORDER)
        return model_rank.get(row["model"], len(model_rank)), row["model"], row["batch_size"], path

    return sorted(results, key=rank)


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _path_label(row: dict[str, Any]) -> str:
    return row["path"] + (" (default)" if row.get("default_path") else "")


def threads_note(machine: dict[str, Any]) -> str:
    threads = machine.get("torch_num_threads")
    forced = machine.get("torch_threads_set_by_option")
    noun = "thread" if threads == 1 else "threads"
    memory = machine.get("torch_freed_memory")
    allocator = "" if memory is None else (
        "; glibc's allocator as installed" if not memory.startswith("kept")
        else "; freed memory kept in the heap, as flaxcnn does (--torch-keep-freed-memory)")
    return f"{threads} {noun}" + (" set by --torch-threads" if forced else ", torch's default") + allocator


def markdown(report: dict[str, Any]) -> str:
    """The table, preceded by the facts a reader needs to trust or doubt it."""
    m, s = report["machine"], report["settings"]
    lines = [
        "# Training throughput: flaxcnn vs the labs' PyTorch loops",
        "",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} cores; load average before {m.get('loadavg_before')}, "
        + (f"after {m.get('loadavg_after')}" if report.get("complete", True)
           else f"at the last finished process {m.get('loadavg_latest')} (run incomplete)"),
        f"- torch {m.get('torch')} ({threads_note(m)}); jax {m.get('jax')} "
        f"(backend {m.get('jax_backend')}, XLA_FLAGS {m.get('XLA_FLAGS')!r}; freed memory "
        f"{m.get('freed_memory', 'unrecorded')}: see flaxcnn/cpu_memory.py); "
        f"device {s['device']}",
        f"- CPU vector ISA: {', '.join(m.get('cpu_vector_flags') or []) or 'unknown'}; flaxcnn kernel variant "
        f"{(m.get('flaxcnn_conv_policy') or {}).get('kernel_isa', 'unknown')}"
        + (f" (forced by FLAXCNN_KERNEL_ISA={m['kernel_isa_env']})" if m.get('kernel_isa_env') else "")
        + "; each flaxcnn row's conv policy and what it runs per layer are in the JSON (`conv_policy`)",
        f"- {s['samples']} samples per epoch ({s['data']}); train samples/s: "
        f"{s.get('throughput_method', 'the median')} of {s['epochs']} epochs after 1 warm-up epoch"
        + (f" ({s['timing_order']})" if s.get("timing_order") else "") + "; "
        f"warm-up = {s['warmup_method']}; eval: forward only, eval mode, "
        f"batches of {s['eval_batch']}; peak RSS: ru_maxrss of the framework's process "
        f"({s['process_per']} per process) when the row finished"
        + (" (with the rows timed beside it)" if s.get("timing_order") else "")
        + (f"; each flaxcnn process ran {s['repeats']} times: its rows' figures are medians over the processes "
           "(benchmarks/repeats.py)" if s.get("repeats", 1) > 1 else ""),
        "",
        *summary_lines(report),
        "",
        "| model | batch | framework | path | train samples/s | vs lab loop | vs best PyTorch | warm-up s "
        "| eval samples/s | eval vs lab | peak RSS MB |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted_rows(report["results"], s.get("models")):
        head = f"| {row['model']} | {row['batch_size']} | {row['framework']} | {_path_label(row)} |"
        if "error" in row:
            lines.append(f"{head} failed: {row['error']} | | | | | | {_fmt(row.get('peak_rss_mb'), ',.0f')} |")
            continue
        lines.append(
            f"{head} {row['samples_per_second']:,.0f} | {_fmt(row['ratio_vs_lab_loop'], '.2f')}x | "
            f"{_fmt(row.get('ratio_vs_best_torch'), '.2f')}{'x' if row.get('ratio_vs_best_torch') else ''} | "
            f"{row['warmup_seconds']:.2f} | {row['eval_samples_per_second']:,.0f} | "
            f"{_fmt(row['eval_ratio_vs_lab_loop'], '.2f')}x | {row['peak_rss_mb']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def bar_chart(report: dict[str, Any], path: str | Path) -> None:
    """Grouped bars: training samples/s of each path over the lab loop's, per model and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r.get("ratio_vs_lab_loop") is not None and r["path"] != "lab-loop"]
    groups = sorted({_key(r) for r in rows}, key=lambda k: (report["settings"]["models"].index(k[0])
                                                            if k[0] in report["settings"]["models"] else 99, k))
    paths = [p for p in PATH_ORDER if any(r["path"] == p for r in rows)]
    width = 0.8 / max(len(paths), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.5))
    for i, p in enumerate(paths):
        xs, ys = [], []
        for g, key in enumerate(groups):
            match = [r for r in rows if _key(r) == key and r["path"] == p]
            if match:
                xs.append(g + (i - (len(paths) - 1) / 2) * width)
                ys.append(match[0]["ratio_vs_lab_loop"])
        default = any(r["path"] == p and r.get("default_path") for r in rows)
        bars = ax.bar(xs, ys, width, label=p + (" (flaxcnn default)" if default else ""))
        ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=6, padding=1)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="lab loop (PyTorch DataLoader)")
    ax.set_xticks(range(len(groups)), [f"{m}\nbatch {b}" for m, b in groups], fontsize=8)
    ax.set_ylabel("training samples/s ÷ the lab loop's")
    ax.set_ylim(0, max([r["ratio_vs_lab_loop"] for r in rows] + [1.0]) * 1.15)
    ax.set_title(f"Training throughput vs the lab loop ({report['settings']['device']}, "
                 f"{report['machine']['cpu_count']} cores)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
