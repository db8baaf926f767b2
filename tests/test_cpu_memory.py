"""Freed memory stays in the heap: a jitted call's buffers are not page-faulted anew on every call."""

import json
import os
import subprocess
import sys

import pytest

from flaxcnn import cpu_memory

PROBE = r"""
import json, resource
from flaxcnn import cpu_memory
state = cpu_memory.keep_freed_memory()  # what a training entry point does first
import jax, jax.numpy as jnp
double = jax.jit(lambda x: x * 2.0)
x = jnp.ones((10_000_000,), jnp.float32)  # 40 MB in, 40 MB out per call
for _ in range(15):  # the heap grows for the first few calls (buffers are freed asynchronously)
    double(x).block_until_ready()
# the fewest faults per call over several windows: on a loaded machine the asynchronous frees can
# lag and the heap grow for a while longer, which is not what this measures
windows = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        double(x).block_until_ready()
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
print(json.dumps({"state": state, "faults_per_call": min(windows), "windows": windows}))
"""


def run_probe(setting: str) -> dict:
    env = {**os.environ, cpu_memory.ENV: setting}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is glibc's (Linux)")
def test_kept_memory_is_not_faulted_again_and_the_setting_turns_it_off():
    kept, off = run_probe("1"), run_probe("0")
    if kept["state"].startswith("unavailable"):
        pytest.skip(f"this C library has no glibc mallopt: {kept['state']}")
    assert kept["state"] == "kept" and off["state"] == f"off ({cpu_memory.ENV}=0)"
    # a 40 MB buffer is 9,766 pages of 4 KiB: without the setting each call faults them all in
    assert off["faults_per_call"] > 5_000, off
    assert kept["faults_per_call"] < 1_000, kept


def test_importing_flaxcnn_changes_nothing():
    code = ("import ctypes, flaxcnn, flaxcnn.models.registry, flaxcnn.train.loop\n"
            "print(flaxcnn.__doc__ is not None)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = run_probe_without_setting()
    assert out["faults_per_call"] > 5_000, out  # nothing kept freed memory: the import applied nothing


def run_probe_without_setting() -> dict:
    probe = PROBE.replace("state = cpu_memory.keep_freed_memory()", "import flaxcnn.train.loop; state = 'not applied'")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_invalid_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(cpu_memory.ENV, "sometimes")
    with pytest.raises(ValueError, match="FLAXCNN_KEEP_FREED_MEMORY must be 1 or 0, got 'sometimes'"):
        cpu_memory._apply()
