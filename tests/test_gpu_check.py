"""``python -m benchmarks.gpu_check``: the GPU measurement command, kept working on CPU.

The dry run executes every part on the CPU with tiny sizes and checks that the JSON and the
markdown report are written with every section; the rest checks the time boxes, the failure
handling and the data folder without running JAX.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import gpu_check, gpu_data
from benchmarks.gpu_report import SECTIONS, markdown
from benchmarks.timebox import run_command, time_box
from flaxcnn.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the dry run

@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    report = json.loads((out / "gpu_check.json").read_text())
    return report, (out / "gpu_check.md").read_text(), done


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_both_reports(dry_run):
    report, text, done = dry_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["complete"] and report["dry_run"] and report["device"] == "cpu"
    assert list(report["parts"]) == list(gpu_check.PART_NAMES)
    statuses = {name: entry["status"] for name, entry in report["parts"].items()}
    assert statuses == {**{name: "ok" for name in gpu_check.PART_NAMES}, "torch_compile": "skipped"}, (
        {name: entry.get("log_tail") or entry.get("error") for name, entry in report["parts"].items()})
    assert "--torch-compile" in report["parts"]["torch_compile"]["error"]
    for section in SECTIONS:
        assert f"\n## {section}\n" in text, f"section {section!r} missing from gpu_check.md"


@pytest.mark.slow
def test_dry_run_results_are_the_measurements(dry_run):
    report, text, _ = dry_run
    parts = report["parts"]
    assert parts["machine"]["result"]["versions"]["jax_backend"] == "cpu"
    parity = parts["parity"]["result"]
    assert [m["name"] for m in parity["models"]] == ["net"] and parity["complete"] and parity["passed"]
    paths = {(r["framework"], r["path"]) for r in parts["throughput"]["result"]["results"] if "error" not in r}
    # (on CPU, train_throughput adds its XLA-only row, step-xla, to step)
    assert {("torch", "lab-loop"), ("torch", "torch-sliced"), ("flaxcnn", "step"), ("flaxcnn", "scan")} <= paths
    summary = parts["net100"]["result"]["summary"]
    assert summary["epochs"] == 1 and 0.0 <= summary["test_accuracy"] <= 1.0
    strategies = [(r["strategy"], r["k"]) for r in parts["sweep"]["result"]["models"]]
    assert strategies == [("sequential", 1), ("vmap", 2)]
    assert "| net | 16 |" in text  # the throughput summary row


# ----------------------------------------------------------------------------- time boxes and failures

def test_a_part_gets_its_share_plus_what_earlier_parts_left():
    shares = [10.0, 20.0, 30.0]
    assert time_box(shares, 0, 60.0) == 10.0
    assert time_box(shares, 1, 55.0) == 25.0  # part 0 took 5 s of its 10
    assert time_box(shares, 2, 30.0) == 30.0


def test_a_failing_command_and_an_overrunning_one_are_recorded(tmp_path):
    failed = run_command([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], timeout=60,
                         log_path=tmp_path / "f.log")
    assert (failed.status, failed.returncode) == ("failed", 3)
    assert "boom" in (tmp_path / "f.log").read_text()
    start = time.perf_counter()
    # the sleeping grandchild is in the command's process group and must go with it
    slow = run_command(["sh", "-c", "sleep 60 & sleep 60"], timeout=1, log_path=tmp_path / "s.log")
    assert slow.status == "timed_out" and "time box" in slow.error
    assert time.perf_counter() - start < 30
    missing = run_command(["/nonexistent/program"], timeout=5, log_path=tmp_path / "m.log")
    assert missing.status == "failed" and "could not start" in missing.error


def test_the_parts_after_a_failure_still_run(tmp_path):
    ctx = gpu_check.Context(out=tmp_path, data=None, dry_run=True, models=["net"])
    py = sys.executable
    parts = (
        gpu_check.Part("crashes", 1, lambda c: [py, "-c", "raise SystemExit(1)"], lambda c: None),
        gpu_check.Part("skips", 1, lambda c: "nothing to do here", lambda c: None),
        gpu_check.Part("raises", 1, lambda c: 1 / 0, lambda c: None),
        gpu_check.Part("works", 1, lambda c: [py, "-c", "pass"], lambda c: {"value": 1}),
    )
    report = gpu_check.run_parts(ctx, parts, budget_s=120)
    statuses = {name: (entry["status"], entry.get("error")) for name, entry in report["parts"].items()}
    assert statuses["crashes"] == ("failed", "exit status 1; see crashes.log")
    assert statuses["skips"] == ("skipped", "nothing to do here")
    assert statuses["raises"][0] == "failed" and "ZeroDivisionError" in statuses["raises"][1]
    assert statuses["works"] == ("ok", None) and report["parts"]["works"]["result"] == {"value": 1}
    text = markdown(report)
    assert all(f"\n## {section}\n" in text for section in SECTIONS)
    assert "| crashes | failed |" in text and "| works | ok |" in text


def test_without_shares_every_part_may_use_all_the_time_left(tmp_path):
    ctx = gpu_check.Context(out=tmp_path, data=None, dry_run=True, models=["net"])
    parts = tuple(gpu_check.Part(name, share, lambda c: [sys.executable, "-c", "pass"], lambda c: None)
                  for name, share in (("a", 1), ("b", 100)))
    shared = gpu_check.run_parts(ctx, parts, budget_s=202)
    assert shared["parts"]["a"]["time_box_s"] == 2.0
    deadline = gpu_check.run_parts(ctx, parts, budget_s=202, shared=False)
    assert deadline["parts"]["a"]["time_box_s"] > 200 and deadline["parts"]["b"]["time_box_s"] > 190


def test_no_part_starts_without_time_left(tmp_path):
    ctx = gpu_check.Context(out=tmp_path, data=None, dry_run=True, models=["net"])
    part = gpu_check.Part("late", 1, lambda c: [sys.executable, "-c", "pass"], lambda c: None)
    entry = gpu_check.run_part(ctx, part, box=2)
    assert entry["status"] == "skipped" and "left" in entry["error"]


def test_gpu_parts_are_skipped_when_jax_sees_no_gpu(tmp_path):
    ctx = gpu_check.Context(out=tmp_path, data=None, dry_run=False, models=["net"], facts={"jax_backend": "cpu"})
    entry = gpu_check.run_part(ctx, gpu_check.PARTS[1], box=100)
    assert entry["status"] == "skipped" and "no GPU" in entry["error"]


@pytest.mark.parametrize("argv, fragment", [
    (["--dry-run"], "--out"),
    (["--out", "x", "--parts", "bogus"], "--parts"),
    (["--out", "x", "--models", "resnet"], "unknown model"),
    (["--out", "x", "--data", "/nonexistent/data"], "--data"),
    (["--out", "x", "--budget-s", "0"], "--budget-s"),
    (["--prepare-data", "x"], "--cifar-dir"),
])
def test_bad_options_are_refused(argv, fragment, capsys):
    assert gpu_check.main(argv) == 2
    assert fragment in capsys.readouterr().err


# ----------------------------------------------------------------------------- the data folder

def _write_cifar(folder: Path) -> None:
    """A tiny ``cifar-10-batches-py``: classes 0 and 2 (airplane, bird) and one other."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}", 12) for i in range(1, 6)] + [("test_batch", 9)]:
        labels = [int(v) for v in np.arange(n) % 3 * 2 % 6]  # 0, 2, 4
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels, b"batch_label": name.encode(),
                                                  b"filenames": [b"f.png"] * n}))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)],
                                                        b"num_vis": 3072}))


def test_prepare_data_copies_checks_and_lists_the_batches(tmp_path):
    _write_cifar(tmp_path / "src" / "cifar-10-batches-py")
    manifest = gpu_data.prepare(tmp_path / "gpu-data", tmp_path / "src")
    assert (manifest["cifar2"]["train_images"], manifest["cifar2"]["test_images"]) == (40, 6)  # 0s and 2s only
    assert set(manifest["files"]) == {f"cifar2/cifar-10-batches-py/{n}" for n in gpu_data.CIFAR_FILES}
    assert json.loads((tmp_path / "gpu-data" / gpu_data.MANIFEST).read_text()) == manifest
    assert gpu_data.cifar_data_dir(tmp_path / "gpu-data") == tmp_path / "gpu-data" / "cifar2"
    assert gpu_data.cifar_data_dir(tmp_path / "src") is None


def test_prepare_data_refuses_a_wrong_or_too_large_folder(tmp_path):
    with pytest.raises(ConfigError, match="no CIFAR-10 python batches"):
        gpu_data.prepare(tmp_path / "gpu-data", tmp_path)
    _write_cifar(tmp_path / "src")
    with pytest.raises(ConfigError, match="more than"):
        gpu_data.prepare(tmp_path / "gpu-data", tmp_path / "src", max_bytes=1000)
