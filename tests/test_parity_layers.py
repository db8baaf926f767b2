"""The layer-by-layer report: silent on a correct port, names the layer of each planted bug."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="the layer report compares against PyTorch (pip install flaxcnn[torch])")

from flaxcnn import convert  # noqa: E402
from flaxcnn.models import cifar  # noqa: E402
from flaxcnn.models.ops import max_pool  # noqa: E402
from flaxcnn.models.registry import ModelSpec  # noqa: E402
from parity.__main__ import main as parity_main  # noqa: E402
from parity.checks import FORWARD_TOL, GRAD_TOL, check_model  # noqa: E402
from parity.examples import bugs  # noqa: E402
from parity.examples.vgg import VGG, VGGTorch  # noqa: E402
from parity.layers import LayerPairingError, compare_layers, report_for_model  # noqa: E402

# tiny on purpose: 8x8 images, two stages of 4 and 8 channels, batch 4
VGG_KWARGS = dict(channels=(4, 8), image_size=8, hidden=16)


def _vgg_pair(seed: int = 0):
    torch.manual_seed(seed)
    tmodel = VGGTorch(**VGG_KWARGS)
    fmodel = convert.load_torch_state_dict(VGG(**VGG_KWARGS, rngs=nnx.Rngs(seed)), tmodel.state_dict())
    return tmodel, fmodel


def _batch(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, 3, 8, 8)).astype(np.float32)


def test_correct_port_has_no_divergence_and_every_layer_is_compared():
    tmodel, fmodel = _vgg_pair()
    report = compare_layers(tmodel, fmodel, _batch())
    assert report.passed, report.format()
    assert [r.name for r in report.rows] == [f"features.{i}" for i in range(8)] + [f"classifier.{i}" for i in range(5)]
    assert all(r.forward_diff is not None and r.backward_diff is not None for r in report.rows)
    bn = next(r for r in report.rows if r.name == "features.1")
    assert bn.state_diff is not None and bn.torch_shape == (4, 4, 8, 8) and bn.flax_shape == (4, 8, 8, 4)
    assert report.output_diff <= FORWARD_TOL and report.train_output_diff <= FORWARD_TOL
    assert "no divergence" in report.format()


def test_the_models_passed_in_are_left_unchanged():
    tmodel, fmodel = _vgg_pair()
    before_t = {k: v.clone() for k, v in tmodel.state_dict().items()}
    before_f = convert.to_numpy_state_dict(fmodel)
    compare_layers(tmodel, fmodel, _batch())
    assert all(torch.equal(before_t[k], v) for k, v in tmodel.state_dict().items())
    after_f = convert.to_numpy_state_dict(fmodel)
    assert all(np.array_equal(before_f[k], after_f[k]) for k in before_f)
    assert type(fmodel.features.layers[0]) is nnx.Conv  # no recording class left behind


@pytest.mark.parametrize("bug, name, kind", [
    ("flatten-hw", "classifier.1", "forward"),
    ("kernel-hw", "features.4", "forward"),
    ("bn-biased-var", "features.1", "state"),
    ("bn-momentum", "features.5", "state"),
    ("dropout-scale", "classifier.3", "forward"),
    ("padding", "features.4", "forward"),
])
def test_each_planted_bug_is_localised(bug, name, kind):
    tmodel, fmodel = _vgg_pair()
    bugs.BUGS[bug](fmodel, name)
    report = compare_layers(tmodel, fmodel, _batch())
    assert not report.passed
    assert (report.first_divergence, report.divergence_kind) == (name, kind), report.format()
    rows = {r.name: r for r in report.rows}
    earlier = [r for r in report.rows[: report.rows.index(rows[name])]]
    assert all(r.input_ok and r.forward_ok and r.state_ok for r in earlier)
    assert f"<-- first divergence ({kind})" in report.format()


def test_the_bug_that_only_changes_running_statistics_leaves_outputs_equal():
    tmodel, fmodel = _vgg_pair()
    bugs.batchnorm_biased_variance(fmodel, "features.1")
    report = compare_layers(tmodel, fmodel, _batch())
    assert report.output_diff <= FORWARD_TOL and report.train_output_diff <= FORWARD_TOL
    assert report.rows[1].state_diff > 1e-4  # 0.1 * var / (n - 1) with n = 4*8*8


def test_a_wrong_backward_pass_is_named_by_the_gradients():
    @jax.custom_vjp
    def relu(x):
        return jax.nn.relu(x)

    relu.defvjp(lambda x: (jax.nn.relu(x), x), lambda x, g: (0.5 * g * (x > 0),))  # wrong: half the gradient
    tmodel, fmodel = _vgg_pair()
    fmodel.features.layers[2] = relu
    report = compare_layers(tmodel, fmodel, _batch())
    assert (report.first_divergence, report.divergence_kind) == ("features.2", "backward"), report.format()
    assert report.output_diff <= FORWARD_TOL


class _NetMissingTanh(cifar.Net):
    """Net whose inline activation after conv2 was forgotten: the bug is between two layers."""

    def __call__(self, x):
        out = cifar.nchw_to_nhwc(x)
        out = max_pool(jnp.tanh(self.conv1(out)), 2)
        out = max_pool(self.conv2(out), 2)
        out = jnp.tanh(self.fc1(out.reshape(out.shape[0], -1)))
        return self.fc2(out)


def test_a_bug_in_code_between_layers_is_reported_at_the_next_layers_input():
    from parity.references import Net

    torch.manual_seed(0)
    tmodel = Net()
    fmodel = convert.load_torch_state_dict(_NetMissingTanh(rngs=nnx.Rngs(0)), tmodel.state_dict())
    report = compare_layers(tmodel, fmodel, np.random.default_rng(0).standard_normal((2, 3, 32, 32)))
    assert (report.first_divergence, report.divergence_kind) == ("fc1", "input"), report.format()
    assert "between them" in report.explanation


def test_registered_model_with_unpermuted_flatten_is_localised_at_fc1():
    assert report_for_model("net", batch=2).passed
    from parity.references import Net

    torch.manual_seed(0)
    tmodel = Net()
    fmodel = cifar.Net(rngs=nnx.Rngs(0))
    fmodel.nchw_flatten = {}  # the converter then copies fc1's rows in torch's (c, h, w) order
    convert.load_torch_state_dict(fmodel, tmodel.state_dict())
    report = compare_layers(tmodel, fmodel, np.random.default_rng(0).standard_normal((2, 3, 32, 32)),
                            nchw_flatten={"fc1": (8, 8, 8)})
    assert (report.first_divergence, report.divergence_kind) == ("fc1", "forward"), report.format()


def test_unpaired_layers_with_parameters_are_refused_and_rename_pairs_them():
    class Renamed(VGG):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.head = self.classifier
            del self.classifier
            self.nchw_flatten = {"head.1": self.nchw_flatten["classifier.1"]}

        def __call__(self, x):
            return self.head(self.features(cifar.nchw_to_nhwc(x)))

    torch.manual_seed(0)
    tmodel = VGGTorch(**VGG_KWARGS)
    fmodel = Renamed(**VGG_KWARGS, rngs=nnx.Rngs(0))
    sd = {k.replace("classifier.", "head."): v for k, v in tmodel.state_dict().items()}
    convert.load_torch_state_dict(fmodel, sd)
    with pytest.raises(LayerPairingError) as error:
        compare_layers(tmodel, fmodel, _batch())
    message = str(error.value)
    assert "classifier.1 (Linear)" in message and "head.1 (Linear)" in message and "rename=" in message
    report = compare_layers(tmodel, fmodel, _batch(), rename={"head": "classifier"})
    assert report.passed, report.format()


def test_parameter_free_layers_on_one_side_are_listed_not_compared():
    report = report_for_model("convnet", batch=2)  # torch has an nn.MaxPool2d module, Flax an inline call
    assert report.passed, report.format()
    assert report.unpaired == ["torch only: pooling (MaxPool2d)"]
    # the ReLU is a layer on both sides (the parity seam), so it is paired and compared
    assert [r.name for r in report.rows] == ["conv1", "relu", "conv1_drop", "fc1", "drop1", "fc2"]


def test_the_example_passes_the_suite_at_its_tolerances():
    spec = ModelSpec("vgg-example", VGG, "parity.examples.vgg:VGGTorch", (3, 8, 8), "cross_entropy", "cifar",
                     kwargs=VGG_KWARGS)
    result = check_model(spec, batch=4)
    assert result.passed, result.problems
    assert result.forward_max_abs_diff <= FORWARD_TOL and result.train_forward_max_abs_diff <= FORWARD_TOL
    assert result.grad_max_abs_diff <= GRAD_TOL and result.roundtrip_exact
    assert result.dropout_masks_replayed == 1


def test_side_by_side_training_stays_together():
    from parity.examples.side_by_side import train_side_by_side

    tmodel, fmodel = _vgg_pair()
    rng = np.random.default_rng(2)
    batches = [(_batch(seed), rng.integers(0, 2, 4)) for seed in (3, 4)]
    rows = train_side_by_side(tmodel, fmodel, batches)
    assert [r.step for r in rows] == [1, 2]
    assert all(abs(r.torch_loss - r.flax_loss) <= FORWARD_TOL and r.max_abs_diff <= GRAD_TOL for r in rows)
    assert rows[0].torch_loss != rows[1].torch_loss  # it did train on two different batches


def test_cli_layers_report(capsys):
    assert parity_main(["--layers", "--models", "net", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "| conv1 " in out and "no divergence" in out


def test_an_inplace_activation_does_not_overwrite_the_recorded_input():
    """nn.ReLU(inplace=True) writes into its input; the report must compare the input as it was."""
    from parity.layers import _record_torch

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1, bias=False), torch.nn.ReLU(inplace=True))
    with torch.no_grad():
        model[0].weight.fill_(-1.0)
    calls: dict = {}
    with torch.no_grad(), _record_torch(model, calls, None):
        model(torch.ones(1, 1, 2, 2))
    relu_input = calls[("1", 0)].input
    assert relu_input is not None and np.all(relu_input == -1.0), relu_input
    assert np.all(calls[("1", 0)].output == 0.0)
