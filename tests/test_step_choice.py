"""The training step's variants (dispatch policies) and the whole-step choice among them."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn import kernels
from flaxcnn.models import dispatch
from flaxcnn.models.registry import get_model
from flaxcnn.train import step_choice
from flaxcnn.train.optim import sgd
from flaxcnn.train.state import create_state
from flaxcnn.train.steps import EpochRunner, make_train_step

needs_kernels = pytest.mark.skipif(jax.default_backend() != "cpu" or not kernels.available(),
                                   reason="the step variants differ only where the C++ kernels run (CPU)")
N, BATCH = 24, 8


def _session(model: str = "net"):
    spec = get_model(model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((N, *spec.input_chw)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 2, N).astype(np.int32))
    tx = sgd(1e-2, 0.9)
    graphs, state = create_state(spec.build(2, seed=0), tx)
    return EpochRunner(make_train_step(graphs, spec.loss, tx), "step"), state, x, y


def _train(runner, state, x, y):
    return jax.block_until_ready(runner.run(state, x, y, np.arange(N), BATCH))


def _layer_choices() -> set[str]:
    return {choice for layer in dispatch.used() for part, choice in layer.items() if part != "layer"}


@needs_kernels
@pytest.mark.parametrize("policy", ["kernels", "xla"])
def test_a_policy_traces_the_step_as_the_forced_setting_would(fresh_cache, policy):
    runner, state, x, y = _session()
    with dispatch.recording() as record:
        runner._variants[policy].trace(state, x, y, np.arange(BATCH, dtype=np.int32))
    assert record, "nothing was dispatched"
    if policy == "xla":
        assert "cpp" not in record.values()
    else:  # every part the C++ kernels have is theirs, as under --conv-impl kernels
        dispatch.clear_memory()
        dispatch.set_mode("kernels")
        with dispatch.recording() as forced:
            runner._variants["measured"].trace(state, x, y, np.arange(BATCH, dtype=np.int32))
        assert {k for k, v in record.items() if v == "cpp"} == {k for k, v in forced.items() if v == "cpp"}


@needs_kernels
def test_the_fastest_variant_runs_and_the_choice_is_cached(fresh_cache):
    entry = {"choice": "xla", "ms": {"measured": 2.0, "xla": 1.0}, "same_as": {}}
    with mock.patch.object(step_choice, "_measure", return_value=entry) as measure:
        runner, state, x, y = _session()
        trained = _train(runner, state, x, y)
    assert measure.call_count == 1 and "cpp" not in _layer_choices()
    assert dispatch.summary()["training_steps"] == [entry]
    # a new process with the same cache reads the choice and runs the same variant: the same bits
    dispatch.clear_memory()
    with mock.patch.object(step_choice, "_measure", side_effect=AssertionError("timed again")):
        runner, state, x, y = _session()
        again = _train(runner, state, x, y)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(again.params)))


@needs_kernels
def test_timing_the_variants_picks_the_fastest_measured(fresh_cache):
    runner, state, x, y = _session()
    _train(runner, state, x, y)
    [entry] = dispatch.summary()["training_steps"]
    assert set(entry["ms"]) <= set(dispatch.POLICIES) and len(entry["ms"]) >= 2
    assert set(entry["relative"]) == set(entry["ms"]) and min(entry["relative"].values()) >= 1.0
    assert entry["choice"] == min(entry["relative"], key=entry["relative"].get)
    assert entry["rounds"] >= step_choice.MIN_ROUNDS
    assert dispatch.cached(entry["step"]) == entry


@pytest.mark.parametrize("mode", ["kernels", "xla"])
def test_a_forced_setting_times_no_variants(fresh_cache, mode):
    dispatch.set_mode(mode)
    with mock.patch.object(step_choice, "_measure", side_effect=AssertionError("timed")):
        runner, state, x, y = _session()
        _train(runner, state, x, y)
    assert dispatch.summary()["training_steps"] == []


def test_an_unknown_policy_is_refused():
    with pytest.raises(dispatch.DispatchConfigError, match="policy must be one of measured, kernels, xla"):
        with dispatch.policy("fastest"):
            pass


@needs_kernels
@pytest.mark.parametrize("planned_steps, timed", [(3, False), (10**9, True)])
def test_variants_are_timed_only_where_it_repays_itself(fresh_cache, planned_steps, timed):
    entry = {"choice": "kernels", "ms": {"measured": 2.0, "kernels": 1.0}, "same_as": {}}
    runner, state, x, y = _session()
    runner.planned_steps = planned_steps
    with mock.patch.object(step_choice, "_measure", return_value=entry) as measure:
        _train(runner, state, x, y)
    assert measure.called == timed
    assert dispatch.summary()["training_steps"] == ([entry] if timed else [])
