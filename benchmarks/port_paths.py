"""The trainers ``port_throughput`` times: a ported NNX module in flaxcnn's jitted step, and the
same torch module in the PyTorch loop of :mod:`benchmarks.torch_paths` (eager and compiled).

Both follow :class:`benchmarks.timing.Trainer` (``train_epoch(epoch) -> loss sum``), so one
:func:`benchmarks.timing.time_training_interleaved` call times them round by round. Classifiers
train with cross-entropy; a per-pixel output (N, C, H, W) against labels (N, H, W) with
cross-entropy over every pixel (``nn.CrossEntropyLoss``'s mean on both sides).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.data import BenchData
from flaxcnn.data.batching import epoch_permutation
from flaxcnn.train.optim import sgd
from flaxcnn.train.state import Graphs, Sums, TrainState, create_state
from flaxcnn.train.steps import EpochRunner, default_path, make_train_step

#: the loss of a per-pixel output (a segmentation map): cross-entropy over every pixel
PER_PIXEL = "pixel_cross_entropy"


@dataclass(frozen=True)
class TorchSpec:
    """What :class:`benchmarks.torch_paths.TorchTrainer` reads of a model spec: the name, the loss
    (``cross_entropy`` covers the per-pixel case: ``nn.CrossEntropyLoss`` takes (N, C, H, W)) and a
    builder that returns a fresh copy of the one torch module every path starts from."""

    name: str
    loss: str
    module: object

    def build_torch(self):
        return copy.deepcopy(self.module)


def make_pixel_train_step(graphs: Graphs, tx: optax.GradientTransformation) -> Callable:
    """``make_train_step`` for a per-pixel output: (N, C, H, W) logits, (N, H, W) labels, the mean
    cross-entropy over every pixel; the same forward / gradient / update structure."""

    def train_step(state: TrainState, x: jax.Array, y: jax.Array) -> TrainState:
        def objective(params, rest):
            rest = jax.tree.map(lambda v: v, rest)  # fresh Variables inside the trace (see steps.py)
            model = nnx.merge(graphs.train, params, rest)
            out = model(x)
            losses = optax.softmax_cross_entropy_with_integer_labels(jnp.moveaxis(out, 1, -1), y)
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return jnp.mean(losses), (jnp.sum(losses), out, rest)

        (total, (loss_sum, out, rest)), grads = jax.value_and_grad(objective, has_aux=True)(state.params, state.rest)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(out, axis=1) == y).astype(jnp.float32)
        batch_metrics = Sums(objective=total, loss=loss_sum, correct=correct, count=jnp.float32(y.size))
        return state.replace(params=params, rest=rest, opt_state=opt_state, step=state.step + 1,
                             metrics=state.metrics + batch_metrics)

    return train_step


class PortedTrainer:
    """A ported NNX module trained like ``flaxcnn train`` trains: the engine's state, SGD and
    jitted step in the default path (:func:`flaxcnn.train.steps.default_path`), batches gathered
    on the device from the epoch's permutation (the one the PyTorch loop uses)."""

    def __init__(self, module: nnx.Module, loss: str, data: BenchData, batch_size: int, *, lr: float,
                 momentum: float, seed: int):
        self.batch_size, self.seed, self.path = batch_size, seed, default_path()
        tx = sgd(lr, momentum)
        graphs, self.state = create_state(module, tx)
        step = make_pixel_train_step(graphs, tx) if loss == PER_PIXEL else make_train_step(graphs, loss, tx)
        self.runner = EpochRunner(step, self.path)
        self.x, self.y = jnp.asarray(data.x), jnp.asarray(data.y, jnp.int32)

    def train_epoch(self, epoch: int) -> float:
        order = epoch_permutation(self.seed, epoch, len(self.y))
        self.state = self.runner.run(self.state, self.x, self.y, order, self.batch_size)
        return float(np.asarray(self.state.metrics.objective))  # blocks until the epoch is done

    def evaluate(self, x, y) -> dict[str, float]:  # the Trainer protocol; this benchmark times training only
        raise NotImplementedError("port_throughput times training only")
