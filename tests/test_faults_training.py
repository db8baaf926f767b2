"""Faults during training: NaN loss, SIGKILL, a checkpoint cut while written, unwritable or full
disks, an existing run; and seed determinism. Nothing trained may be lost, nothing overwritten.

The data is a generated ``cifar-10-batches-py`` folder in the release's pickle format (airplane
and bird only, a few hundred images). Subprocesses run ``python -m flaxcnn.cli`` and share a
persistent XLA compilation cache so that each pays the JAX import but not every compile; they
get the matmul precision of tests/conftest.py so that their numbers can be compared bitwise with
runs made in this process.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import flaxcnn.train.loop as loop
from flaxcnn.cli import main
from flaxcnn.errors import TrainingError
from flaxcnn.data import Dataset, SplitArrays
from flaxcnn.train.checkpoint import Checkpoints
from flaxcnn.train.config import TrainConfig
from flaxcnn.train.loop import load_run
from flaxcnn.train.runlog import MetricsLog, holds_a_run, prepare_run_dir
from flaxcnn.train.state import TrainState

PER_BATCH = 96  # x 5 train batches: 480 training images, 96 test images
EPOCHS = 4
ON_CPU = jax.default_backend() == "cpu"
bitwise = pytest.mark.skipif(not ON_CPU, reason="bitwise reproducibility is promised on CPU only (see docs/faults.md)")


# ---------------------------------------------------------------- fixtures and helpers


def write_cifar2_folder(root: Path) -> Path:
    """cifar-10-batches-py with labels 0 and 2 only (so every image is CIFAR-2), weak signal."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        y = np.where(np.arange(PER_BATCH) % 2 == 0, 0, 2)
        x = rng.integers(0, 230, (PER_BATCH, 3, 32, 32), dtype=np.uint8)
        x[y == 2, 2] += rng.integers(0, 25, dtype=np.uint8)  # bird images a little bluer
        entry = {b"data": x.reshape(PER_BATCH, -1), b"labels": [int(v) for v in y]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_cifar2_folder(tmp_path_factory.mktemp("cifar"))


def run_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """The run every kill/resume test uses: dropout (so RNG state must survive a resume), 120
    batches of 4 per epoch (so a kill lands in the middle of one)."""
    return ["train", "--model", "net-dropout", "--data-dir", str(data_dir), "--epochs", str(EPOCHS),
            "--batch-size", "4", "--seed", "7", "--out", str(out), *extra]


def small_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data-dir", str(data_dir), "--epochs", "3", "--batch-size", "32", "--out", str(out),
            "--quiet", *extra]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """The uninterrupted run, made in this process."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main([*run_args(data_dir, out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1",
                JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla-cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
                JAX_DEFAULT_MATMUL_PRECISION=str(jax.config.jax_default_matmul_precision or "default"))


def flaxcnn(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flaxcnn.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def epochs_logged(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def params_of(run: Path) -> tuple[int, list[np.ndarray]]:
    _, state, epoch = load_run(run)
    return epoch, [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]


def assert_same_params(a: Path, b: Path) -> None:
    (epoch_a, leaves_a), (epoch_b, leaves_b) = params_of(a), params_of(b)
    assert epoch_a == epoch_b and len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)  # bitwise: no tolerance


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


ENOSPC = ("RESOURCE_EXHAUSTED: Error writing \"params.fc1.kernel.value/0.0\" in OCDBT database at local file "
          "\"/x/checkpoints/latest/2.orbax-checkpoint-tmp/\": Failed to write 1431019 bytes to file 7: No space "
          "left on device [os_error_code='28']")  # what orbax raised on a full tmpfs (docs/faults.md)


def poison_epoch(monkeypatch, at: int, fault: str) -> None:
    """Make epoch ``at`` end with a NaN loss, a Ctrl-C or a full disk while its checkpoint is
    written, through the engine's own epoch function and orbax's own save."""
    if fault == "disk full":
        real_save = ocp.CheckpointManager.save

        def save(self, step, *args, **kwargs):
            if step == at:
                raise ValueError(ENOSPC)
            return real_save(self, step, *args, **kwargs)

        monkeypatch.setattr(ocp.CheckpointManager, "save", save)
        return
    real = loop.train_epoch

    def train_epoch(session, state, epoch, progress=None):
        if epoch == at and fault == "interrupt":
            raise KeyboardInterrupt
        state, sums, seconds = real(session, state, epoch, progress)
        if epoch == at:
            state = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
            sums = {name: value * np.nan for name, value in sums.items()}
        return state, sums, seconds

    monkeypatch.setattr(loop, "train_epoch", train_epoch)


# ---------------------------------------------------------------- NaN loss and Ctrl-C


def test_nan_loss_from_the_command_line_stops_with_status_2(data_dir, tmp_path, cli_env):
    """--lr 1e38 overflows the weights in the first epoch: a one-line error, and since no epoch
    finished the same --out can be used again at once (no --resume or --overwrite needed).
    (The learning rate is not part of the compiled program: this run fills the compilation
    cache that the SIGKILL test's processes then use.)"""
    out = tmp_path / "run"
    proc = flaxcnn([*run_args(data_dir, out, "--lr", "1e38"), "--quiet"], cli_env)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # (JAX may warn about the platform before it)
    assert last.startswith("flaxcnn: error: the training loss became nan in epoch 1; stopped.")
    assert "Lower the learning rate (--lr 1e+38 now)" in last and "Traceback" not in proc.stderr
    assert not (out / "summary.json").exists() and not holds_a_run(out)
    prepare_run_dir(out, resume=False)  # a new run may start here without --resume or --overwrite


@pytest.mark.parametrize("fault, code, message", [
    ("nan", 2, "flaxcnn: error: the training loss became nan in epoch 3; stopped. The last good checkpoint "
               "(epoch 2) is kept in"),
    ("interrupt", 130, "flaxcnn: interrupted; the latest completed epoch is checkpointed (continue with --resume)"),
    ("disk full", 2, "checkpoints/latest: No space left on device [os_error_code='28']. The checkpoints of "
                     "earlier epochs are kept: make room and continue with --resume"),
])
def test_a_failed_epoch_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch, capsys, fault, code, message):
    out = tmp_path / "run"
    poison_epoch(monkeypatch, at=3 if fault == "nan" else 2, fault=fault)
    assert main(small_args(data_dir, out)) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    good = 2 if fault == "nan" else 1
    # a full disk hits after epoch 2's row is logged: --resume drops rows past the checkpoint
    assert epochs_logged(out) == list(range(1, good + 1 + (fault == "disk full")))
    assert not (out / "summary.json").exists()
    epoch, leaves = params_of(out)
    assert epoch == good and all(np.isfinite(leaf).all() for leaf in leaves)


# ---------------------------------------------------------------- SIGKILL and resume


@bitwise
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_result(data_dir, tmp_path, reference, cli_env,
                                                                        capsys):
    out = tmp_path / "killed"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "flaxcnn.cli", *run_args(data_dir, out), "--quiet"],
                                env=cli_env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 300
            metrics = out / "metrics.jsonl"
            saved = out / "checkpoints" / "best.json"  # written last after epoch 1 (always its best)
            while not (metrics.exists() and metrics.read_text().count("\n") >= 1 and saved.exists()):
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
                assert time.monotonic() < deadline, "no epoch finished within 300 s"
                time.sleep(0.01)
            time.sleep(0.05)  # into epoch 2's 120 batches (about 0.3 s of work on an idle CPU)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert epochs_logged(out) == [1], "the kill was meant to land inside epoch 2"

    resumed = flaxcnn(run_args(data_dir, out, "--resume"), cli_env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from the checkpoint of epoch" in resumed.stdout or "no checkpoint in" in resumed.stdout
    assert epochs_logged(out) == list(range(1, EPOCHS + 1))  # every epoch once, in order
    assert_same_params(out, reference)

    proc = flaxcnn(["evaluate", "--run", str(out), "--json"], cli_env)
    assert proc.returncode == 0, proc.stderr
    assert main(["evaluate", "--run", str(reference), "--json"]) == 0
    resumed_eval, reference_eval = (
        {k: v for k, v in json.loads(text).items() if k != "run"} for text in (proc.stdout, capsys.readouterr().out))
    assert resumed_eval == reference_eval and resumed_eval["epoch"] == EPOCHS


def cut_files(folder: Path) -> None:
    for f in (p for p in folder.rglob("*") if p.is_file() and p.stat().st_size > 0):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@bitwise
def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one(data_dir, tmp_path, reference, capsys):
    """What a kill during the last epoch's save leaves: its metrics row is written, its checkpoint
    is a half-written orbax temporary folder. --resume goes back one epoch and redoes the last."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    latest = out / "checkpoints" / "latest"
    cut_files((latest / str(EPOCHS)).rename(latest / f"{EPOCHS}.orbax-checkpoint-tmp"))  # orbax's own name
    best_step = out / "checkpoints" / "best" / str(EPOCHS)
    if best_step.exists():  # best is saved after latest, so a kill during latest's save precedes it
        shutil.rmtree(best_step)
    for name in ("summary.json", "curves.png"):
        (out / name).unlink()

    assert main([*run_args(data_dir, out), "--resume"]) == 0
    assert f"resumed from the checkpoint of epoch {EPOCHS - 1}" in capsys.readouterr().out
    assert epochs_logged(out) == list(range(1, EPOCHS + 1))
    assert_same_params(out, reference)


def tiny_state(value: float) -> TrainState:
    """A TrainState small enough to checkpoint without building a model."""
    return TrainState(params={"w": jnp.full((4, 3), value)}, rest={}, opt_state={"m": jnp.zeros(3)},
                      step=jnp.asarray(int(value), jnp.int32), metrics=jnp.zeros(4))


def test_an_unreadable_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    """A finished step whose files were cut (a crash on a file system without atomic renames):
    restore reports it and uses the previous epoch; training that epoch again replaces it."""
    checkpoints = Checkpoints(tmp_path)
    for epoch in (1, 2):
        checkpoints.save_latest(epoch, tiny_state(epoch))
        checkpoints.save_best(epoch, tiny_state(epoch), {"metric": "val_accuracy", "value": 0.5})
    checkpoints.wait()  # saves are asynchronous: epoch 2 is finished on disk before its files are cut
    cut_files(tmp_path / "checkpoints" / "latest" / "2")
    epoch, state = checkpoints.restore("latest", tiny_state(0))
    assert epoch == 1 and float(state.params["w"][0, 0]) == 1.0
    assert "unreadable latest checkpoint(s)" in capsys.readouterr().err
    checkpoints.save_latest(2, tiny_state(5))  # epoch 2 trained again after the resume
    checkpoints.save_best(2, tiny_state(5), {"metric": "val_accuracy", "value": 0.6})  # best had epoch 2 too
    assert checkpoints.restore("latest", tiny_state(0))[0] == 2
    assert float(checkpoints.restore("best", tiny_state(0))[1].params["w"][0, 0]) == 5.0
    cut_files(tmp_path / "checkpoints" / "latest")
    with pytest.raises(TrainingError, match="no latest checkpoint in .* can be read .*--overwrite"):
        checkpoints.restore("latest", tiny_state(0))
    checkpoints.close()


@pytest.mark.parametrize("cut", ["halved files", "item folder gone"])
def test_a_cut_step_falls_back_with_one_warning_line_and_nothing_else(tmp_path, cut):
    """The fallback in a fresh process (what a user sees): stderr holds flaxcnn's one warning, not
    orbax's logged errors or asyncio's shutdown noise; a step missing its item folder does not
    stop the intact step before it from being read."""
    checkpoints = Checkpoints(tmp_path)
    for epoch in (1, 2):
        checkpoints.save_latest(epoch, tiny_state(epoch))
    checkpoints.close()
    step = tmp_path / "checkpoints" / "latest" / "2"
    cut_files(step) if cut == "halved files" else shutil.rmtree(step / "default")
    script = ("import sys; sys.path.insert(0, sys.argv[2]); from tests.test_faults_training import tiny_state; "
              "from flaxcnn.train.checkpoint import Checkpoints; c = Checkpoints(sys.argv[1]); "
              "print(c.restore('latest', tiny_state(0))[0]); c.close()")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(Path(__file__).parents[1])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flaxcnn: warning: unreadable latest checkpoint(s)"), lines


# ---------------------------------------------------------------- the run directory


@pytest.fixture()
def no_training(monkeypatch):
    """Refusals must come before the data is loaded or a model is built."""
    def reached(*args, **kwargs):
        raise AssertionError("training work started")

    monkeypatch.setattr(loop, "build_session", reached)


def test_an_existing_run_is_not_overwritten(data_dir, tmp_path, reference, capsys, no_training):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = snapshot(out)
    assert main(run_args(data_dir, out)) == 2
    err = capsys.readouterr().err
    assert f"flaxcnn: error: {out} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(out) == before


def test_run_dir_under_a_regular_file(data_dir, tmp_path, capsys, no_training):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(small_args(data_dir, blocker / "run")) == 2
    assert f"flaxcnn: error: cannot write to run directory {blocker / 'run'}: Not a directory" in \
        capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permission bits do not stop root")
def test_read_only_parent_folder(data_dir, tmp_path, capsys, no_training):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert main(small_args(data_dir, parent / "run")) == 2
    finally:
        parent.chmod(0o700)
    assert "cannot write to run directory" in capsys.readouterr().err


def test_a_full_disk_is_refused_before_training(data_dir, tmp_path, capsys, monkeypatch, no_training):
    import flaxcnn.train.runlog as runlog

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(runlog.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 10 * 2**20, 10 * 2**20))
    out = tmp_path / "run"
    assert main(small_args(data_dir, out)) == 2
    assert f"flaxcnn: error: only 10.0 MiB free on the disk of {out}; checkpoints need at least 50 MiB" in \
        capsys.readouterr().err
    assert list(out.iterdir()) == []
    with pytest.raises(TrainingError, match="only 10.0 MiB free"):
        loop.fit(TrainConfig(out=str(tmp_path / "api"), data_dir=str(data_dir), epochs=1))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_metrics_row_that_cannot_be_written(tmp_path):
    """/dev/full fails every write with ENOSPC, like a full disk."""
    with pytest.raises(TrainingError, match="cannot append epoch 3 to /dev/full: No space left on device. "
                                            "Earlier epochs are kept"):
        MetricsLog(Path("/dev/full")).append({"epoch": 3, "train_loss": 0.5})


# ---------------------------------------------------------------- determinism


@bitwise
def test_same_seed_same_bits_other_seed_other_bits(tmp_path):
    rng = np.random.default_rng(0)
    split = lambda n: SplitArrays(rng.normal(size=(n, 3, 32, 32)).astype(np.float32),  # noqa: E731
                                  (np.arange(n) % 2).astype(np.int32))
    dataset = Dataset("tiny", split(64), split(64), ("a", "b"))
    params, losses = {}, {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        config = TrainConfig(model="net-dropout", out=str(tmp_path / name), epochs=2, batch_size=16, seed=seed)
        loop.fit(config, dataset=dataset, quiet=True)
        _, state, _ = load_run(tmp_path / name, dataset=dataset)
        params[name] = [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]
        losses[name] = [(r["train_loss"], r["val_loss"]) for r in map(json.loads,
                        (tmp_path / name / "metrics.jsonl").read_text().splitlines())]
    for x, y in zip(params["a"], params["b"]):
        np.testing.assert_array_equal(x, y)
    assert losses["a"] == losses["b"]
    assert not any(np.array_equal(x, y) for x, y in zip(params["a"], params["c"]))
    assert losses["a"] != losses["c"]
