"""The parity suite passes on every model and fails on a wrong conversion."""

import json

import numpy as np
import pytest

from flaxcnn import convert
from flaxcnn.models.registry import MODELS, get_model
from parity.__main__ import main as parity_main
from parity.checks import check_model


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_passes(name):
    result = check_model(get_model(name), batch=8)
    assert result.passed, result.problems
    assert result.shapes_match and result.roundtrip_exact
    assert result.forward_max_abs_diff <= 1e-6 and result.grad_max_abs_diff <= 1e-5


def test_dropout_models_replay_torch_masks():
    assert check_model(get_model("net-dropout"), batch=8).dropout_masks_replayed == 2
    assert check_model(get_model("convnet"), batch=8).dropout_masks_replayed == 2


def _without_flatten_permutation(model, state_dict):
    model.nchw_flatten = {}
    return convert.load_torch_state_dict(model, state_dict)


def _conv_kernel_reshaped_not_transposed(model, state_dict):
    convert.load_torch_state_dict(model, state_dict)
    for name in ("conv1", "conv2"):
        w = state_dict[f"{name}.weight"].numpy()
        layer = getattr(model, name)
        layer.kernel[...] = w.reshape(layer.kernel[...].shape)
    return model


def _running_stats_swapped(model, state_dict):
    sd = dict(state_dict)
    sd["bn1.running_mean"], sd["bn1.running_var"] = sd["bn1.running_var"], sd["bn1.running_mean"]
    return convert.load_torch_state_dict(model, sd)


@pytest.mark.parametrize("name, converter", [
    ("net", _without_flatten_permutation),
    ("convnet", _without_flatten_permutation),
    ("net", _conv_kernel_reshaped_not_transposed),
    ("net-batchnorm", _running_stats_swapped),
])
def test_a_wrong_conversion_is_caught(name, converter):
    result = check_model(get_model(name), batch=8, converter=converter)
    assert not result.passed
    assert result.forward_max_abs_diff > 1e-3


def test_a_lossy_export_breaks_the_round_trip():
    def lossy(model):
        sd = convert.to_torch_state_dict(model)
        sd["fc2.bias"] = sd["fc2.bias"] + 1e-7
        return sd

    result = check_model(get_model("net"), batch=8, exporter=lossy)
    assert not result.roundtrip_exact and not result.passed


def test_cli_writes_json_and_exit_code(tmp_path, capsys):
    path = tmp_path / "p.json"
    assert parity_main(["--models", "net", "--json", str(path), "--batch", "4"]) == 0
    data = json.loads(path.read_text())
    assert data["passed"] is True
    row = data["models"][0]
    for key in ("name", "params", "forward_max_abs_diff", "train_forward_max_abs_diff", "grad_max_abs_diff",
                "shapes_match", "roundtrip_exact", "passed", "relu_decisions_replayed", "grad_max_abs_diff_unreplayed"):
        assert key in row
    assert row["params"] == 18090
    assert "| net " in capsys.readouterr().out


def test_lab_netdepth_as_written_cannot_train():
    import torch

    from parity.references import NetDepthAsWritten

    out = NetDepthAsWritten()(torch.zeros(8, 3, 32, 32))
    assert out.shape == (32, 2)  # 4 rows per image
    with pytest.raises(ValueError, match="batch_size"):
        torch.nn.functional.cross_entropy(out, torch.zeros(8, dtype=torch.long))
    assert np.isfinite(out.detach().numpy()).all()


def test_torch_mask_replay_reproduces_the_recorded_run():
    import torch

    from parity.losses import torch_loss
    from parity.dropout import record_torch_masks, replay_torch_masks

    spec = get_model("convnet")  # Dropout2d after a conv and Dropout before the last Linear
    torch.manual_seed(0)
    model = spec.build_torch()
    x, y = torch.randn(spec.example_shape(8)), torch.randint(0, 35, (8,))
    model.train()
    with record_torch_masks(model) as masks:
        out = model(x)
    again = spec.build_torch()
    again.load_state_dict(model.state_dict())
    again.train()
    with replay_torch_masks(again, masks):
        replayed = again(x)
    np.testing.assert_allclose(replayed.detach().numpy(), out.detach().numpy(), atol=1e-6, rtol=0)
    assert torch_loss(spec.loss, replayed, y).item() == pytest.approx(torch_loss(spec.loss, out, y).item(), abs=1e-6)


def test_relu_kinks_counts_near_zero_inputs_and_measures_the_flip(capsys):
    from parity.kinks import main, relu_kinks

    none = relu_kinks("speechresnet", "s3b1_bn1", band=0.0, batch=4)
    # nothing flipped: only the replayed dropout's rounding (x * mask / (1 - p)) is left
    assert none["near_zero"] == 0 and max(none["grad_shift"].values()) < 1e-6
    some = relu_kinks("speechresnet", "s3b1_bn1", band=0.05, batch=4)
    assert some["near_zero"] > 0 and all(abs(v) < 0.05 for v in some["values"])
    assert some["grad_shift"]["s3b1_conv1.weight"] > 1e-5
    assert main(["--model", "speechresnet", "--layer", "nope", "--batch", "2"]) == 2
    assert "has no module 'nope'" in capsys.readouterr().err
