"""benchmarks.port_throughput: one tiny run end to end, and its settings and statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import port_throughput as bench
from flaxcnn.errors import ConfigError

ROW_KEYS = {"model", "size", "framework", "path", "batch_size", "params", "loss", "samples_per_second",
            "samples_per_second_interval_95", "samples_per_second_fastest", "warmup_seconds", "repeat_seconds",
            "train_finite"}


def test_tiny_run_writes_rows_for_the_ported_and_torch_paths(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench.main(["--models", "squeezenet1_1", "--size", "small", "--batch", "4", "--steps", "2",
                       "--repeats", "2", "--paths", "flaxcnn", "torch-eager", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 0, [r.get("error") for r in report["results"]]
    assert {"machine", "versions", "settings", "results"} <= set(report)
    assert report["machine"]["cpu_model"] and "cpu_vector_flags" in report["machine"]
    rows = {r["path"]: r for r in report["results"]}
    assert set(rows) == {"flaxcnn", "torch-eager"}
    for row in rows.values():
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["model"] == "squeezenet1_1" and row["batch_size"] == 4 and len(row["repeat_seconds"]) == 2
        low, high = row["samples_per_second_interval_95"]
        assert 0 < low <= row["samples_per_second"] <= high and row["train_finite"]
    assert rows["flaxcnn"]["params"] == rows["torch-eager"]["params"] > 0
    vs = rows["flaxcnn"]["vs"]["torch-eager"]
    assert vs["median"] > 0 and len(vs["interval_95"]) == 2
    table = capsys.readouterr().out
    assert "| squeezenet1_1 |" in table and report["machine"]["cpu_model"] in table
    assert out.with_suffix(".md").read_text() == table.rstrip("\n") + "\n"


def test_settings_refuse_unknown_models_and_paths():
    with pytest.raises(ConfigError, match="unknown --models nope; accepted: .*resnet18"):
        bench.settings_from(bench.parse_args(["--models", "nope"]))
    with pytest.raises(ConfigError, match="--paths takes some of flaxcnn, torch-eager, torch-compile"):
        bench.settings_from(bench.parse_args(["--paths", "jax"]))
    with pytest.raises(ConfigError, match="--steps must be >= 1"):
        bench.settings_from(bench.parse_args(["--steps", "0"]))


def test_median_interval_brackets_the_median():
    median, (low, high) = bench.median_interval([1.0, 2.0, 4.0], samples=8)
    assert median == pytest.approx(4.0)  # 8 samples / the median 2 s
    assert 2.0 <= low <= median <= high <= 8.0


def test_cpu_slug_names_the_cpu_in_a_file_name():
    assert bench.cpu_slug("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz") == "intel-xeon-platinum-8481c"
    assert bench.cpu_slug("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13-64-core-processor"


def test_per_pixel_data_has_one_label_per_pixel():
    data = bench.synthetic_data(True, 3, (3, 8, 8), samples=5, seed=0)
    assert data.x.shape == (5, 3, 8, 8) and data.y.shape == (5, 8, 8)
    assert set(np.unique(data.y)) <= {0, 1, 2}
