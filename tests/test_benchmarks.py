"""The benchmark runners work end to end on tiny inputs and write what they promise.

No timing is asserted: numbers depend on the machine and its load. What can fail is checked:
the JSON layout, ratios to the lab loop, the markdown and PNG, that both frameworks start
from the same weights (their losses on the same batches agree), errors for bad options.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from benchmarks import time_to_accuracy, train_throughput
from benchmarks.report import attach_ratios, markdown

ROW_KEYS = {"framework", "path", "model", "batch_size", "samples_per_second", "warmup_seconds", "peak_rss_mb",
            "ratio_vs_lab_loop", "eval_samples_per_second", "default_path"}
MACHINE_KEYS = {"cpu_model", "cpu_count", "torch", "torch_num_threads", "jax", "jax_backend", "XLA_FLAGS",
                "loadavg_before", "loadavg_after", "cpu_vector_flags", "kernel_isas_runnable", "flaxcnn_conv_policy", "freed_memory"}
FLAX_PATHS = ("step", "scan", "step-xla")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("throughput")
    code = train_throughput.main(["--models", "net", "--batch-sizes", "64", "--samples", "256", "--epochs", "2",
                                  "--out-dir", str(out)])
    assert code == 0
    return json.loads((out / "train_throughput.json").read_text()), out


def test_json_has_the_required_layout(tiny_run):
    report, _ = tiny_run
    assert MACHINE_KEYS <= set(report["machine"])
    assert report["complete"] is True
    rows = {(r["framework"], r["path"]): r for r in report["results"]}
    # "step" brings the XLA-only row ("step-xla") with it
    assert set(rows) == {("torch", "lab-loop"), ("torch", "torch-sliced"), *(("flaxcnn", p) for p in FLAX_PATHS)}
    for row in rows.values():
        assert "error" not in row, row.get("error")
        assert ROW_KEYS <= set(row)
        assert (row["model"], row["batch_size"], row["samples"]) == ("net", 64, 256)
        for key in ("samples_per_second", "eval_samples_per_second", "peak_rss_mb"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
        assert len(row["epoch_seconds"]) == 2
        assert row["ratio_vs_lab_loop"] == pytest.approx(row["samples_per_second"]
                                                         / rows["torch", "lab-loop"]["samples_per_second"])
        if row["framework"] == "flaxcnn":  # the conv policy and what it runs per layer
            best_torch = max(rows[k]["samples_per_second"] for k in rows if k[0] == "torch")
            assert row["ratio_vs_best_torch"] == pytest.approx(row["samples_per_second"] / best_torch)
            assert row["conv_policy"]["source"] == {"step-xla": "xla"}.get(row["path"], "default")
            assert row["conv_policy"]["layers"], row["conv_policy"]
            impls = {impl for layer in row["conv_policy"]["layers"] for part, impl in layer.items() if part != "layer"}
            if row["path"] == "step-xla":
                assert "cpp" not in impls, row["conv_policy"]
    assert rows["torch", "lab-loop"]["ratio_vs_lab_loop"] == 1.0
    defaults = [path for (fw, path), r in rows.items() if r["default_path"]]
    assert defaults == [report["machine"]["flaxcnn_default_path"]]


def test_same_init_and_batches_give_the_same_losses(tiny_run):
    """torch-sliced and flaxcnn read the same permutation from the same init: the summed batch
    losses of every epoch must agree, or the comparison is not like for like."""
    rows = {(r["framework"], r["path"]): r for r in tiny_run[0]["results"]}
    reference = rows["torch", "torch-sliced"]["train_loss_sum_per_epoch"]
    for path in FLAX_PATHS:
        np.testing.assert_allclose(rows["flaxcnn", path]["train_loss_sum_per_epoch"], reference, rtol=1e-4)
    assert rows["flaxcnn", "step"]["init"] == "the PyTorch process's init"


def test_markdown_and_png_are_written(tiny_run):
    report, out = tiny_run
    table = (out / "train_throughput.md").read_text()
    assert table == markdown(report)
    assert sum(line.startswith("| net | 64 |") for line in table.splitlines()) == 5
    assert "step (default)" in table or "scan (default)" in table
    assert "vs the best PyTorch path: net " in table and "geometric mean" in table
    assert report["machine"]["cpu_model"] in table
    assert (out / "train_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_redraws_from_json(tiny_run, tmp_path):
    _, out = tiny_run
    code = train_throughput.main(["--render", str(out / "train_throughput.json"), "--out-dir", str(tmp_path)])
    assert code == 0
    assert (tmp_path / "train_throughput.md").read_text() == (out / "train_throughput.md").read_text()


def _row(framework, path, sps, model="net", batch=64, **extra):
    return {"framework": framework, "path": path, "model": model, "batch_size": batch, "samples_per_second": sps,
            "eval_samples_per_second": 2 * sps, "warmup_seconds": 0.5, "peak_rss_mb": 100.0, **extra}


def test_ratios_use_the_lab_loop_of_the_same_model_and_batch():
    rows = attach_ratios([
        _row("torch", "lab-loop", 100.0), _row("flaxcnn", "step", 150.0), _row("torch", "lab-loop", 50.0, batch=256),
        _row("flaxcnn", "step", 200.0, batch=256), _row("flaxcnn", "scan", 10.0, model="convnet"),
        {**_row("torch", "torch-compile", 0.0), "error": "RuntimeError: no compiler"},
    ])
    assert [r["ratio_vs_lab_loop"] for r in rows] == [1.0, 1.5, 1.0, 4.0, None, None]
    assert rows[1]["eval_ratio_vs_lab_loop"] == 1.5
    table = markdown({"machine": {"cpu_model": "x", "cpu_count": 2}, "results": rows, "settings": {
        "device": "cpu", "samples": 1, "data": "d", "epochs": 3, "warmup_method": "w", "eval_batch": 1000,
        "process_per": "model", "models": ["net", "convnet"]}})
    assert "failed: RuntimeError: no compiler" in table
    assert "| convnet | 64 | flaxcnn | scan | 10 | —x | — |" in table


@pytest.mark.parametrize("argv, fragment", [
    (["--models", "no-such-net"], "choose one of"),
    (["--batch-sizes", "sixty"], "--batch-sizes takes integers"),
    (["--paths", "warp"], "accepted: torch-sliced, step, scan, step-xla, step-tuned"),
    (["--epochs", "0"], "--epochs and --samples must be >= 1"),
])
def test_bad_options_are_reported(argv, fragment, capsys, tmp_path):
    assert train_throughput.main([*argv, "--out-dir", str(tmp_path)]) == 2
    assert fragment in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("per, expected", [
    ("framework", [("torch", ["lab-loop", "lab-loop"]), ("flaxcnn", ["step", "step-xla", "step", "step-xla"])]),
    ("model", [("torch", ["lab-loop"]), ("flaxcnn", ["step", "step-xla"])] * 2),
])
def test_each_framework_runs_in_its_own_processes_torch_first(per, expected):
    settings = train_throughput.settings_from(train_throughput.parse_args(
        ["--models", "net", "convnet", "--batch-sizes", "64", "--paths", "step", "--process-per", per]))
    jobs = train_throughput.plan_jobs(settings, "/tmp/init")
    assert [(j["framework"], [r["path"] for r in j["rows"]]) for j in jobs] == expected


def _write_cifar(folder: Path, rng: np.random.Generator) -> None:
    """A tiny ``cifar-10-batches-py`` with classes 0 and 2 only."""
    folder.mkdir()
    for name, n in [(f"data_batch_{i}", 40) for i in range(1, 6)] + [("test_batch", 30)]:
        labels = [int(v) for v in rng.permutation(np.arange(n) % 2 * 2)]
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels, b"batch_label": name.encode(),
                                                  b"filenames": [b"f.png"] * n}))


def test_time_to_accuracy_race_stops_at_the_target(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    settings = time_to_accuracy.settings_from(time_to_accuracy.parse_args(
        ["--data-dir", str(tmp_path), "--target", "0.01", "--max-epochs", "3", "--batch-size", "50"]))
    init_dir = tmp_path / "init"
    init_dir.mkdir()
    results = [time_to_accuracy.race({**settings, "framework": fw, "path": path, "init_dir": str(init_dir)})["result"]
               for fw, path in (("torch", "lab-loop"), ("flaxcnn", "step"))]
    for result in results:
        assert result["reached"] and result["epochs_to_target"] == 1 and result["epochs_run"] == 1
        assert result["seconds_to_target"] >= result["train_seconds_to_target"] > 0
        assert (result["train_samples"], result["test_samples"]) == (200, 30)
    assert results[1]["init"] == "the PyTorch process's init"
    report = {"machine": {"cpu_model": "x", "cpu_count": 2}, "settings": settings, "results": results}
    assert time_to_accuracy.markdown(report).count("| 1 |") == 2


def test_time_to_accuracy_checks_its_options(tmp_path, capsys):
    assert time_to_accuracy.main(["--data-dir", str(tmp_path / "absent"), "--json", str(tmp_path / "t.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert time_to_accuracy.main(["--data-dir", str(tmp_path), "--target", "1.5"]) == 2
    assert "--target is an accuracy" in capsys.readouterr().err


def test_rows_are_timed_interleaved_and_a_failing_row_keeps_the_others():
    from benchmarks.timing import time_training_interleaved

    calls = []

    class Fake:
        def __init__(self, name, fail_at=None):
            self.name, self.fail_at = name, fail_at

        def train_epoch(self, epoch):
            calls.append((self.name, epoch))
            if epoch == self.fail_at:
                raise RuntimeError("boom")
            return 1.0

    warmed = []
    out = time_training_interleaved({"a": Fake("a"), "b": Fake("b", fail_at=1), "c": Fake("c")}, 100, 2,
                                    after_warmup=warmed.append)
    # each timed round rotated by one place (round 2: b, c, a; b has failed)
    assert calls == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1), ("c", 2), ("a", 2)]
    assert warmed == ["a", "b", "c"]
    assert out["b"] == {"error": "RuntimeError: boom"}
    assert len(out["a"]["epoch_seconds"]) == 2 and out["c"]["samples_per_second"] > 0


def test_round_order_puts_every_row_in_every_place_equally_often():
    from benchmarks.timing import round_order

    names = ["a", "b", "c"]
    assert round_order(names, 0) == names
    rounds = [round_order(names, epoch) for epoch in range(1, 7)]
    for place in range(3):
        assert sorted(r[place] for r in rounds) == ["a", "a", "b", "b", "c", "c"]


def test_paired_ratio_cancels_a_slow_spell_that_fastest_epochs_do_not():
    from benchmarks.report import paired_ratio

    default = [1.0, 1.0, 1.3, 1.0, 1.2, 1.0]
    other = [1.1 * s for s in default]  # 10% slower in every round
    other[0] = 0.95  # one lucky epoch of the other row
    result = paired_ratio(default, other)
    assert abs(result["median"] - 1.1) < 1e-9 and result["epochs"] == 6
    low, high = result["interval_95"]
    assert low <= 1.1 <= high and low > 0.9
    assert paired_ratio(default, other) == result  # seeded: the same JSON renders the same interval
    assert min(default) / min(other) > 1.0  # the fastest-epoch ratio would call the other row faster


def test_summary_reports_the_default_against_the_forced_choice_it_does_worst_against():
    from benchmarks.report import attach_ratios, summary_lines

    def row(fw, path, seconds, default=False):
        return {"framework": fw, "path": path, "model": "net", "batch_size": 64, "default_path": default,
                "samples_per_second": 100 / min(seconds), "eval_samples_per_second": 1.0,
                "epoch_seconds": seconds}

    results = attach_ratios([
        row("torch", "lab-loop", [4.0] * 4), row("torch", "torch-sliced", [2.0] * 4),
        row("flaxcnn", "step", [1.0, 1.0, 1.1, 1.0], default=True),
        row("flaxcnn", "step-tuned", [0.9, 0.9, 1.0, 0.9]), row("flaxcnn", "step-xla", [2.0] * 4)])
    versus = results[2]["vs_faster_forced"]
    assert versus["against"] == "step-tuned" and abs(versus["paired"]["median"] - 0.9) < 1e-9
    text = "\n".join(summary_lines({"results": results}))
    assert "net 2.00x (0.90x step-tuned paired" in text and "geometric mean 2.00x" in text
    assert "fastest epochs 0.90x)" in text


def test_rows_from_repeated_processes_merge_and_their_interval_carries_the_spread():
    from benchmarks.repeats import merge_processes
    from benchmarks.report import attach_ratios, summary_lines

    def row(path, seconds, default=False):
        return {"framework": "flaxcnn", "path": path, "model": "net", "batch_size": 64, "default_path": default,
                "samples_per_second": 100 / min(seconds), "samples_per_second_median": 1.0,
                "eval_samples_per_second": 1.0, "epoch_seconds": seconds, "peak_rss_mb": 10.0,
                "throughput_method": "the fastest of the timed epochs"}

    # the default is 5% faster in process 1 and 5% slower in process 2; each process alone is tight
    runs = [[row("step", [1.0] * 6, True), row("step-tuned", [1.05] * 6)],
            [row("step", [1.0] * 6, True), row("step-tuned", [0.95] * 6)]]
    merged = merge_processes(runs)
    assert merged[0]["epoch_seconds_by_process"] == [[1.0] * 6] * 2 and merged[0]["processes"] == 2
    assert merged[1]["samples_per_second"] == pytest.approx((100 / 1.05 + 100 / 0.95) / 2)  # median of two
    results = attach_ratios([{"framework": "torch", "path": "lab-loop", "model": "net", "batch_size": 64,
                              "samples_per_second": 50.0, "eval_samples_per_second": 1.0,
                              "epoch_seconds": [2.0] * 12}] + merged)
    paired = results[1]["vs_faster_forced"]["paired"]
    assert paired["processes"] == 2 and paired["median_by_process"] == pytest.approx([1.05, 0.95])
    low, high = paired["interval_95"]
    assert low <= 0.96 and high >= 1.04  # one process's interval would be a point
    assert "paired over 2 processes (1.05/0.95)" in "\n".join(summary_lines({"results": results}))

    broken = [[row("step", [1.0] * 6, True)], [{**row("step", [1.0] * 6, True), "error": "boom"}]]
    assert merge_processes(broken)[0]["error"] == "boom"
    with pytest.raises(ValueError, match="different row counts"):
        merge_processes([[row("step", [1.0])], []])


def test_repeats_must_be_positive():
    with pytest.raises(Exception, match="--repeats must be >= 1"):
        train_throughput.settings_from(train_throughput.parse_args(["--repeats", "0"]))
