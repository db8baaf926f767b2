"""benchmarks/scaling.py: settings, ratios, table and chart, and one worker on tiny inputs."""

from __future__ import annotations

import pytest

from benchmarks import scaling
from flaxcnn.errors import ConfigError


def _report() -> dict:
    machine = {"cpu_model": "test cpu", "cpu_count": 2, "loadavg_before": [0.1], "loadavg_after": [0.2]}
    settings = scaling.settings_from(scaling.parse_args([]))
    return {
        "machine": machine, "settings": settings, "complete": True,
        "devices": [{"devices": 1, "runner": "EpochRunner", "samples_per_second": 1000.0},
                    {"devices": 2, "runner": "ShardedEpochRunner", "samples_per_second": 1500.0}],
        "models": [{"strategy": "sequential", "k": 1, "model_samples_per_second": 1000.0, "warmup_seconds": 1.0},
                   {"strategy": "vmap", "k": 4, "model_samples_per_second": 250.0, "warmup_seconds": 2.0}],
        "sweep": [{"strategy": "sequential", "k": 4, "epochs": 2, "wall_seconds": 50.0, "train_seconds": 40.0},
                  {"strategy": "vmap", "k": 4, "epochs": 2, "wall_seconds": 100.0, "train_seconds": 90.0}],
    }


def test_ratios_table_and_chart(tmp_path):
    report = _report()
    text = scaling.write_outputs(report, tmp_path)
    assert report["devices"][1]["speedup_vs_1_device"] == pytest.approx(1.5)
    assert report["models"][1]["ratio_vs_sequential"] == pytest.approx(0.25)
    assert report["sweep"][1]["speedup_vs_sequential"] == pytest.approx(0.5)
    assert "| 2 | ShardedEpochRunner | 1,500 | 1.50x |" in text
    assert "| vmap | 4 | 250 | 0.25x | 2.0 |" in text
    assert (tmp_path / "scaling.json").exists() and (tmp_path / "scaling.png").stat().st_size > 1000


def test_a_partial_report_still_renders(tmp_path):
    report = {**_report(), "models": [], "sweep": [], "complete": False}
    assert "vs 1 device" in scaling.write_outputs(report, tmp_path)


@pytest.mark.parametrize("argv, fragment", [
    (["--devices", "0"], "--devices"),
    (["--ks", "2", "-1"], "--ks"),
    (["--samples", "0"], "--samples"),
    (["--model", "resnet"], "unknown model"),
])
def test_bad_settings_are_refused(argv, fragment):
    with pytest.raises(ConfigError, match=fragment):
        scaling.settings_from(scaling.parse_args(argv))


def test_vmap_worker_counts_model_samples():
    job = {"model": "net", "platform": "cpu", "samples": 48, "batch_size": 16, "epochs": 1, "path": "step",
           "seed": 0, "data_dir": None, "strategy": "vmap", "k": 2}
    row = scaling.models_worker(job)["row"]
    assert row["k"] == 2 and row["train_finite"]
    assert row["model_samples_per_second"] == pytest.approx(2 * row["samples_per_second"])
    assert len(row["train_loss_sum_per_epoch"]) == 2  # warm-up + one timed epoch
