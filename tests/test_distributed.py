"""Data parallelism: 4 (forced CPU) devices and 2 processes train like one device on the same batch.

``--xla_force_host_platform_device_count`` must be set before JAX starts, so the multi-device
checks run in a child process (this file's ``__main__``), which reports max differences as JSON.

What is compared after 20 steps (5 epochs of 4 batches of 32; for ``net`` 122 images, so each
epoch ends with a partial batch of 26 that does not split over 4 devices and runs replicated):

- ``net`` and ``net-dropout``: parameters after 20 steps, max|Δ| <= 1e-5. Dropout
  masks are drawn for the global batch shape from the same key; with JAX's partitionable
  threefry (the default) a sharded draw gives the same bits, so they are equal, not just alike.
- ``net-batchnorm``: every one of the 20 steps, started from the one-device state, gives the
  same parameters and BatchNorm statistics on 4 devices (max|Δ| <= 1e-6), and the running
  variance after the first step is the *global* batch's (not the mean of the 4 devices' own).
  The free-running trajectory is held to 1e-4: its compiled gradient jumps by ~6e-4 (6e-6
  after the lr) when a parameter moves by one rounding step, so one-device runs on the ``step``
  and ``scan`` paths already differ by 2e-5 on real images after 20 steps.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flaxcnn.cli import main
from flaxcnn.errors import ConfigError
from flaxcnn.train import distributed

REPO = Path(__file__).resolve().parents[1]
MODELS = ("net", "net-dropout", "net-batchnorm")
BATCH = 32
N_IMAGES = {"net": 122, "net-dropout": 128, "net-batchnorm": 128}  # net: 3 full batches + 26 per epoch


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- child process

def _max_diff(a, b) -> float:
    import jax

    leaves = [(np.asarray(u, np.float64), np.asarray(v, np.float64)) for u, v in zip(jax.tree.leaves(a),
                                                                                     jax.tree.leaves(b))]
    return max((float(np.max(np.abs(u - v))) for u, v in leaves), default=0.0)


def _float_state(state):
    """Parameters and BatchNorm statistics (RNG keys left out) as host arrays."""
    import jax

    rest = [x for x in jax.tree.leaves(state.rest) if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    return jax.tree.map(np.asarray, (state.params, rest))


def _bn1_running_var(session, state) -> np.ndarray:
    from flax import nnx

    return np.asarray(nnx.merge(session.graphs.train, state.params, state.rest).bn1.var[...])


def _bn1_expected_vars(session, state, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bn1's running variance after one step on ``x`` from ``state``: with the global batch's
    statistics, and with each device's quarter's statistics averaged (what per-device BN gives)."""
    import jax
    from flax import nnx

    from flaxcnn.models.layers import nchw_to_nhwc

    host = jax.tree.map(lambda a: jax.device_put(a, jax.devices()[0]), (state.params, state.rest))
    model = nnx.merge(session.graphs.train, *host)
    h = np.asarray(model.conv1(nchw_to_nhwc(x)), np.float64)

    def unbiased(a):
        flat = a.reshape(-1, a.shape[-1])
        return flat.var(axis=0, ddof=1)

    old = np.asarray(model.bn1.var[...], np.float64)
    global_var = unbiased(h)
    local_var = np.mean([unbiased(q) for q in np.split(h, 4)], axis=0)
    return 0.9 * old + 0.1 * global_var, 0.9 * old + 0.1 * local_var


def equivalence_worker() -> dict:
    """One-device vs 4-device training of each model on the same random images (each with its
    own brightness offset, so that the 4 devices' slices of a batch differ in mean)."""
    import jax

    from flaxcnn.data import Dataset, SplitArrays
    from flaxcnn.train.config import TrainConfig
    from flaxcnn.train.loop import build_session, epoch_order

    assert jax.local_device_count() == 4, jax.devices()
    report = {}
    for model in MODELS:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((N_IMAGES[model], 3, 32, 32), dtype=np.float32)
        x += rng.standard_normal((N_IMAGES[model], 1, 1, 1), dtype=np.float32)
        y = rng.integers(0, 2, N_IMAGES[model]).astype(np.int32)
        dataset = Dataset("cifar2", SplitArrays(x, y), SplitArrays(x[:50], y[:50]), ("airplane", "bird"))
        # the mesh runs XLA's convolutions (a custom call cannot be partitioned), so the one-device
        # reference does too: the comparison is then of the sharding alone, not of the C++ kernels'
        # float32 rounding against XLA's (9.5e-06 per step with the AVX2 kernels, AMD EPYC)
        one = build_session(TrainConfig(model=model, batch_size=BATCH, epochs=5, devices=1, path="step",
                                        conv_policy="xla"), dataset)
        four = build_session(TrainConfig(model=model, batch_size=BATCH, epochs=5, devices=4, path="step"), dataset)
        row = {"one_runner": type(one.runner).__name__, "four_runner": type(four.runner).__name__,
               "four_devices": four.runner.placement.num_devices if hasattr(four.runner, "placement") else 1}
        a, b, per_step, steps = one.state, four.state, 0.0, 0
        for epoch in range(1, 6):
            order = epoch_order(one.config, epoch, len(y))
            for start in range(0, len(order), BATCH):
                idx = order[start:start + BATCH]
                if model == "net-batchnorm":  # the same step from the same state, on 1 and 4 devices
                    forced = four.runner.run(four.runner.placement.replicate(a), *four.device_arrays["train"],
                                             idx, BATCH)
                    if steps == 0:
                        row["bn1_var_expected_global_local"] = [
                            float(np.max(np.abs(_bn1_running_var(four, forced) - e)))
                            for e in _bn1_expected_vars(one, a, x[idx])]
                a = one.runner.run(a, *one.device_arrays["train"], idx, BATCH)
                b = four.runner.run(b, *four.device_arrays["train"], idx, BATCH)
                if model == "net-batchnorm":
                    per_step = max(per_step, _max_diff(_float_state(a), _float_state(forced)))
                steps += 1
        row.update(steps=steps, per_step=per_step, params=_max_diff(a.params, b.params),
                   batch_stats=_max_diff(_float_state(a)[1], _float_state(b)[1]),
                   sums=[[float(v) for v in a.metrics.to_host().values()],
                         [float(v) for v in b.metrics.to_host().values()]])
        report[model] = row
    try:
        build_session(TrainConfig(batch_size=30, epochs=1, devices=4), dataset)
        report["batch_30_on_4_devices"] = "accepted"
    except ConfigError as error:
        report["batch_30_on_4_devices"] = str(error)
    return report


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def four_devices(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dp") / "report.json"
    # The sharded step always uses XLA's own convolutions (distributed.conv_policy_for);
    # the child traces the one-device runner that way too, so that the comparison isolates the
    # sharding: with the C++ kernels or another XLA formulation on one device, NetBatchNorm's steps
    # differ by ~1e-5 (two convolution implementations' float32 rounding, amplified by the
    # division by the batch standard deviation).
    env = _child_env(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.test_distributed", "equivalence", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("model", MODELS)
def test_four_devices_run_the_sharded_path(four_devices, model):
    row = four_devices[model]
    assert row["one_runner"] == "EpochRunner"  # one device: the engine's own runner, no mesh
    assert row["four_runner"] == "ShardedEpochRunner" and row["four_devices"] == 4
    assert row["steps"] == 20


@pytest.mark.parametrize("model", ["net", "net-dropout"])
def test_four_devices_equal_one_device_after_20_steps(four_devices, model):
    row = four_devices[model]
    assert row["params"] <= 1e-5, row
    one, four = row["sums"]
    np.testing.assert_allclose(four, one, rtol=1e-5)


def test_a_global_batch_that_does_not_split_is_refused(four_devices):
    assert "must divide evenly over the 4 devices" in four_devices["batch_30_on_4_devices"]


def test_batchnorm_statistics_are_global_batch_statistics(four_devices):
    row = four_devices["net-batchnorm"]
    to_global, to_local = row["bn1_var_expected_global_local"]
    assert to_global <= 1e-6, row  # the 4-device step normalises with the whole batch's variance ...
    assert to_local >= 1e-4, row  # ... which differs measurably from per-device statistics
    assert row["per_step"] <= 1e-6, row  # every step equals the one-device step from the same state
    assert row["params"] <= 1e-4 and row["batch_stats"] <= 1e-4, row


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, Path]:
    """`flaxcnn train` as 2 processes (one CPU device each) and as 1, on the shipped sample:
    600 images in batches of 64 for 2 epochs = 20 steps (the last batch of each epoch has 24)."""
    root = tmp_path_factory.mktemp("mp")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    args = ["-m", "flaxcnn.cli", "train", "--epochs", "2", "--checkpoint-every", "2", "--out", str(root / "two"),
            "--quiet",
            "--coordinator", f"localhost:{port}", "--num-processes", "2"]
    env = _child_env(JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, *args, "--process-id", str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 0)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(o[-3000:] for o in outputs)
    assert main(["train", "--epochs", "2", "--checkpoint-every", "2", "--out", str(root / "one"), "--quiet"]) == 0
    return root / "two", root / "one"


def test_two_processes_equal_one_process(two_processes):
    import jax

    from flaxcnn.train.loop import load_run

    two, one = two_processes
    (_, state_two, epoch_two), (_, state_one, _) = load_run(two), load_run(one)
    assert epoch_two == 2
    assert _max_diff(state_two.params, state_one.params) <= 1e-5
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (two, one)]
    assert len(rows[0]) == 2  # written once, by process 0
    for a, b in zip(*rows):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
    config = json.loads((two / "config.json").read_text())
    assert config["config"]["devices"] is None and jax.process_count() == 1


def test_two_process_run_resumes_in_one_process(two_processes, tmp_path):
    two = shutil.copytree(two_processes[0], tmp_path / "two")  # the module's run stays as the other tests read it
    assert main(["train", "--out", str(two), "--resume", "--epochs", "3", "--quiet"]) == 0
    assert [json.loads(line)["epoch"] for line in (two / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# ----------------------------------------------------------------------------- single process, no children

def test_one_device_keeps_the_session_and_runner_unchanged():
    from flaxcnn.data import Dataset, SplitArrays
    from flaxcnn.train.config import TrainConfig
    from flaxcnn.train.loop import build_session
    from flaxcnn.train.steps import EpochRunner

    x = np.zeros((8, 3, 32, 32), np.float32)
    y = np.zeros(8, np.int32)
    dataset = Dataset("cifar2", SplitArrays(x, y), SplitArrays(x, y), ("a", "b"))
    session = build_session(TrainConfig(batch_size=4, epochs=1), dataset)
    assert type(session.runner) is EpochRunner
    assert distributed.data_parallel(session) is session
    assert distributed.describe(None) == "one device"


@pytest.mark.parametrize("devices", [0, -1, 2])
def test_devices_beyond_this_machine_are_refused(devices):
    with pytest.raises(ConfigError, match="--devices"):
        distributed.mesh_devices(devices)


@pytest.mark.parametrize("kwargs, env, fragment", [
    ({"coordinator": "localhost:1234"}, {}, "needs all of"),
    ({"coordinator": "localhost", "num_processes": 2, "process_id": 0}, {}, "HOST:PORT"),
    ({"coordinator": "localhost:1234", "num_processes": 2, "process_id": 2}, {}, "--process-id"),
    ({"coordinator": "localhost:1234", "num_processes": 0, "process_id": 0}, {}, "--num-processes"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "needs all of"),
])
def test_bad_process_settings_are_refused_before_connecting(monkeypatch, kwargs, env, fragment):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=fragment):
        distributed.initialize(**kwargs)


def test_no_process_settings_means_one_process(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False


def test_cli_refuses_bad_devices_before_any_file(tmp_path, capsys):
    assert main(["train", "--devices", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--devices" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_a_batch_that_does_not_split_over_the_mesh_is_refused():
    distributed.check_batch_size(64, 4)
    distributed.check_batch_size(30, 1)
    with pytest.raises(ConfigError, match="multiple of 4"):
        distributed.check_batch_size(30, 4)


if __name__ == "__main__":
    command, out_path = sys.argv[1:]
    if command == "equivalence":
        Path(out_path).write_text(json.dumps(equivalence_worker()))
