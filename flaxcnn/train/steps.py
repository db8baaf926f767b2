"""Jitted training and evaluation steps, and the two ways an epoch runs through them.

Paths (``--path``):

``step``  one jitted call per batch; the data set lives on the device and each call gathers
          its batch by index. The default on CPU: XLA's CPU backend compiles convolution
          gradients inside loop bodies to a slow generic path, so a loop of small calls
          beats one big one there.
``scan``  the whole epoch's full batches in one ``lax.scan`` (one dispatch per epoch), then
          the last partial batch as one call. The default on GPU/TPU, where per-call
          dispatch dominates these small models.

``--path auto`` picks by the platform of the device the arrays and the step are placed on
(:func:`placement_platform`), not by ``jax.default_backend()``: a run placed on a CPU device of
a GPU host (``jax.default_device``) is a CPU run.

Both run the same ``train_step`` function, so they compute the same numbers. A runner built
with ``stacked=True`` runs K models stacked along a leading axis (``flaxcnn sweep --strategy
vmap``) through the same paths: the step is vmapped, and each model trains on its own epoch order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxcnn.train.optim import l2_penalty, per_example_loss
from flaxcnn.train.state import Graphs, Sums, TrainState

Batch = tuple[jax.Array, jax.Array]


def placement_platform(devices: Sequence[jax.Device] | None = None) -> str:
    """The platform (``"cpu"``, ``"gpu"``, ``"tpu"``) of the devices a computation is placed on.

    ``devices``: the devices given (a mesh's, say); they must share one platform. None: the
    device that ``jnp.asarray`` and an unsharded ``jax.jit`` use, i.e. ``jax.default_device``
    (the option or its context manager) when set, else the first device of the default backend.
    """
    if devices is None:
        default = jax.config.jax_default_device
        if default is None:
            return jax.devices()[0].platform
        return jax.devices(default)[0].platform if isinstance(default, str) else default.platform
    platforms = sorted({d.platform for d in devices})
    if len(platforms) != 1:
        raise ValueError(f"the devices must share one platform to pick a path, got {', '.join(platforms) or 'none'}")
    return platforms[0]


def default_path(devices: Sequence[jax.Device] | None = None) -> str:
    """``--path auto``: ``step`` on CPU devices, ``scan`` elsewhere (see the module notes), for the
    devices the run is placed on (:func:`placement_platform`)."""
    return "step" if placement_platform(devices) == "cpu" else "scan"


def make_train_step(graphs: Graphs, loss: str, tx: optax.GradientTransformation, l2: float = 0.0,
                    augment: Callable | None = None) -> Callable[[TrainState, jax.Array, jax.Array], TrainState]:
    """Pure ``(state, x, y) -> state``: forward, lab loss (+ L2 penalty), SGD update, metrics.

    ``augment`` (a :class:`flaxcnn.train.augment.Augmenter`), when given, transforms each batch
    first, keyed by the state's ``augment_key`` and step count; mixup's partner labels weigh into
    the loss."""

    def train_step(state: TrainState, x: jax.Array, y: jax.Array) -> TrainState:
        mixed = augment(x, y, state.step, state.augment_key) if augment is not None else None
        if mixed is not None:
            x = mixed.x

        def objective(params, rest):
            # Fresh Variable objects for rest (BatchNorm statistics, RNG streams), created inside
            # the gradient trace, so NNX lets the forward pass update them there.
            rest = jax.tree.map(lambda v: v, rest)
            model = nnx.merge(graphs.train, params, rest)
            out = model(x)
            losses = per_example_loss(loss, out, y)
            if mixed is not None and augment.settings.mixup:
                losses = mixed.lam * losses + (1 - mixed.lam) * per_example_loss(loss, out, mixed.y_partner)
            data_loss = jnp.mean(losses)
            total = data_loss + l2 * l2_penalty(params) if l2 else data_loss
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return total, (jnp.sum(losses), out, rest)

        (total, (loss_sum, out, rest)), grads = jax.value_and_grad(objective, has_aux=True)(state.params, state.rest)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(out, axis=1) == y)
        batch_metrics = Sums(objective=total, loss=loss_sum, correct=correct.astype(jnp.float32),
                             count=jnp.float32(y.shape[0]))
        return state.replace(params=params, rest=rest, opt_state=opt_state, step=state.step + 1,
                             metrics=state.metrics + batch_metrics)

    return train_step


def make_eval_step(graphs: Graphs, loss: str) -> Callable:
    """Pure ``(params, rest, x, y) -> Sums`` in evaluation mode (its objective is the loss sum)."""

    def eval_step(params, rest, x, y):
        out = nnx.merge(graphs.eval, params, rest)(x)
        losses = per_example_loss(loss, out, y)
        correct = jnp.sum(jnp.argmax(out, axis=1) == y)
        loss_sum = jnp.sum(losses)
        return Sums(objective=loss_sum, loss=loss_sum, correct=correct.astype(jnp.float32),
                    count=jnp.float32(y.shape[0]))

    return eval_step


def index_batches(order: np.ndarray, batch_size: int, start: int = 0) -> Iterator[np.ndarray]:
    """``order[..., start:]`` in batches of ``batch_size`` along its last axis, the last one
    partial when the size does not divide (``DataLoader(drop_last=False)``)."""
    for begin in range(start, order.shape[-1], batch_size):
        yield order[..., begin:begin + batch_size]


class EpochRunner:
    """Runs one training epoch over device-resident arrays in the chosen path.

    ``stacked``: the state holds K models stacked along a leading axis and ``run`` takes K
    epoch orders, shape (K, n); the step is ``jax.vmap``-ed over the models, sharing the data."""

    def __init__(self, train_step: Callable, path: str, *, stacked: bool = False, **jit_kwargs):
        """``jit_kwargs`` (e.g. ``out_shardings``) go to every ``jax.jit`` of the runner."""
        self.path = path
        self.stacked = stacked
        self.train_step = train_step

        def gather_step(state, x_all, y_all, idx):
            return train_step(state, x_all[idx], y_all[idx])

        step = jax.vmap(gather_step, in_axes=(0, None, None, 0)) if stacked else gather_step

        def scan_steps(state, x_all, y_all, idx_batches):
            def body(s, idx):
                return step(s, x_all, y_all, idx), None

            return jax.lax.scan(body, state, idx_batches)[0]

        self._step = jax.jit(step, donate_argnums=0, **jit_kwargs)
        self._scan = jax.jit(scan_steps, donate_argnums=0, **jit_kwargs)

    def begin_epoch(self, state: TrainState) -> TrainState:
        """The state with the epoch's metric sums reset (a subclass may also place it)."""
        return state.replace(metrics=state.metrics.reset())

    def indices(self, idx: np.ndarray) -> np.ndarray | jax.Array:
        """An index batch (or a stack of them; the batch is the last axis) as the jitted calls
        take it: here the NumPy array itself, which jit transfers more cheaply than a
        ``jnp.asarray`` per batch (+8% per step for Net on CPU)."""
        return np.asarray(idx, np.int32)

    @property
    def step_fn(self) -> Callable:
        """The jitted ``(state, x_all, y_all, idx) -> state`` single step (state donated)."""
        return self._step

    def run(self, state: TrainState, x_all: jax.Array, y_all: jax.Array, order: np.ndarray, batch_size: int,
            on_batch: Callable[[int, TrainState], None] | None = None) -> TrainState:
        """Train on ``order`` (K orders when stacked) in batches of ``batch_size`` (last partial
        batch kept, like ``DataLoader(drop_last=False)``). ``on_batch(num_done, state)`` is called
        after each dispatched call (per batch on ``step``, once for the full batches on ``scan``)."""
        order = np.asarray(order, np.int32)
        full = order.shape[-1] // batch_size
        state = self.begin_epoch(state)
        done = 0
        if self.path == "scan" and full:
            batches = order[..., : full * batch_size].reshape(*order.shape[:-1], full, batch_size)
            state = self._scan(state, x_all, y_all, self.indices(np.moveaxis(batches, -2, 0)))
            done = full
            if on_batch:
                on_batch(done, state)
        for idx in index_batches(order, batch_size, start=done * batch_size):
            state = self._step(state, x_all, y_all, self.indices(idx))
            done += 1
            if on_batch:
                on_batch(done, state)
        return state


class Evaluator:
    """Ignite's evaluator with Accuracy and Loss: mean loss and accuracy over a whole split."""

    def __init__(self, graphs: Graphs, loss: str, batch_size: int = 1000):
        self.batch_size = batch_size
        self._step = jax.jit(make_eval_step(graphs, loss))

    def __call__(self, state: TrainState, x: jax.Array, y: jax.Array) -> dict[str, float]:
        total = Sums.zeros()
        for start in range(0, len(y), self.batch_size):
            total = total + self._step(state.params, state.rest, x[start:start + self.batch_size],
                                       y[start:start + self.batch_size])
        sums = {name: float(value) for name, value in total.to_host().items()}
        return {"loss": sums["loss"] / sums["count"], "accuracy": sums["correct"] / sums["count"],
                "count": int(sums["count"])}
