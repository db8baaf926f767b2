"""The markdown report of :mod:`benchmarks.gpu_check`: one section per part, written from the JSON
report alone (so it can be redrawn), each saying what ran, on what, and what failed."""

from __future__ import annotations

from typing import Any

#: every section the report has, in order (a test checks that each is written)
SECTIONS = ("Parts", "Machine", "Parity", "Training throughput", "Lab 8 Net, 100 epochs", "Sweep: vmap vs sequential",
            "torch.compile")
THROUGHPUT_PATHS = (("torch", "lab-loop"), ("torch", "torch-sliced"), ("torch", "torch-compile"),
                    ("flaxcnn", "step"), ("flaxcnn", "scan"))


def _fmt(value: Any, spec: str = ",.0f") -> str:
    return "—" if value is None else format(value, spec)


def _part_note(entry: dict[str, Any] | None) -> str | None:
    """None when the part ran fine, else one line saying what happened."""
    if entry is None:
        return "not run (not among --parts, or the command was stopped before it)"
    if entry["status"] == "ok":
        return None
    note = f"**{entry['status']}**: {entry.get('error') or ''}".rstrip(": ")
    if entry.get("log"):
        note += f" (log: `{entry['log']}`)"
    return note


def parts_section(report: dict[str, Any]) -> list[str]:
    lines = ["## Parts", "", "| part | status | seconds | time box s | note |", "|---|---|---:|---:|---|"]
    for name, entry in report["parts"].items():
        note = (entry.get("error") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {entry['status']} | {_fmt(entry.get('seconds'), '.1f')} | "
                     f"{_fmt(entry.get('time_box_s'), '.0f')} | {note} |")
    return lines + [""]


def machine_section(entry: dict[str, Any] | None) -> list[str]:
    lines = ["## Machine", ""]
    result = (entry or {}).get("result") or {}
    smi = result.get("nvidia_smi") or {}
    if smi.get("gpus"):
        for gpu in smi["gpus"]:
            lines.append("- GPU: " + ", ".join(f"{k} {v}" for k, v in gpu.items()))
        lines.append(f"- driver's CUDA version: {smi.get('driver_cuda_version')}")
    else:
        lines.append(f"- nvidia-smi: {smi.get('error') or smi.get('query_error') or 'no facts'}")
    versions = result.get("versions")
    if versions:
        host = versions.get("host", {})
        lines.append(f"- host: {host.get('cpu_model')}, {host.get('cpu_count')} cores, "
                     f"{_fmt(host.get('memory_total_mb'), ',.0f')} MB; Python {versions.get('python')}; "
                     f"commit {host.get('git_commit')}")
        lines.append(f"- JAX backend {versions.get('jax_backend')}, devices {versions.get('jax_devices')}, "
                     f"matmul precision {versions.get('jax_default_matmul_precision')}"
                     + (f"; JAX error: {versions['jax_error']}" if versions.get("jax_error") else ""))
        lines.append(f"- PyTorch CUDA build {versions.get('torch_cuda_build')}, CUDA available "
                     f"{versions.get('torch_cuda_available')}, device {versions.get('torch_device')}, "
                     f"cuDNN {versions.get('cudnn')}")
        lines.append("- packages: " + ", ".join(f"{k} {v}" for k, v in versions.get("packages", {}).items()))
    note = _part_note(entry)
    return lines + ([f"- {note}"] if note else []) + [""]


def parity_section(entry: dict[str, Any] | None) -> list[str]:
    lines = ["## Parity", "",
             "The parity suite (`python -m parity`'s checks): flaxcnn on JAX's default device, the PyTorch "
             "reference on the CPU; float32, `jax_default_matmul_precision=highest`, TF32 off. Tolerances: "
             "forward 1e-6, gradients 1e-5.", ""]
    result = (entry or {}).get("result")
    if result:
        lines += [f"Batch {result.get('batch')}, seed {result.get('seed')}"
                  + ("." if result.get("complete") else "; incomplete: the models below were checked before "
                     "the part stopped."), ""]
        lines += ["| model | fwd max\\|Δ\\| | train max\\|Δ\\| | grad max\\|Δ\\| | shapes ok | round trip ok | passed |",
                  "|---|---:|---:|---:|---|---|---|"]
        for r in result["models"]:
            lines.append(f"| {r['name']} | {r['forward_max_abs_diff']:.2e} | {r['train_forward_max_abs_diff']:.2e} | "
                         f"{r['grad_max_abs_diff']:.2e} | {'yes' if r['shapes_match'] else 'NO'} | "
                         f"{'yes' if r['roundtrip_exact'] else 'NO'} | {'PASS' if r['passed'] else 'FAIL'} |")
        lines.append("")
        lines.append(f"All passed: {'yes' if result.get('passed') else 'NO'}.")
    note = _part_note(entry)
    return lines + ([note] if note else []) + [""]


def _throughput_rows(*results: dict[str, Any] | None) -> dict[tuple[str, int], dict[tuple[str, str], Any]]:
    """(model, batch) -> (framework, path) -> samples/s, or the error; the first result wins."""
    table: dict[tuple[str, int], dict[tuple[str, str], Any]] = {}
    for result in results:
        for row in (result or {}).get("results", []):
            cell = table.setdefault((row["model"], row["batch_size"]), {})
            cell.setdefault((row["framework"], row["path"]), row.get("error") or row["samples_per_second"])
    return table


def throughput_section(entry: dict[str, Any] | None, compiled: dict[str, Any] | None) -> list[str]:
    lines = ["## Training throughput", ""]
    first = (entry or {}).get("result")
    second = (compiled or {}).get("result")
    settings = (first or second or {}).get("settings", {})
    if first or second:
        lines += [f"Training samples/s, median of {settings.get('epochs')} epochs of {settings.get('samples')} "
                  f"samples after one warm-up epoch ({settings.get('data')}); device {settings.get('device')}. "
                  "Full tables: `throughput/train_throughput.md`, `torch_compile/train_throughput.md`.", "",
                  "| model | batch | lab loop | torch sliced | torch.compile | flaxcnn step | flaxcnn scan "
                  "| best flaxcnn ÷ best PyTorch |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for (model, batch), cells in _throughput_rows(first, second).items():
            values = [cells.get(key) for key in THROUGHPUT_PATHS]
            shown = ["failed" if isinstance(v, str) else _fmt(v) for v in values]
            torch_best = max((v for v in values[:3] if isinstance(v, float)), default=None)
            flax_best = max((v for v in values[3:] if isinstance(v, float)), default=None)
            ratio = flax_best / torch_best if torch_best and flax_best else None
            lines.append(f"| {model} | {batch} | " + " | ".join(shown) + f" | {_fmt(ratio, '.2f')}x |")
        lines.append("")
    for name, part in (("throughput", entry), ("torch_compile", compiled)):
        note = _part_note(part)
        if note:
            lines.append(f"- {name}: {note}")
    return lines + [""]


def net100_section(entry: dict[str, Any] | None) -> list[str]:
    lines = ["## Lab 8 Net, 100 epochs", ""]
    result = (entry or {}).get("result")
    if result and result.get("summary"):
        s, ref = result["summary"], result.get("cpu_reference")
        lines += ["| run | epochs | path | train acc | test acc | training s | samples/s | whole command s |",
                  "|---|---:|---|---:|---:|---:|---:|---:|",
                  f"| this machine ({s.get('backend')}) | {s['epochs']} | {s.get('path')} | {s['train_accuracy']:.4f} | "
                  f"{s['test_accuracy']:.4f} | {s['seconds']:.1f} | {_fmt(s.get('samples_per_second'))} | "
                  f"{_fmt(entry.get('seconds'), '.1f')} |"]
        if ref:
            lines.append(f"| committed reference ({ref.get('backend')}, benchmarks/results/net100) | {ref['epochs']} | "
                         f"{ref.get('path')} | {ref['train_accuracy']:.4f} | {ref['test_accuracy']:.4f} | "
                         f"{ref['seconds']:.1f} | {_fmt(ref.get('samples_per_second'))} | — |")
        lines += ["", f"Data: {s.get('data_source')}."]
    note = _part_note(entry)
    return lines + ([note] if note else []) + [""]


def sweep_section(entry: dict[str, Any] | None) -> list[str]:
    lines = ["## Sweep: vmap vs sequential", ""]
    result = (entry or {}).get("result")
    if result:
        from benchmarks.scaling import table

        body = table(result).splitlines()
        lines += [line for line in body if not line.startswith("# ")]  # the part's own title repeats this one
        for row in result.get("sweep", []):
            lines.append(f"- {row['strategy']}: test accuracy of the {row['runs_written']} runs "
                         + ", ".join(f"{a:.4f}" for a in row.get("test_accuracy", [])))
    note = _part_note(entry)
    return lines + ([note] if note else []) + [""]


def compile_section(entry: dict[str, Any] | None, dry_run: bool) -> list[str]:
    lines = ["## torch.compile", ""]
    if dry_run:
        lines.append("Dry run: torch.compile is not run (its CPU compiles take minutes).")
    result = (entry or {}).get("result")
    if result:
        done = sorted({r["model"] for r in result.get("results", []) if r["path"] == "torch-compile"
                       and "error" not in r})
        lines.append(f"Models with torch.compile rows: {', '.join(done) or 'none'} (in the throughput table above; "
                     f"run {'complete' if result.get('complete') else 'incomplete: cut at its time box'}).")
    note = _part_note(entry)
    return lines + ([note] if note else []) + [""]


def markdown(report: dict[str, Any]) -> str:
    """The whole report."""
    parts = report["parts"]
    head = [
        "# flaxcnn on a GPU: `python -m benchmarks.gpu_check`" + (" (dry run, CPU)" if report["dry_run"] else ""),
        "",
        f"- started {report['started']}; budget {report['budget_s']:.0f} s; wall {_fmt(report.get('wall_s'), '.0f')} s"
        + ("" if report.get("complete") else " (report written while parts were still to run)"),
        f"- environment of every part: {', '.join(f'{k}={v}' for k, v in report['env'].items())}",
        f"- data: {report.get('cifar2') or 'no CIFAR-2 folder'}; models: {', '.join(report['models'])}",
        "",
    ]
    body = (parts_section(report) + machine_section(parts.get("machine")) + parity_section(parts.get("parity"))
            + throughput_section(parts.get("throughput"), parts.get("torch_compile"))
            + net100_section(parts.get("net100")) + sweep_section(parts.get("sweep"))
            + compile_section(parts.get("torch_compile"), report["dry_run"]))
    return "\n".join(head + body)
