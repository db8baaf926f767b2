"""ReLU decisions made by rounding: recorded on both sides, replayed only within tolerance of zero."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx

from flaxcnn import convert
from flaxcnn.models.nn import ReLU
from flaxcnn.models.registry import get_model
from parity.checks import check_model
from parity.relu_decisions import (
    Calls,
    decisions_to_replay,
    record_flax_relu_inputs,
    record_torch_relu_inputs,
    replay_torch_relu_decisions,
)


def test_only_sign_differences_within_the_band_are_replayed():
    torch_in = [np.array([[4.0, 2e-6, -3e-6, 0.5, -1.0]], np.float32)]
    flax_in = [np.array([[4.0, -1e-6, 2e-6, -0.5, -1.0]], np.float32)]
    # band = 1e-6 + 1e-5 * 4 = 4.1e-5: elements 1 and 2 differ within it, element 3 far beyond it
    replay = decisions_to_replay(torch_in, flax_in, atol=1e-6, rtol=1e-5)
    assert replay.tolerated == 2 and replay.beyond_tolerance == 1
    assert replay.largest_beyond == 0.5
    np.testing.assert_array_equal(replay.where[0], [[False, True, True, False, False]])
    np.testing.assert_array_equal(replay.passes[0], [[True, False, True, False, False]])


def test_calls_that_do_not_pair_are_named_not_replayed():
    one = np.zeros((2, 3), np.float32)
    assert "PyTorch made 1 ReLU calls, flaxcnn 2" in decisions_to_replay([one], [one, one], atol=0, rtol=0).unpaired
    other = decisions_to_replay([one], [np.zeros((3, 2), np.float32)], atol=0, rtol=0)
    assert "ReLU call 0" in other.unpaired and other.tolerated == 0 and other.where == []


def test_torch_relus_are_recorded_and_take_the_replayed_decision():
    x = torch.tensor([[1.0, -1e-7, 1e-7, -2.0]], requires_grad=True)
    relu_module = torch.nn.ReLU()
    with record_torch_relu_inputs() as seen:
        F.relu(x).sum()
        relu_module(x * 2)
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[1], 2 * x.detach().numpy())

    replay = decisions_to_replay([x.detach().numpy()], [np.array([[1.0, 1e-7, -1e-7, -2.0]], np.float32)],
                                 atol=1e-6, rtol=0.0)
    assert replay.tolerated == 2
    with replay_torch_relu_decisions(replay):
        out = F.relu(x)
    out.sum().backward()
    # element 1 now passes its gradient (flaxcnn's decision), element 2 blocks it; the values stay PyTorch's
    np.testing.assert_array_equal(x.grad.numpy(), [[1.0, 1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(out.detach().numpy(), F.relu(x).detach().numpy())


def test_relu6_and_hardswish_decisions_at_their_upper_kinks_are_replayed():
    x = torch.tensor([[6.0 + 1e-6, 6.0 - 1e-6, 3.0, 3.0 + 2e-6, 2.0]], requires_grad=True)
    with record_torch_relu_inputs() as seen:
        torch.nn.ReLU6(inplace=False)(x.clone())
        F.hardswish(x - 3.0 + 3.0)
    assert seen.kinks == [(0.0, 6.0), (-3.0, 3.0)]
    flax_side = [np.array([[6.0 - 1e-6, 6.0 + 1e-6, 3.0, 3.0, 2.0]], np.float32),
                 np.array([[6.0, 6.0, 3.0 + 1e-6, 3.0 - 1e-6, 2.0]], np.float32)]
    flax_calls = Calls()
    for value, kinks in zip(flax_side, seen.kinks):
        flax_calls.add(value, kinks)
    replay = decisions_to_replay(seen, flax_calls, atol=1e-5, rtol=0.0)
    # ReLU6: elements 0 and 1 cross 6; Hardswish: elements 2 and 3 cross 3 (elements 0 and 1 are past it on both sides)
    assert replay.tolerated == 4 and replay.beyond_tolerance == 0
    with replay_torch_relu_decisions(replay):
        (torch.nn.ReLU6()(x) + F.hardswish(x)).sum().backward()
    middle = ((2 * x.detach() + 3) / 6).numpy()[0]  # Hardswish's derivative between its kinks
    relu6 = [1.0, 0.0, 1.0, 1.0, 1.0]  # elements 0 and 1 as the Flax side decided them
    hardswish = [1.0, 1.0, 1.0, middle[3], middle[4]]  # elements 2 and 3 as the Flax side decided them
    expected = np.array([relu6]) + np.array([hardswish])
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-6)


def test_kinks_that_do_not_match_are_named_not_replayed():
    one = np.zeros((1, 2), np.float32)
    torch_calls, flax_calls = Calls(), Calls()
    torch_calls.add(one, (0.0, 6.0))
    flax_calls.add(one, (0.0,))
    replay = decisions_to_replay(torch_calls, flax_calls, atol=0, rtol=0)
    assert "kinks at (0.0, 6.0)" in replay.unpaired and replay.tolerated == 0


def test_flax_kinked_layers_are_recorded_with_their_kinks():
    from flaxcnn.models.nn import Hardswish, LeakyReLU, ReLU6

    class Tiny(nnx.Module):
        def __init__(self):
            self.a, self.b, self.c = ReLU6(), Hardswish(), LeakyReLU(0.2)

        def __call__(self, x):
            return self.c(self.b(self.a(x)))

    model = Tiny()
    with record_flax_relu_inputs(model) as seen:
        nnx.jit(lambda m, v: m(v))(model, jnp.ones((2, 3)))
    assert len(seen) == 3 and seen.kinks == [(0.0, 6.0), (-3.0, 3.0), (0.0,)]


def test_flax_relus_are_recorded_under_value_and_grad_in_nchw():
    class Tiny(nnx.Module):
        def __init__(self):
            self.scale = nnx.Param(jnp.ones(()))
            self.relu = ReLU()

        def __call__(self, x):
            return self.relu(self.scale * x).sum() + jax.nn.relu(x).sum()  # the inline call has no seam

    x = jnp.arange(24, dtype=jnp.float32).reshape(1, 2, 3, 4) - 10.0  # NHWC
    model = Tiny()
    with record_flax_relu_inputs(model) as seen:
        nnx.value_and_grad(lambda m: m(x))(model)
    assert len(seen) == 1 and seen[0].shape == (1, 4, 2, 3)
    np.testing.assert_array_equal(seen[0], np.transpose(np.asarray(x), (0, 3, 1, 2)))
    assert model.relu.tap is None  # the seam is put back after the block
    with record_flax_relu_inputs(model) as seen_jitted:
        nnx.jit(lambda m: m(x))(model)
    assert len(seen_jitted) == 1


def test_a_conversion_that_moves_relu_inputs_is_not_excused():
    def shifted_bn_bias(model, state_dict):
        state_dict = dict(state_dict)
        state_dict["s1b1_bn1.bias"] = state_dict["s1b1_bn1.bias"] + 0.1
        return convert.load_torch_state_dict(model, state_dict)

    result = check_model(get_model("speechresnet"), batch=4, converter=shifted_bn_bias)
    assert not result.passed
    assert any("ReLU decisions differ beyond tolerance" in p for p in result.problems)
    assert result.grad_max_abs_diff > 1e-5


class _TinyTorch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class _TinyFlax(nnx.Module):
    """The port, shifted by ``shift`` before its ReLU: a forward difference of that size."""

    def __init__(self, torch_model: _TinyTorch, shift: float):
        self.shift = shift
        self.relu = ReLU()
        self.fc1, self.fc2 = nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        for name in ("fc1", "fc2"):
            layer, source = getattr(self, name), getattr(torch_model, name)
            layer.kernel[...] = jnp.asarray(source.weight.detach().numpy().T)
            layer.bias[...] = jnp.asarray(source.bias.detach().numpy())

    def __call__(self, x):
        return self.fc2(self.relu(self.fc1(x) + self.shift))


def _tiny_pair(shift: float):
    torch.manual_seed(0)
    tmodel = _TinyTorch()
    with torch.no_grad():  # the first hidden unit's input is exactly 0 in PyTorch: it blocks its gradient
        tmodel.fc1.weight[0] = 0.0
        tmodel.fc1.bias[0] = 0.0
    return tmodel, _TinyFlax(tmodel, shift)


def test_the_layer_report_replays_a_decision_made_by_rounding_and_not_a_real_difference():
    from parity.layers import compare_layers

    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    y = np.array([0, 1, 1, 0, 1])
    tmodel, fmodel = _tiny_pair(shift=1e-7)  # within tolerance: the port passes that unit's gradient
    report = compare_layers(tmodel, fmodel, x, y)
    assert report.passed and report.relu_decisions_replayed == 5, report.format()
    assert "5 ReLU decision(s) made by rounding" in report.format()

    tmodel, fmodel = _tiny_pair(shift=1e-3)  # beyond tolerance: a real difference, reported
    report = compare_layers(tmodel, fmodel, x, y)
    assert not report.passed and report.relu_decisions_replayed == 0
    assert "differ beyond tolerance of zero" in report.format()
