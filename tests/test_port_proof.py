"""The port's proof passes on equal modules, in float32 and float64, and fails on planted bugs, naming the layer."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as tnn
from flax import nnx

from flaxcnn import convert
from flaxcnn.models import nn as N
from flaxcnn.models.registry import get_model
from flaxcnn.port.draws import DrawMismatchError, Draw, UnreplayableDrawError
from flaxcnn.port.proof import DTYPES, PARTS, TOLERANCES, Proof, TensorDiff, choose_loss, prove, train_step


# ------------------------------------------------------------------------------- hand-written pairs


class TorchSmall(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = tnn.BatchNorm2d(4)
        self.relu = tnn.ReLU()
        self.pool = tnn.MaxPool2d(2)
        self.conv2 = tnn.Conv2d(4, 4, 3, padding=1)
        self.drop = tnn.Dropout(0.25)
        self.fc = tnn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.relu(self.conv2(x))
        return self.fc(self.drop(torch.flatten(x, 1)))


class FlaxSmall(nnx.Module):
    """TorchSmall with flaxcnn's layers, attribute by attribute."""

    def __init__(self, dtype=jnp.float32, *, dropout=None, rngs: nnx.Rngs):
        self.conv1 = N.Conv2d(3, 4, 3, padding=1, dtype=dtype, rngs=rngs)
        self.bn1 = N.BatchNorm2d(4, dtype=dtype)
        self.relu = N.ReLU()
        self.pool = N.MaxPool2d(2)
        self.conv2 = N.Conv2d(4, 4, 3, padding=1, dtype=dtype, rngs=rngs)
        self.drop = dropout if dropout is not None else N.Dropout(0.25, rngs=rngs)
        self.flatten = N.Flatten()
        self.fc = N.Linear(4 * 4 * 4, 5, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = N.nchw_to_nhwc(x)
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.relu(self.conv2(x))
        return self.fc(self.drop(self.flatten(x)))


def _input(shape=(6, 3, 8, 8), seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _small_pair(plant=None):
    torch.manual_seed(0)
    tmodel = TorchSmall()

    def build(dtype):
        model = FlaxSmall(dtype, rngs=nnx.Rngs(0))
        model = convert.load_torch_state_dict(model, tmodel.state_dict())
        return plant(model) if plant is not None else model

    return tmodel, build


def _assert_within_tolerances(proof: Proof):
    for dtype in DTYPES:
        for part in PARTS:
            row = proof.parts[dtype][part]
            assert row["tol"] == TOLERANCES[dtype][part]
            assert row["ratio"] <= row["tol"], (dtype, part, row)
            assert row["passed"]
            if row["max_abs_ref"] > 0:  # the metric, literally
                assert row["max_abs_diff"] / row["max_abs_ref"] <= row["tol"], (dtype, part, row)


@pytest.fixture(scope="module")
def small_proof():
    """The hand-written pair's proof, with the torch module's state before it ran."""
    tmodel, build = _small_pair()
    before = {k: v.clone() for k, v in tmodel.state_dict().items()}
    return tmodel, before, prove(tmodel, build, _input())


def test_a_hand_written_port_passes_in_both_dtypes(small_proof):
    tmodel, before, proof = small_proof
    assert proof.passed, proof.format()
    assert proof.first_divergent_layer is None and proof.loss == "cross_entropy"
    _assert_within_tolerances(proof)
    assert TOLERANCES["float64"]["grads"] == 1e-10 and TOLERANCES["float32"]["grads"] == 1e-4
    assert TOLERANCES["float32"]["forward"] == 1e-5 and TOLERANCES["float32"]["buffers"] == 1e-5
    # every tensor took part: the worst buffer is a BatchNorm statistic, the worst step a real change
    assert proof.parts["float32"]["buffers"]["tensor"].startswith("bn1.")
    assert proof.parts["float64"]["forward"]["ratio"] < 1e-13  # float64 really ran in float64
    # the torch module is not modified
    assert tmodel.training and all(torch.equal(v, before[k]) for k, v in tmodel.state_dict().items())
    text = proof.format()
    assert "first divergent layer: none" in text and "verdict: passed" in text
    assert sum(line.endswith("PASS") for line in text.splitlines()) == 10 and "FAIL" not in text


def test_as_json_holds_what_parity_json_needs(small_proof):
    data = small_proof[2].as_json()
    assert {"passed", "first_divergent_layer", "loss", "float32", "float64", "tolerances"} <= set(data)
    for dtype in DTYPES:
        assert set(data[dtype]) == set(PARTS)
        for row in data[dtype].values():
            assert {"max_abs_diff", "max_abs_ref", "tensor", "ratio", "tol", "passed"} <= set(row)
    assert data["tolerances"]["float64"]["steps"] == 1e-10
    assert data["passed"] is True and data["first_divergent_layer"] is None
    assert data["settings"] == {"steps": 3, "lr": 0.01, "seed": 0}
    assert data["float32_allowance"] == {"pytorch_error_factor": 2.0, "parts": ["grads", "steps"]}
    assert all(row["within_pytorch_error"] is None for dtype in DTYPES for row in data[dtype].values())
    assert json.loads(json.dumps(data, allow_nan=False)) == data



def test_float32_accuracy_is_measured_against_pytorchs_float64_run(small_proof):
    accuracy = small_proof[2].float32_vs_float64
    assert set(accuracy) == {"grads", "steps"}
    for row in accuracy.values():
        # both float32 sides are near the exact (float64) result of this small network, and not exactly on it
        assert 0 < row["port"] < 1e-4 and 0 < row["pytorch"] < 1e-4, row
        assert row["port_tensor"] and row["pytorch_tensor"]
    assert "float32 against PyTorch's float64 run" in small_proof[2].format()
    assert small_proof[2].as_json()["float32_vs_float64"]["grads"]["port"] == accuracy["grads"]["port"]


# ------------------------------------------------------------------------------- registered mirrors


def _in_dtype(model: nnx.Module, dtype) -> nnx.Module:
    """A registered model's floating-point variables cast to ``dtype`` (its layers compute in
    their variables' dtype; its float32 input cast is exact for a float32 example input)."""
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state))
    return model


@pytest.mark.filterwarnings("ignore:dropout2d:UserWarning")  # NetDropout's Dropout2d on 2-D, the lab's own
@pytest.mark.parametrize("name", ["net-dropout", "net-batchnorm"])
def test_registered_mirrors_pass(name):
    spec = get_model(name)
    torch.manual_seed(0)
    tmodel = spec.build_torch()

    def build(dtype):
        return convert.load_torch_state_dict(_in_dtype(spec.build(seed=0), dtype), tmodel.state_dict())

    proof = prove(tmodel, build, _input(spec.example_shape(4)), steps=2)
    assert proof.passed, proof.format()
    _assert_within_tolerances(proof)


# ------------------------------------------------------------------------------- planted bugs


def _kernel_transposed(model):
    model.conv2.kernel[...] = jnp.swapaxes(model.conv2.kernel[...], 0, 1)  # kh <-> kw
    return model


def _momentum_changed(model):
    model.bn1.momentum = 0.2
    return model


def _mask_not_replayed(model):
    model.drop = nnx.Dropout(0.25, rngs=nnx.Rngs(dropout=3))  # Flax's own: draws its own masks
    return model


@pytest.mark.parametrize("plant, layer, failing", [
    (_kernel_transposed, "conv2", "forward"),
    (_momentum_changed, "bn1", "buffers"),
    (_mask_not_replayed, "drop", "train_forward"),
])
def test_a_planted_bug_fails_and_names_the_layer(plant, layer, failing):
    tmodel, build = _small_pair(plant)
    proof = prove(tmodel, build, _input(), steps=2)
    assert not proof.passed
    assert proof.first_divergent_layer == layer, proof.format()
    for dtype in DTYPES:
        assert not proof.parts[dtype][failing]["passed"]
    if plant is _momentum_changed:  # only the statistics differ
        assert all(proof.parts[d][p]["passed"] for d in DTYPES for p in ("forward", "train_forward", "grads"))
    if plant is _mask_not_replayed:
        assert any("replayed 0" in note for note in proof.notes), proof.notes
    assert f"first divergent layer: {layer}" in proof.format()


def test_a_port_that_is_not_float64_end_to_end_fails_in_float64():
    torch.manual_seed(0)
    tmodel = TorchSmall()

    def build_float32_always(dtype):
        return convert.load_torch_state_dict(FlaxSmall(jnp.float32, rngs=nnx.Rngs(0)), tmodel.state_dict())

    proof = prove(tmodel, build_float32_always, _input(), steps=1)
    assert all(proof.parts["float32"][p]["passed"] for p in PARTS)
    assert not proof.parts["float64"]["forward"]["passed"] and not proof.passed
    assert proof.parts["float64"]["forward"]["ratio"] > 1e-9  # float32 rounding
    assert any("output is float32, not float64" in note for note in proof.notes), proof.notes
    assert proof.first_divergent_layer is not None


# ------------------------------------------------------------------------------- stochastic depth


class TorchStochasticDepth(tnn.Module):
    """A residual block with torchvision-style stochastic depth (survival 0.8), then a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv2d(3, 3, 3, padding=1)
        self.fc = tnn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        out = torch.tanh(self.conv(x))
        if self.training:
            keep = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype).bernoulli_(0.8)
            out = out * keep / 0.8
        x = x + out
        return torch.log_softmax(self.fc(torch.flatten(x, 1)), dim=1)


class FlaxStochasticDepth(nnx.Module):
    def __init__(self, dtype=jnp.float32, *, rngs: nnx.Rngs):
        self.conv = N.Conv2d(3, 3, 3, padding=1, dtype=dtype, rngs=rngs)
        self.fc = N.Linear(3 * 4 * 4, 4, dtype=dtype, rngs=rngs)
        self.keep = N.Bernoulli(rngs=rngs)
        self.flatten = N.Flatten()
        self.deterministic = False  # set by .train() / .eval()

    def __call__(self, x):
        x = N.nchw_to_nhwc(x)
        out = jnp.tanh(self.conv(x))
        if not self.deterministic:
            out = out * self.keep((x.shape[0], 1, 1, 1), 0.8, x.dtype) / 0.8
        x = x + out
        return jax.nn.log_softmax(self.fc(self.flatten(x)), axis=1)


def test_stochastic_depth_passes_with_its_draws_replayed():
    torch.manual_seed(0)
    tmodel = TorchStochasticDepth()

    def build(dtype):
        return convert.load_torch_state_dict(FlaxStochasticDepth(dtype, rngs=nnx.Rngs(0)), tmodel.state_dict())

    x = _input((16, 3, 4, 4))
    proof = prove(tmodel, build, x, steps=2)
    assert proof.passed, proof.format()
    assert proof.loss == "nll"
    _assert_within_tolerances(proof)
    # the draws mattered: without them (eval mode) the outputs differ
    assert proof.parts["float32"]["train_forward"]["max_abs_ref"] != proof.parts["float32"]["forward"]["max_abs_ref"]


# ------------------------------------------------------------------------------- jitted replay


def test_the_jitted_step_takes_each_steps_masks_as_arguments():
    """A replay fixed at trace time would repeat the first mask: here two masks give two results,
    from one trace."""
    model = FlaxSmall(rngs=nnx.Rngs(0))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    taken = []
    step = train_step(graphdef, "cross_entropy", 0.01, on_trace=lambda used, given: taken.append((used, given)))
    x = jnp.asarray(_input())
    y = jnp.asarray(np.arange(6) % 5, jnp.int32)
    rng = np.random.default_rng(0)
    masks = [rng.random((6, 64)) < 0.75 for _ in range(2)]
    assert not np.array_equal(masks[0], masks[1])
    outs = [step(params, rest, [jnp.asarray(m)], x, y) for m in (masks[0], masks[1], masks[0])]
    # traced once, the one dropout took the mask. (Not also ``step._cache_size() == 1``: that is
    # jax's private dispatch-cache counter, and it read 0 after these three calls in one random
    # order of the whole suite, with the trace count still 1.)
    assert taken == [(1, 1)]
    out_a, out_b, out_a_again = (np.asarray(o[2]) for o in outs)
    assert not np.allclose(out_a, out_b)
    np.testing.assert_array_equal(out_a, out_a_again)
    ga, gb = (np.asarray(o[3]["fc"]["kernel"][...]) for o in outs[:2])
    # fc's input features that the mask dropped get no gradient: each step's own mask
    for g, m in zip((ga, gb), masks):
        dropped_everywhere = ~m.any(axis=0)
        assert np.all(g[dropped_everywhere] == 0)
        assert np.any(g[~dropped_everywhere] != 0)


@pytest.mark.parametrize("draw", [
    lambda x: tnn.functional.dropout(x, 0.3),
    lambda x: tnn.Dropout2d(0.5)(x),
    lambda x: x * torch.empty(x.shape[0], 1, 1, 1).bernoulli_(0.8),
])
def test_torch_draws_give_torchs_own_result(draw):
    """From the same seed, the intercepted draw is bit for bit what PyTorch's own kernel gives."""
    from flaxcnn.port.draws import TorchDraws

    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    ref = draw(x)
    with TorchDraws(torch.Generator().manual_seed(7)) as mode:
        ours = draw(x)
    assert torch.equal(ref, ours) and len(mode.draws) == 1


def test_draw_layout_for_the_nnx_side():
    mask = np.zeros((2, 3, 1, 1), bool)
    mask[0, 1] = True
    assert Draw("F.dropout2d", mask).nnx_layout().shape == (2, 1, 1, 3)
    assert Draw("F.dropout2d", mask).nnx_layout()[0, 0, 0, 1]
    assert Draw("F.dropout", np.ones((2, 5), bool)).nnx_layout().shape == (2, 5)


# ------------------------------------------------------------------------------- errors and the loss


def test_a_draw_of_another_shape_is_an_error_naming_the_layer():
    with pytest.raises(DrawMismatchError, match=r"drop \(Dropout2d\).*\(6, 1, 1, 2\).*\(6, 8, 8, 2\)"):
        prove(_Conv4dDropout(), _build_conv4d_dropout2d, _input(), steps=1)


class _Conv4dDropout(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv2d(3, 2, 1)
        self.drop = tnn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.conv(x)).mean(dim=(2, 3))


def _build_conv4d_dropout2d(dtype):
    class Port(nnx.Module):
        def __init__(self):
            self.conv = N.Conv2d(3, 2, 1, dtype=dtype, rngs=nnx.Rngs(0))
            self.drop = N.Dropout2d(0.5, rngs=nnx.Rngs(1))  # a channel mask where torch drops elements

        def __call__(self, x):
            return jnp.mean(self.drop(self.conv(N.nchw_to_nhwc(x))), axis=(1, 2))

    return Port()


def test_an_unreplayable_draw_is_refused():
    class Noisy(tnn.Module):
        def forward(self, x):
            return (x + torch.randn_like(x)).flatten(1)

    with pytest.raises(UnreplayableDrawError, match="torch.randn_like"):
        prove(Noisy(), lambda dtype: None, _input(), steps=1)


def test_choose_loss_follows_the_output():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    assert choose_loss(logits) == "cross_entropy"
    assert choose_loss(torch.log_softmax(logits, dim=1)) == "nll"
    assert choose_loss(torch.log_softmax(logits, dim=1).double()) == "nll"
    assert choose_loss(torch.softmax(logits, dim=1)) == "cross_entropy"
    assert choose_loss(torch.zeros(2, 1, 8, 8)) == "mse"
    assert choose_loss(torch.zeros(4)) == "mse"


# ------------------------------------------------------------------------------- a per-pixel output (MSE)


class TorchSegment(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = tnn.BatchNorm2d(4)
        self.pool = tnn.AvgPool2d(3, stride=1, padding=1)
        self.conv2 = tnn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv2(self.pool(torch.relu(self.bn1(self.conv1(x)))))


class FlaxSegment(nnx.Module):
    def __init__(self, dtype=jnp.float32, *, count_include_pad=True, rngs: nnx.Rngs):
        self.conv1 = N.Conv2d(3, 4, 3, padding=1, dtype=dtype, rngs=rngs)
        self.bn1 = N.BatchNorm2d(4, dtype=dtype)
        self.pool = N.AvgPool2d(3, stride=1, padding=1, count_include_pad=count_include_pad)
        self.conv2 = N.Conv2d(4, 2, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        out = self.conv2(self.pool(jax.nn.relu(self.bn1(self.conv1(N.nchw_to_nhwc(x))))))
        return N.nhwc_to_nchw(out)


@pytest.mark.parametrize("count_include_pad", [True, False])
def test_a_per_pixel_output_is_proven_with_mse(count_include_pad):
    torch.manual_seed(0)
    tmodel = TorchSegment()

    def build(dtype):
        model = FlaxSegment(dtype, count_include_pad=count_include_pad, rngs=nnx.Rngs(0))
        return convert.load_torch_state_dict(model, tmodel.state_dict())

    proof = prove(tmodel, build, _input((4, 3, 6, 6)), steps=2)
    assert proof.loss == "mse"
    if count_include_pad:
        assert proof.passed, proof.format()
        _assert_within_tolerances(proof)
    else:  # a planted pooling-padding bug: the border windows' divisor
        assert not proof.passed and proof.first_divergent_layer == "pool", proof.format()


def test_the_noise_floor_passes_rounding_noise_and_not_a_wrong_small_tensor():
    from flaxcnn.port.proof import TensorDiff, over_tolerance, part_summary

    grads = {
        "conv.weight": TensorDiff(1e-8, 1.0),
        "conv.bias": TensorDiff(2e-7, 3e-7),  # a zero gradient (bias before BatchNorm): noise on both sides
        "fc.weight": TensorDiff(1e-8, 1.0),
        "fc.bias": TensorDiff(1e-4, 1e-2),  # 1% wrong, 100 times smaller than its weight
    }
    assert over_tolerance(grads, "float32", "grads") == ["fc.bias"]
    steps = {**grads, "bn.num_batches_tracked": TensorDiff(0.0, 3.0, integer=True),
             "bn.running_mean": TensorDiff(2e-7, 1e-3)}  # measured on its own: the counter sets no scale
    assert over_tolerance(steps, "float32", "steps") == ["fc.bias", "bn.running_mean"]
    assert over_tolerance({"output": TensorDiff(2e-5, 1.0)}, "float32", "forward") == ["output"]
    # the report names the worst tensor measured on its own size, the noise under "noise_floor" ...
    del grads["fc.bias"]
    row = part_summary(grads, "float32", "grads")
    assert row["passed"] and row["tensor"] == "conv.weight" and row["ratio"] == 1e-8
    assert row["noise_floor"]["tensor"] == "conv.bias" and row["noise_floor"]["tensors"] == 1
    # ... unless a tensor measured against the floor fails: then it is the part's tensor
    grads["conv.bias"] = TensorDiff(1e-4, 3e-7)
    row = part_summary(grads, "float32", "grads")
    assert not row["passed"] and row["tensor"] == "conv.bias"


def test_pytorchs_own_float32_error_excuses_a_tensor_only_within_twice_it():
    from flaxcnn.port.proof import PYTORCH_ERROR_FACTOR, over_tolerance, part_summary

    assert PYTORCH_ERROR_FACTOR == 2.0  # the triangle inequality's bound for a port as accurate as PyTorch
    grads = {
        "conv.weight": TensorDiff(1e-8, 1.0, pytorch_error=1e-8),
        # ill-conditioned: 1e-3 over tolerance, but PyTorch's own float32 is 6e-4 from float64
        "fc.weight": TensorDiff(1e-3, 1.0, pytorch_error=6e-4),
    }
    assert over_tolerance(grads, "float32", "grads") == []
    row = part_summary(grads, "float32", "grads")
    # the row still names the worst ratio, and says which tensors the allowance passed
    assert row["passed"] and row["tensor"] == "fc.weight" and row["ratio"] == 1e-3
    assert row["within_pytorch_error"]["tensors"] == 1 and row["within_pytorch_error"]["tensor"] == "fc.weight"
    assert row["within_pytorch_error"]["share_of_allowance"] == pytest.approx(1e-3 / 1.2e-3)
    # a tiny tensor judged by its layer's noise floor and over it, but within PyTorch's error: passed,
    # and the noise-floor entry says so
    with_tiny = {**grads, "fc.bias": TensorDiff(1e-4, 1e-9, pytorch_error=1e-4)}
    row = part_summary(with_tiny, "float32", "grads")
    assert row["passed"] and row["within_pytorch_error"]["tensors"] == 2
    assert row["noise_floor"]["tensor"] == "fc.bias" and row["noise_floor"]["within_pytorch_error"]
    # more than twice PyTorch's error, no error measured, a NaN, an integer counter: over tolerance
    for wrong in (TensorDiff(1e-3, 1.0, pytorch_error=4e-4), TensorDiff(1e-3, 1.0),
                  TensorDiff(float("nan"), 1.0, pytorch_error=1.0), TensorDiff(2.0, 3.0, integer=True, pytorch_error=5.0)):
        assert over_tolerance({**grads, "bn.x": wrong}, "float32", "grads") == ["bn.x"], wrong
        row = part_summary({**grads, "bn.x": wrong}, "float32", "grads")
        assert not row["passed"] and row["tensor"] == "bn.x", row  # a failing tensor is the part's tensor


def _float32_kernel_in_bfloat16(model):
    """A float32-only bug: conv2's kernel rounded to bfloat16 (float64 builds are left exact)."""
    if model.conv2.kernel[...].dtype == jnp.float32:
        model.conv2.kernel[...] = model.conv2.kernel[...].astype(jnp.bfloat16).astype(jnp.float32)
    return model


def test_a_float32_only_error_is_not_excused_as_pytorchs_rounding():
    tmodel, build = _small_pair(_float32_kernel_in_bfloat16)
    proof = prove(tmodel, build, _input(), steps=2)
    assert not proof.passed
    assert all(proof.parts["float64"][part]["passed"] for part in PARTS)
    for part in ("grads", "steps"):  # the parts the allowance applies to still fail
        row = proof.parts["float32"][part]
        assert not row["passed"] and row["within_pytorch_error"] is None, (part, row)
    assert proof.first_divergent_layer == "conv2", proof.format()


# ------------------------------------------------------------------------------- rounding rules

ONE_PERCENT = 1e-2


def test_buffers_have_the_layer_noise_floor():
    """A BatchNorm whose batch mean is exactly 0 (a bias-free 1x1 conv of a BatchNorm's output):
    its running mean is rounding noise on both sides (mobilenet_v2's features.5.1, float32)."""
    from flaxcnn.port.proof import over_tolerance

    buffers = {"bn.running_mean": TensorDiff(2.03e-8, 3.06e-9), "bn.running_var": TensorDiff(1e-7, 1.0),
               "bn.num_batches_tracked": TensorDiff(0.0, 1.0, integer=True)}
    for dtype in DTYPES:
        noise = {k: TensorDiff(d.diff * float(np.finfo(dtype).eps / np.finfo(np.float32).eps), d.ref, d.integer)
                 for k, d in buffers.items()}
        assert over_tolerance(noise, dtype, "buffers") == [], dtype
    # a running mean of normal size 1% wrong fails (float32: a tenth of its layer's running_var)
    wrong = {**buffers, "bn.running_mean": TensorDiff(ONE_PERCENT * 0.1, 0.1)}
    assert over_tolerance(wrong, "float32", "buffers") == ["bn.running_mean"]
    # float64 holds it far tighter: 1% wrong at 1e-6 of its layer's largest still fails
    wrong = {**buffers, "bn.running_var": TensorDiff(1e-16, 1.0), "bn.running_mean": TensorDiff(ONE_PERCENT * 1e-6, 1e-6)}
    assert over_tolerance(wrong, "float64", "buffers") == ["bn.running_mean"]


def test_a_steps_change_is_measured_against_the_rounding_of_its_weights():
    """squeezenet1_1's features.11.expand3x3.weight: a 3-step change of 1.54e-5 differing by one
    float32 ulp (7.45e-9) of weights in [0.0625, 0.125)."""
    from flaxcnn.port.proof import WEIGHT_ROUNDING_ULPS, over_tolerance, weight_rounding_floor

    floor = weight_rounding_floor(0.1, 3, "float32")
    assert over_tolerance({"w": TensorDiff(7.45e-9, 1.54e-5, floor=floor)}, "float32", "steps") == []
    assert over_tolerance({"w": TensorDiff(7.45e-9, 1.54e-5)}, "float32", "steps") == ["w"]  # without the rule
    # the bound: a change 1% wrong fails once it is over 100 * WEIGHT_ROUNDING_ULPS * steps ulps of the weights
    bound = WEIGHT_ROUNDING_ULPS * 3 * float(np.finfo(np.float32).eps) * 0.1 / ONE_PERCENT
    for change in (2 * bound, 1e-3, 0.05):  # just over the bound, a normal 3-step change, a large one
        wrong = {"w": TensorDiff(ONE_PERCENT * change, change, floor=floor)}
        assert over_tolerance(wrong, "float32", "steps") == ["w"], change
    # float64 resolves far smaller changes: 1% wrong in a change of 1e-10 of the same weights fails
    wrong = {"w": TensorDiff(ONE_PERCENT * 1e-10, 1e-10, floor=weight_rounding_floor(0.1, 3, "float64"))}
    assert over_tolerance(wrong, "float64", "steps") == ["w"]
    # an integer tensor (the BatchNorm counter) takes no floor
    assert over_tolerance({"n": TensorDiff(1.0, 3.0, integer=True, floor=1e9)}, "float32", "steps") == ["n"]


def test_the_noise_floor_grows_with_the_reduction_length():
    """speechnet's bn0.weight gradient, float64: a sum of 4*99*26 products that cancels to 5.8e-8,
    its rounding 3.6e-16 (2e-10 of a 128-ulp floor of its layer's 6e-3)."""
    from flaxcnn.port.proof import NOISE_ULPS, REDUCTION_ULPS, noise_ulps, over_tolerance

    n = 4 * 99 * 26
    assert noise_ulps(1) == NOISE_ULPS and noise_ulps(n) == REDUCTION_ULPS * np.sqrt(n)
    grads = {"bn0.weight": TensorDiff(3.61e-16, 5.79e-8), "bn0.bias": TensorDiff(1e-18, 6.0e-3)}
    assert over_tolerance(grads, "float64", "grads") == ["bn0.weight"]  # the fixed 128 ulps
    assert over_tolerance(grads, "float64", "grads", {"bn0": n}) == []
    # a tensor of its layer's size, 1% wrong, fails in both dtypes whatever the length
    for dtype in DTYPES:
        for length in (1, n, 10**6):
            wrong = {**grads, "bn0.weight": TensorDiff(ONE_PERCENT * 1e-3, 1e-3)}
            assert over_tolerance(wrong, dtype, "grads", {"bn0": length}) == ["bn0.weight"], (dtype, length)


def test_relu_decisions_made_by_rounding_are_replayed_into_torch():
    """PyTorch's steps take the port's decisions where both inputs are within the band of zero,
    and only there; the count is per step."""
    from parity.losses import torch_loss  # noqa: F401 - the proof's loss, used through run_torch
    from flaxcnn.port.proof import relu_replay_counts, run_torch

    torch.manual_seed(0)
    tmodel = TorchSmall().double()
    x = torch.from_numpy(_input().astype(np.float64))
    target = torch.from_numpy(np.arange(6) % 5)
    plain = run_torch(copy.deepcopy(tmodel), x, target, "cross_entropy", steps=2, lr=0.01, seed=0)
    assert len(plain.relu_inputs) == 2 and len(plain.relu_inputs[0]) == 2  # two ReLU calls per step
    first = plain.relu_inputs[0][1]  # conv2's ReLU: its outputs reach the loss through the flatten
    small = np.unravel_index(np.argmin(np.abs(first)), first.shape)  # the input nearest 0
    large = np.unravel_index(np.argmax(first), first.shape)
    band = 2 * abs(float(first[small])) / float(np.max(np.abs(first)))
    flipped = [[v.copy() for v in step] for step in plain.relu_inputs]
    flipped[0][1][small] = -first[small]
    replayed = run_torch(copy.deepcopy(tmodel), x, target, "cross_entropy", steps=2, lr=0.01, seed=0,
                         flax_relu_inputs=flipped, relu_band=band)
    assert relu_replay_counts(replayed.relu_replays) == {"grads": 1, "steps": 1}
    assert any(not np.array_equal(replayed.grads[k], plain.grads[k]) for k in plain.grads)
    # a decision outside the band is a real difference: never replayed
    flipped[0][1][small] = first[small]
    flipped[0][1][large] = -first[large]
    beyond = run_torch(copy.deepcopy(tmodel), x, target, "cross_entropy", steps=2, lr=0.01, seed=0,
                       flax_relu_inputs=flipped, relu_band=band)
    assert relu_replay_counts(beyond.relu_replays) == {"grads": 0, "steps": 0}
    assert beyond.relu_replays[0].beyond_tolerance == 1
    assert all(np.array_equal(beyond.grads[k], plain.grads[k]) for k in plain.grads)


def test_the_port_records_its_relu_inputs_every_step(small_proof):
    from flaxcnn.port.proof import run_flax

    tmodel, _, proof = small_proof
    assert proof.as_json()["relu_replays"] == proof.relu_replays
    assert set(proof.relu_replays) == set(DTYPES)
    from flaxcnn.port.proof import run_torch

    _, build = _small_pair()
    x, target = _input(), np.arange(6) % 5
    torch_run = run_torch(copy.deepcopy(tmodel), torch.from_numpy(x), torch.from_numpy(target), "cross_entropy",
                          steps=2, lr=0.01, seed=0)
    with jax.default_matmul_precision("highest"):
        run = run_flax(build(jnp.float32), jnp.asarray(x), jnp.asarray(target.astype(np.int32)), "cross_entropy",
                       torch_run.draws, param_names=[n for n, _ in tmodel.named_parameters()], steps=2, lr=0.01)
    assert [len(step) for step in run.relu_inputs] == [2, 2]
    assert run.relu_inputs[0][0].shape == (6, 4, 8, 8)  # NCHW, like PyTorch's


def test_max_pool_near_ties_are_found():
    from flaxcnn.port.near_ties import count_max_pool_near_ties, near_ties

    x = torch.tensor([[[[1.0, 1.0 + 1e-7, 0.0], [0.0, 0.0, 3.0], [5.0, -1.0, 2.0]]]])
    assert near_ties(x, 2, 1, rtol=1e-5) == (4, 1)  # the first window: 1 and 1 + 1e-7
    assert near_ties(x, 2, 2, ceil_mode=True, rtol=1e-5) == (4, 1)  # the border windows hold one value each
    assert near_ties(x, 3, 1, padding=1, rtol=1e-5) == (9, 1)
    pool = tnn.MaxPool2d(2, stride=1)
    with count_max_pool_near_ties(rtol=1e-5) as found:
        pool(x)
        torch.nn.functional.max_pool2d(x, kernel_size=3, stride=1)
    assert [(p.call, p.windows, p.ties) for p in found] == [(0, 4, 1), (1, 1, 0)]
