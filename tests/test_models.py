"""Each Flax model: output shapes, the lab's printed shapes, modes, init, registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxcnn.errors import ConfigError
from flaxcnn.models.registry import MODELS, get_model
from parity.checks import flax_layer_shapes


@pytest.mark.parametrize("name", list(MODELS))
def test_output_shape_and_finite(name):
    spec = get_model(name)
    model = spec.build(7)
    model.eval()
    out = model(jnp.ones(spec.example_shape(5)))
    assert out.shape == (5, 7)
    assert np.all(np.isfinite(out))


def test_convnet_layer_shapes_equal_the_labs_printout():
    model = get_model("convnet").build()
    shapes = dict(flax_layer_shapes(model, jnp.zeros((256, 1, 99, 26))))
    assert shapes["conv1"] == (256, 10, 90, 17)
    assert shapes["conv1_drop"] == (256, 10, 22, 4)  # after pool + ReLU, as the lab prints
    assert shapes["fc1"] == (256, 100)
    assert shapes["output"] == (256, 35)


def test_convnet_outputs_log_probabilities():
    model = get_model("convnet").build()
    model.eval()
    out = model(jax.random.normal(jax.random.key(0), (4, 1, 99, 26)))
    np.testing.assert_allclose(np.exp(np.asarray(out)).sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["net-dropout", "net-batchnorm", "convnet"])
def test_train_mode_is_random_and_eval_mode_is_not(name):
    spec = get_model(name)
    model = spec.build()
    x = jax.random.normal(jax.random.key(1), spec.example_shape(8))
    model.train()
    a, b = model(x), model(x)
    assert not np.allclose(a, b)  # dropout masks differ from call to call
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))


def test_torch_init_bounds():
    model = get_model("net").build(init="torch")
    kernel = np.asarray(model.conv1.kernel[...])
    bound = 1 / np.sqrt(3 * 3 * 3)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.8 * bound
    assert np.abs(np.asarray(model.conv1.bias[...])).max() > 0  # torch also draws biases
    flax_model = get_model("net").build(init="flax")
    np.testing.assert_array_equal(flax_model.conv1.bias[...], 0.0)


def test_same_seed_same_init_and_different_seed_differs():
    a, b, c = (get_model("net").build(seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a.fc1.kernel[...], b.fc1.kernel[...])
    assert not np.array_equal(a.fc1.kernel[...], c.fc1.kernel[...])


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError, match="net-batchnorm"):
        get_model("resnet")


def test_batchnorm_stores_unbiased_running_var_like_torch():
    from flaxcnn.models.layers import BatchNorm2d

    bn = BatchNorm2d(3)
    x = jax.random.normal(jax.random.key(0), (2, 2, 2, 3)) * 3 + 1
    bn(x)
    flat = np.asarray(x).reshape(-1, 3)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * flat.var(axis=0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(bn.mean[...], 0.1 * flat.mean(axis=0), rtol=1e-5, atol=1e-7)
    assert int(bn.num_batches_tracked[...]) == 1


def test_dropout2d_drops_whole_channels_on_4d_and_elements_on_2d():
    from flaxcnn.models.layers import Dropout2d

    layer = Dropout2d(0.5, rngs=nnx.Rngs(dropout=0))
    out = np.asarray(layer(jnp.ones((64, 4, 4, 8))))
    per_channel = out.reshape(64, 16, 8)
    assert np.all(per_channel.min(axis=1) == per_channel.max(axis=1))  # constant over H, W
    assert set(np.unique(out)) == {0.0, 2.0}
    flat = np.asarray(layer(jnp.ones((64, 128))))
    assert 0.4 < (flat == 0).mean() < 0.6
    assert len({tuple(row) for row in (flat == 0)}) > 1 and not np.all(flat.min(1) == flat.max(1))


def test_batch_norm_backward_is_the_gradient_of_its_forward():
    # the hand-written VJP against autodiff of the same forward, in float64, with cotangents on
    # all three outputs (the batch mean and variance included)
    from flaxcnn.models.layers import _bn_forward, batch_norm_train
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((8, 5, 4, 6)) * 3 + 1)
        scale, bias = jnp.asarray(rng.standard_normal(6)), jnp.asarray(rng.standard_normal(6))
        cts = (jnp.asarray(rng.standard_normal(x.shape)), jnp.asarray(rng.standard_normal(6)),
               jnp.asarray(rng.standard_normal(6)))
        ref = jax.vjp(lambda *a: _bn_forward(*a, 1e-5)[:3], x, scale, bias)[1](cts)
        ours = jax.vjp(lambda *a: batch_norm_train(*a, 1e-5), x, scale, bias)[1](cts)
        for o, r in zip(ours, ref):
            np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=1e-12, atol=1e-12)
