"""SGD as the labs use it, in Optax, and the loss functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def sgd(lr: float | optax.Schedule, momentum: float = 0.0, weight_decay: float = 0.0
        ) -> optax.GradientTransformation:
    """``torch.optim.SGD(lr, momentum, weight_decay)`` (dampening 0, no Nesterov).

    torch adds ``weight_decay * p`` to the gradient *before* the momentum buffer, which is
    ``add_decayed_weights`` chained in front of ``optax.sgd``. optax's trace starts at zero,
    so its first step equals torch's (whose buffer starts as a copy of the first gradient).
    The learning rate is an injected hyperparameter so the LR finder can sweep it; it may also
    be an optax schedule (a function of the step count).
    """

    def make(learning_rate):
        parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
        parts.append(optax.sgd(learning_rate, momentum=momentum or None))
        return optax.chain(*parts)

    return optax.inject_hyperparams(make)(learning_rate=lr)


def stackable_sgd(lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """:func:`sgd` with the weight decay injected too, so that both the learning rate and the
    weight decay are values in the optimizer state: K states of different settings stack into
    one and a single compiled step serves them all (``add_decayed_weights(0)`` adds exactly 0)."""

    def make(learning_rate, weight_decay):
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum or None))

    return optax.inject_hyperparams(make)(learning_rate=lr, weight_decay=weight_decay)


#: The named parts of an :func:`sgd` / :func:`stackable_sgd` state that hold values: the step
#: count, the injected learning rate and (with momentum) the momentum buffer, by optax's public
#: field names (``InjectHyperparamsState.count``, its ``hyperparams`` key, ``TraceState.trace``).
SGD_STATE_PARTS = ("count", "learning_rate", "trace")


def transplant(source, template):
    """``template``'s optimizer state, with each of :data:`SGD_STATE_PARTS` it holds taken from
    ``source``: a :func:`stackable_sgd` state in the layout ``sgd(lr, momentum, weight_decay)``
    saves (found by name with ``optax.tree_utils``; no assumption on how optax nests them)."""
    for name in SGD_STATE_PARTS:  # one by one: tree_set misses a trace set together with the count
        if optax.tree_utils.tree_get(template, name) is not None:
            template = optax.tree_utils.tree_set(template, **{name: optax.tree_utils.tree_get(source, name)})
    return template


def learning_rate_of(opt_state) -> jax.Array:
    """The learning rate the next step uses (an injected hyperparameter of :func:`sgd`)."""
    return opt_state.hyperparams["learning_rate"]


def set_learning_rate(opt_state, lr: float | jax.Array):
    """A copy of ``opt_state`` whose next step uses ``lr`` (the LR finder's sweep)."""
    return optax.tree_utils.tree_set(opt_state, lambda _, value: hasattr(value, "dtype"),  # not a schedule's state
                                     learning_rate=jnp.asarray(lr, jnp.float32))


def per_example_loss(kind: str, outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """``cross_entropy`` on logits (lab 8's ``nn.CrossEntropyLoss``) or ``nll`` on log-probabilities
    (the speech lab's ``nn.NLLLoss`` after ``log_softmax``)."""
    if kind == "nll":
        return -jnp.take_along_axis(outputs, labels[:, None], axis=1)[:, 0]
    return optax.softmax_cross_entropy_with_integer_labels(outputs, labels)


def l2_penalty(params) -> jax.Array:
    """Lab 8's ``sum(torch.norm(p, 2) for p in model.parameters())``: the plain (not squared) L2
    norm of each parameter tensor, summed. ``optax.safe_norm`` gives gradient 0 at a zero
    tensor, as torch's norm backward does (a plain sqrt would give NaN)."""
    return sum(optax.safe_norm(p, 0.0) for p in jax.tree.leaves(params))


def learning_rate(base: float, schedule: str, total_steps: int) -> float | optax.Schedule:
    """``constant``: ``base``; ``cosine``: cosine decay from ``base`` to 0 over ``total_steps``."""
    if schedule == "cosine":
        return optax.cosine_decay_schedule(base, decay_steps=max(total_steps, 1))
    return base
