"""Data parallelism with ``jax.sharding`` over local devices and ``jax.distributed`` processes.

One ``Mesh`` with a single ``"data"`` axis spans the chosen devices of every process. The
training state is replicated on it; each mesh-wide batch of indices is split along the axis, so
every device gathers and trains on its slice of the batch from the replicated data set, and
XLA's SPMD partitioner inserts the all-reduces: gradients are summed over the whole batch and
BatchNorm's batch means (plain ``jnp.mean`` over the batch axes, see
:class:`flaxcnn.models.layers.BatchNorm2d`) become means over the *global* batch. The result is
one-device training on the same mesh-wide batch, up to float rounding
(``tests/test_distributed.py`` checks 20 steps to 1e-5).

Processes (one per host): each process holds the whole data set (CIFAR and the speech features
fit in memory), computes the same epoch order from the seed, and feeds only its own slice of
each mesh-wide index batch (``jax.make_array_from_process_local_data``). Process 0 writes the run
directory's text files; checkpoints are saved by orbax from all processes, so the run
directory must be on a file system every process sees (one machine, NFS, a bucket).

With one device and one process nothing here is used: :func:`data_parallel` returns the
session unchanged, so the default path carries no sharding overhead. This module places what
the engine (:mod:`flaxcnn.train.loop`) built; it does not import the engine.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flaxcnn.models.conv_policy import XLA_ONLY, ConvPolicy
from flaxcnn.errors import ConfigError, TrainingError
from flaxcnn.train import runlog
from flaxcnn.train.checkpoint import Checkpoints
from flaxcnn.train.config import check_setting
from flaxcnn.train.state import TrainState
from flaxcnn.train.steps import EpochRunner

DATA_AXIS = "data"
#: environment variables read when the flags are not given (JAX reads the first one itself too)
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


# ----------------------------------------------------------------------------- processes

def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {text!r}") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process job with ``jax.distributed.initialize`` when one is asked for.

    Settings come from the arguments (``--coordinator HOST:PORT --num-processes N
    --process-id I``), else from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``. Nothing set: single process, returns False. Must run before anything
    touches a JAX device. On CPU the cross-process collectives are gloo's (the default of this
    JAX; set explicitly in case a build has none).
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator is None and num_processes is None and process_id is None:
        return False
    if coordinator is None or num_processes is None or process_id is None:
        raise ConfigError("a multi-process run needs all of --coordinator HOST:PORT, --num-processes N and "
                          f"--process-id I (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got "
                          f"coordinator={coordinator!r}, num_processes={num_processes}, process_id={process_id}")
    if not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", coordinator):
        raise ConfigError(f"--coordinator must be HOST:PORT (e.g. localhost:12345), got {coordinator!r}")
    if num_processes < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id must be in [0, {num_processes - 1}] for --num-processes {num_processes}, "
                          f"got {process_id}")
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except Exception as error:  # noqa: BLE001 - JAX raises RuntimeError / XlaRuntimeError / ValueError here
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise TrainingError(f"process {process_id} of {num_processes} could not join the job at {coordinator}: "
                            f"{first}") from None
    return True


def is_primary() -> bool:
    """Whether this process writes the run directory's files (process 0, or the only one)."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------- run directory

def prepare_run_dir(run_dir: str | os.PathLike, *, resume: bool, overwrite: bool = False) -> Path:
    """:func:`flaxcnn.train.runlog.prepare_run_dir` on process 0. The other processes write
    nothing but make the same refusal, so that no process waits for a partner that stopped."""
    if is_primary():
        return runlog.prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    path = Path(run_dir)
    if runlog.holds_a_run(path) and not resume and not overwrite:
        raise TrainingError(f"{path} already holds a run; continue it with --resume, replace it with --overwrite, "
                            "or choose another --out")
    return path


class FollowerMetricsLog(runlog.MetricsLog):
    """The metrics log as a process other than 0 sees it: read, never written."""

    def truncate_after(self, epoch: int) -> list[dict]:
        return [r for r in self.read() if r.get("epoch", 0) <= epoch]

    def append(self, row: dict) -> None:
        pass


def metrics_log(path: Path) -> runlog.MetricsLog:
    return runlog.MetricsLog(path) if is_primary() else FollowerMetricsLog(path)


def checkpoints(run_dir: Path) -> Checkpoints:
    """Every process saves through orbax (a collective: each array is written once, by the
    process holding its first replica), synchronously when there are several processes (the save
    is a collective); only process 0 writes the ``best.json`` next to them."""
    manager = Checkpoints(run_dir, asynchronous=jax.process_count() == 1)
    if not is_primary():
        manager.best_info_path = Path(tempfile.mkdtemp(prefix="flaxcnn-follower-")) / "best.json"
    return manager


# ----------------------------------------------------------------------------- placement

def mesh_devices(devices: int | None) -> list[jax.Device]:
    """The first ``devices`` local devices of every process (all of them when None), in process
    order, so that each process's devices hold one contiguous slice of the batch axis."""
    local = jax.local_device_count()
    check_setting("devices", devices)
    if devices is None:
        devices = local
    if devices > local:
        raise ConfigError(f"--devices {devices} asked for, but this process sees {local} {jax.default_backend()} "
                          f"device(s); on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
                          "(set before JAX starts) simulates N devices")
    by_process: dict[int, list[jax.Device]] = {}
    for device in jax.devices():
        by_process.setdefault(device.process_index, []).append(device)
    return [d for p in sorted(by_process) for d in sorted(by_process[p], key=lambda d: d.id)[:devices]]


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where arrays live: replicated on the mesh, or split along its data axis."""

    mesh: Mesh

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def sharded(self, axis: int = 0) -> NamedSharding:
        return NamedSharding(self.mesh, P(*([None] * axis), DATA_AXIS))

    def replicate(self, tree: Any) -> Any:
        """Every leaf as a mesh-wide array replicated on the mesh. Each process passes the same
        values (the state is built from the same seed, the data read from the same files)."""
        sharding = self.replicated

        def put(leaf):
            if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
                return leaf
            if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                impl = jax.random.key_impl(leaf)
                return jax.random.wrap_key_data(put(jax.random.key_data(leaf)), impl=impl)
            return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

        return jax.tree.map(put, tree)

    def index_batch(self, order: np.ndarray, axis: int = 0) -> jax.Array:
        """A mesh-wide int32 index array with the values ``order`` (the same on every process), split
        along ``axis`` when it divides evenly over the devices, else replicated. Each process
        hands over only the slice its own devices hold."""
        order = np.asarray(order, np.int32)
        if order.shape[axis] % self.num_devices:
            return jax.make_array_from_process_local_data(self.replicated, order)
        sharding = self.sharded(axis)
        rows = [index[axis] for index in sharding.addressable_devices_indices_map(order.shape).values()]
        start, stop = min(r.start or 0 for r in rows), max(r.stop if r.stop is not None else order.shape[axis]
                                                           for r in rows)
        local = order[(slice(None),) * axis + (slice(start, stop),)]
        return jax.make_array_from_process_local_data(sharding, local, order.shape)


def placement_for(devices: int | None) -> Placement | None:
    """The mesh for ``--devices`` (None: all local devices), or None for one device in one process."""
    chosen = mesh_devices(devices)
    if len(chosen) == 1:
        return None
    return Placement(Mesh(np.array(chosen), (DATA_AXIS,)))


# ----------------------------------------------------------------------------- training

class ShardedEpochRunner(EpochRunner):
    """:class:`flaxcnn.train.steps.EpochRunner`'s paths over a mesh.

    ``step``: one call per batch; ``scan``: the epoch's full batches in one ``lax.scan``. The
    state stays replicated (``out_shardings``); the index batch is split over the devices; the
    convolutions are XLA's, which the partitioner splits (not flaxcnn's C++ kernels). A
    last partial batch that does not divide over the devices is run replicated (every device
    computes it whole), which gives the same numbers as one device.
    """

    def __init__(self, train_step: Callable[[TrainState, jax.Array, jax.Array], TrainState], path: str,
                 placement: Placement):
        super().__init__(train_step, path, out_shardings=placement.replicated)
        self.placement = placement
        self._zero_metrics = jax.jit(lambda s: s.replace(metrics=s.metrics.reset()),
                                     out_shardings=placement.replicated, donate_argnums=0)

    def begin_epoch(self, state: TrainState) -> TrainState:
        return self._zero_metrics(self.placement.replicate(state))

    def indices(self, idx: np.ndarray) -> jax.Array:
        return self.placement.index_batch(idx, axis=idx.ndim - 1)


def check_batch_size(batch_size: int, num_devices: int) -> None:
    """The mesh-wide batch must split evenly over the mesh (a last partial batch need not)."""
    if batch_size % num_devices:
        ok = [d for d in range(1, num_devices + 1) if batch_size % d == 0]
        raise ConfigError(f"--batch-size {batch_size} (the mesh-wide batch) must divide evenly over the "
                          f"{num_devices} devices of the mesh; use a multiple of {num_devices} "
                          f"or fewer devices: {ok} devices in all would divide it")


SessionT = TypeVar("SessionT")  # a flaxcnn.train.loop.Session, which this module does not import


def conv_policy_for(devices: int | None, policy: ConvPolicy) -> ConvPolicy:
    """The policy a run over ``devices`` traces its model under: ``policy`` on one device, XLA's
    own convolutions over a mesh (XLA's SPMD partitioner cannot split a custom call: it would
    gather the whole batch onto every device; XLA's convolutions it splits over the devices)."""
    return policy if placement_for(devices) is None else XLA_ONLY


def data_parallel(session: SessionT) -> SessionT:
    """The session (:class:`flaxcnn.train.loop.Session`) spread over ``config.devices`` devices
    per process: state and data replicated, its runner's train step run by a
    :class:`ShardedEpochRunner`. One device in one process: the session itself, unchanged."""
    config = session.config
    placement = placement_for(config.devices)
    if placement is None:
        return session
    check_batch_size(config.batch_size, placement.num_devices)
    return dataclasses.replace(
        session,
        state=placement.replicate(session.state),
        runner=ShardedEpochRunner(session.runner.train_step, config.path, placement),
        device_arrays={name: placement.replicate(arrays) for name, arrays in session.device_arrays.items()},
    )


def describe(devices: int | None) -> str:
    """One line for the run's log: how many devices and processes train."""
    chosen = mesh_devices(devices)
    return (f"{len(chosen)} {jax.default_backend()} device(s) in {jax.process_count()} process(es), "
            f"batch split over the mesh axis {DATA_AXIS!r}" if len(chosen) > 1 else "one device")


__all__ = ["initialize", "is_primary", "mesh_devices", "Placement", "placement_for", "ShardedEpochRunner",
           "data_parallel", "check_batch_size", "describe"]
