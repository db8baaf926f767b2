"""Checkpoints with orbax-checkpoint: ``latest`` (for ``--resume``) and ``best`` (by validation
accuracy, as lab 8 describes), each an orbax ``CheckpointManager`` under ``RUN_DIR/checkpoints``.

orbax writes a checkpoint into a temporary folder and renames it when complete, and we keep two
``latest`` steps, so a process killed while saving leaves the previous checkpoint intact.
Typed PRNG keys (the dropout streams) are stored as their raw key data and re-wrapped on restore.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flaxcnn.errors import TrainingError
from flaxcnn.train.state import TrainState


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_savable(state: TrainState) -> dict:
    tree = {"params": state.params, "rest": state.rest, "opt_state": state.opt_state, "step": state.step}
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _from_savable(saved: dict, template: TrainState) -> TrainState:
    tree = {"params": template.params, "rest": template.rest, "opt_state": template.opt_state,
            "step": template.step}
    restored = jax.tree.map(
        lambda t, s: jax.random.wrap_key_data(s, impl=jax.random.key_impl(t)) if _is_key(t) else
        jax.numpy.asarray(s, dtype=t.dtype), tree, saved)
    return template.replace(**restored)


@contextlib.contextmanager
def _orbax_errors_not_logged() -> Iterator[None]:
    """For the block, orbax's ERROR records (it logs a step it cannot parse through absl before
    raising) are not printed: :meth:`Checkpoints.restore` reports each unreadable step in its
    own one-line warning instead."""
    logger = logging.getLogger("absl")

    def below_error(record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR

    logger.addFilter(below_error)
    try:
        yield
    finally:
        logger.removeFilter(below_error)


def _drop_step(manager: ocp.CheckpointManager, epoch: int) -> None:
    """Make room for ``epoch``: a resumed run trains again an epoch that may already have a step,
    an unreadable one that ``restore`` skipped or a ``best`` saved after the resumed ``latest``."""
    if epoch in manager.all_steps():
        manager.delete(epoch)


@contextlib.contextmanager
def _writing(manager: ocp.CheckpointManager, epoch: int) -> Iterator[None]:
    """A failed write (full disk, lost permission) as a TrainingError. orbax leaves the partial
    step in a temporary folder that restore ignores, so the earlier checkpoints stay usable."""
    try:
        yield
    except (OSError, ValueError) as error:  # orbax reports tensorstore's RESOURCE_EXHAUSTED as ValueError
        text = (str(error).splitlines() or [""])[0]
        reason = getattr(error, "strerror", None) or text.rsplit(": ", 1)[-1]
        raise TrainingError(
            f"cannot write the checkpoint of epoch {epoch} in {manager.directory}: {reason}. The "
            "checkpoints of earlier epochs are kept: make room and continue with --resume"
        ) from error


class Checkpoints:
    """``save_latest``/``save_best`` after an epoch; ``restore_latest`` for ``--resume``.

    Saves are asynchronous (orbax's own async checkpointing): ``save`` copies the state to host
    memory and returns, orbax writes it in a background thread, and the next save of the same
    kind, ``close`` or any read first waits for it to finish (and reports its failure). orbax
    commits a step by renaming its finished temporary folder, so a crash while a step is written
    leaves the previous step as the latest: ``--resume`` loses at most the epoch being written.
    Why: a synchronous save cost about 65 ms per epoch on 2 cores, more than the lab's Net
    trains in an epoch of the shipped 600-image sample. ``asynchronous=False`` (a run over several
    processes, where a save is a collective of all of them) saves the device arrays and waits.
    """

    def __init__(self, run_dir: str | os.PathLike, *, asynchronous: bool = True):
        root = Path(run_dir).absolute() / "checkpoints"
        self.asynchronous = asynchronous
        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=asynchronous, create=True)
        # one item, handled by orbax's StandardCheckpointHandler, named here: a manager left to
        # infer its items from what is on disk takes a cut step (no `default` folder) for another
        # layout and then refuses the intact steps before it too
        with _orbax_errors_not_logged():  # opening a manager reads every step's metadata
            self.latest = ocp.CheckpointManager(root / "latest", options=options,
                                                item_handlers=ocp.StandardCheckpointHandler())
            best_options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=asynchronous,
                                                        create=True)
            self.best = ocp.CheckpointManager(root / "best", options=best_options,
                                              item_handlers=ocp.StandardCheckpointHandler())
        self.best_info_path = root / "best.json"
        self._writing_epoch: dict[int, int] = {}  # id(manager) -> the epoch being written

    def _finish(self, manager: ocp.CheckpointManager) -> None:
        """Waits for the manager's save in flight; its failure as a TrainingError naming its epoch."""
        epoch = self._writing_epoch.pop(id(manager), None)
        with _writing(manager, epoch if epoch is not None else -1):
            manager.wait_until_finished()

    def _save(self, manager: ocp.CheckpointManager, epoch: int, state: TrainState, **kwargs) -> None:
        self._finish(manager)
        _drop_step(manager, epoch)
        tree = _to_savable(state)
        if self.asynchronous:  # the state's buffers are donated to the next step while this copy is written
            tree = jax.tree.map(lambda x: np.array(x, copy=True), tree)
        with _writing(manager, epoch):
            manager.save(epoch, args=ocp.args.StandardSave(tree), **kwargs)
        self._writing_epoch[id(manager)] = epoch
        if not self.asynchronous:
            self._finish(manager)

    def save_latest(self, epoch: int, state: TrainState) -> None:
        self._save(self.latest, epoch, state)

    def save_best(self, epoch: int, state: TrainState, info: dict) -> None:
        self._save(self.best, epoch, state, force=True)
        tmp = self.best_info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"epoch": epoch, **info}, indent=2))
        os.replace(tmp, self.best_info_path)

    def latest_epoch(self) -> int | None:
        self._finish(self.latest)
        return self.latest.latest_step()

    def restore(self, which: str, template: TrainState, epoch: int | None = None) -> tuple[int, TrainState]:
        """``epoch``'s checkpoint, or the newest one that can be read: a step whose files were cut
        (a crash on a file system without atomic renames, a full disk) is reported on stderr and
        the step before it is used. TrainingError when no step can be read."""
        manager = self.latest if which == "latest" else self.best
        self._finish(manager)
        steps = sorted(manager.all_steps(), reverse=True) if epoch is None else [epoch]
        if not steps:
            raise FileNotFoundError(f"no {which} checkpoint in {manager.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_savable(template))
        problems = []
        for step in steps:
            try:
                with _orbax_errors_not_logged():
                    saved = manager.restore(step, args=ocp.args.StandardRestore(abstract))
            except Exception as error:  # noqa: BLE001 - orbax and tensorstore raise plain Exception
                problems.append(f"epoch {step}: {(str(error).splitlines() or [''])[0][:160]}")
                continue
            if problems:
                print(f"flaxcnn: warning: unreadable {which} checkpoint(s) in {manager.directory} "
                      f"({'; '.join(problems)}); using the one of epoch {step}", file=sys.stderr)
            return step, _from_savable(saved, template)
        raise TrainingError(f"no {which} checkpoint in {manager.directory} can be read ({'; '.join(problems)}); "
                            "start the run again with --overwrite")

    def wait(self) -> None:
        """Returns when every save in flight is on disk (a failure as a TrainingError)."""
        self._finish(self.latest)
        self._finish(self.best)

    def close(self) -> None:
        """Waits for the saves in flight (a failure is raised after both managers are closed)."""
        try:
            self.wait()
        finally:
            self.latest.close()
            self.best.close()


def best_metric(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / "checkpoints" / "best.json"
    return json.loads(path.read_text()) if path.exists() else None


__all__ = ["Checkpoints", "best_metric", "np"]
