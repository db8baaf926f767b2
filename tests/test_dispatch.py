"""Measured dispatch of CPU convolutions and pools: choices, cache, settings, records."""

import json
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from flaxcnn import kernels
from flaxcnn.models import dispatch, ops

on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="dispatch measures CPU implementations")


def _conv(x, w):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ops.NHWC_HWIO)
    return ops.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)


def _train_pass(x, w):
    return jax.grad(lambda a, b: jnp.sum(jnp.tanh(ops.max_pool(_conv(a, b), 2))), argnums=(0, 1))(x, w)


@on_cpu
def test_a_new_layer_is_measured_once_and_cached(fresh_cache):
    x, w = jnp.ones((4, 8, 8, 16)), jnp.ones((3, 3, 16, 8))
    with mock.patch.object(dispatch, "measure", wraps=dispatch.measure) as measure:
        jax.jit(_train_pass)(x, w)
        first = measure.call_count
        jax.jit(lambda a, b: _train_pass(a, b)).lower(x, w)  # traced again: cached choices, no measurement
        assert measure.call_count == first
    assert first == (5 if dispatch.mode() == "auto" and kernels.available() else first)  # 3 conv parts + 2 pool
    saved = json.loads(dispatch.cache_path().read_text())
    for entry in saved.values():
        assert entry["choice"] in entry["ms"] and entry["choice"] == min(entry["ms"], key=entry["ms"].get)
    # a new process (memory forgotten) reads the file instead of measuring
    dispatch.clear_memory()
    with mock.patch.object(dispatch, "measure", side_effect=AssertionError("measured again")):
        jax.jit(lambda a, b: _train_pass(a, b)).lower(x, w)


@on_cpu
def test_same_cache_same_choices_same_bits(fresh_cache):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 8, 8, 16)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 8)).astype(np.float32))
    first = [np.asarray(g) for g in jax.jit(_train_pass)(x, w)]
    used = dispatch.used()
    dispatch.clear_memory()
    again = [np.asarray(g) for g in jax.jit(lambda a, b: _train_pass(a, b))(x, w)]  # traced anew
    assert dispatch.used() == used
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


@on_cpu
def test_the_setting_forces_kernels_or_xla(fresh_cache):
    x, w = jnp.ones((4, 8, 8, 16)), jnp.ones((3, 3, 16, 8))
    dispatch.set_mode("xla")
    jax.jit(_train_pass)(x, w)
    assert all(choice != "cpp" for layer in dispatch.used() for name, choice in layer.items() if name != "layer")
    if not kernels.available():
        return
    dispatch.clear_memory()
    dispatch.set_mode("kernels")
    with mock.patch.object(dispatch, "measure", side_effect=AssertionError("kernels: nothing to measure")):
        jax.jit(lambda a, b: _train_pass(a, b))(x, w)
    assert all(choice == "cpp" for layer in dispatch.used() for name, choice in layer.items() if name != "layer")
    assert dispatch.summary()["conv_impl"] == "kernels"


def test_a_wrong_setting_is_a_clear_error(monkeypatch):
    with pytest.raises(dispatch.DispatchConfigError, match="auto, kernels, xla"):
        dispatch.set_mode("fastest")
    monkeypatch.setenv("FLAXCNN_CONV_IMPL", "gpu")
    with pytest.raises(dispatch.DispatchConfigError, match="FLAXCNN_CONV_IMPL"):
        dispatch.mode()


def test_switched_off_inside_the_block_only():
    with dispatch.switched_off():
        assert dispatch.conv_layer((2, 8, 8, 3), (3, 3, 3, 16), ((1, 1), (1, 1)), jnp.float32, None) is None
        assert dispatch.pool_layer((2, 8, 8, 3), 2, jnp.float32) is None
    assert dispatch.conv_layer((2, 8, 8, 3), (3, 3, 3, 16), ((1, 1), (1, 1)), jnp.float32, None) is not None
    assert dispatch.conv_layer((2, 8, 8, 3), (3, 3, 3, 16), ((1, 1), (1, 1)), jnp.bfloat16, None) is None


@on_cpu
def test_the_sharded_step_is_traced_with_xla_convolutions(fresh_cache):
    # XLA's partitioner cannot split a custom call: over a mesh it would gather the whole batch
    from jax.sharding import Mesh

    from flaxcnn.train.distributed import DATA_AXIS, Placement, ShardedEpochRunner

    def step(state, x, y):
        return state + jnp.sum(_conv(x, jnp.ones((3, 3, 3, 16))))

    placement = Placement(Mesh(np.array(jax.devices()[:1]), (DATA_AXIS,)))
    runner = ShardedEpochRunner(step, "step", placement)
    x = jnp.ones((4, 8, 8, 3))
    text = runner.step_fn.lower(jnp.zeros(()), x, jnp.zeros((4,), jnp.int32), np.arange(2, dtype=np.int32)).as_text()
    assert "flaxcnn_" not in text and dispatch.used() == []


def test_every_batch_size_shares_one_measurement():
    assert {dispatch.batch_class(n) for n in (1, 24, 64, 65, 200, 1000)} == {dispatch.MEASURED_BATCH}


@on_cpu
def test_a_gpu_host_does_not_measure_cpu_code_it_will_not_run(fresh_cache):
    layer = dispatch.ConvLayer(4, 8, 8, (3, 3, 16, 8), ((1, 1), (1, 1)), None, None)
    with mock.patch.object(jax, "default_backend", return_value="gpu"), \
            mock.patch.object(dispatch, "measure", side_effect=AssertionError("measured")):
        assert dispatch.choose(layer, "forward", ops.FORWARD) == "xla"
