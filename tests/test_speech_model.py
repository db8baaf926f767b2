"""SpeechNet, the speech lab's exercise answer: shapes, parity with PyTorch, and that it learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flaxcnn.errors import InputShapeError
from flaxcnn.models.ops import global_avg_pool
from flaxcnn.models.registry import get_model
from flaxcnn.models.speech import SpeechNet
from parity.checks import check_model, flax_layer_shapes


def test_layer_shapes_and_log_probabilities():
    model = get_model("speechnet").build()
    shapes = dict(flax_layer_shapes(model, jnp.zeros((4, 1, 99, 26))))
    assert shapes["bn0"] == (4, 1, 99, 26)
    assert shapes["conv1"] == (4, 8, 99, 26)  # padding 1 keeps the size, pooling halves it
    assert shapes["conv2"] == (4, 16, 49, 13)
    assert shapes["conv3"] == (4, 32, 24, 6)
    assert shapes["conv4"] == (4, 64, 12, 3)  # no pooling after the last block
    assert shapes["drop"] == (4, 64)
    assert shapes["output"] == (4, 35)
    model.eval()
    out = model(jax.random.normal(jax.random.key(0), (3, 1, 99, 26)))
    np.testing.assert_allclose(np.exp(np.asarray(out)).sum(axis=1), 1.0, rtol=1e-5)


def test_channels_set_the_number_of_blocks():
    model = SpeechNet(10, channels=(4, 8), rngs=nnx.Rngs(0))
    model.eval()
    assert model(jnp.zeros((2, 1, 99, 26))).shape == (2, 10)
    assert hasattr(model, "bn2") and not hasattr(model, "conv3")


def test_global_avg_pool_matches_mean_over_height_and_width():
    x = jax.random.normal(jax.random.key(1), (2, 5, 3, 4))
    np.testing.assert_allclose(global_avg_pool(x), np.asarray(x).mean(axis=(1, 2)), rtol=1e-6)


def test_refuses_wrong_input_shape():
    model = get_model("speechnet").build()
    with pytest.raises(InputShapeError, match=r"\(N, 1, 99, 26\)"):
        model(jnp.zeros((2, 99, 26, 1)))


def test_parity_with_pytorch_reference():
    result = check_model(get_model("speechnet"), batch=8)
    assert result.passed, result.problems
    assert result.dropout_masks_replayed == 1


def test_overfits_a_tiny_generated_problem():
    """Two local textures (stripes along time vs along frequency, which global pooling keeps
    apart): 30 SGD steps must learn them."""
    rng = np.random.default_rng(0)
    y = np.arange(16) % 2
    x = rng.normal(0, 0.5, (16, 1, 99, 26)).astype(np.float32)
    x[y == 0, :, ::2, :] += 2.0
    x[y == 1, :, :, ::2] += 2.0
    model = SpeechNet(2, channels=(4, 8), dropout=0.0, rngs=nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(m):
            return -jnp.mean(jnp.take_along_axis(m(xs), ys[:, None], axis=1))
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    model.eval()
    assert losses[-1] < 0.5 * losses[0]
    assert float(jnp.mean(jnp.argmax(model(xs), axis=1) == ys)) == 1.0
