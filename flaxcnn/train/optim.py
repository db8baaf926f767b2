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


def set_learning_rate(opt_state, lr: float | jax.Array):
    opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    return opt_state


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
