"""Conversion rules one by one, strictness, round trips and .pt files."""

import numpy as np
import pytest
import torch

from flaxcnn import convert
from flaxcnn.errors import ConversionError
from flaxcnn.models.registry import get_model


def _torch_and_flax(name, seed=0):
    spec = get_model(name)
    torch.manual_seed(seed)
    tmodel = spec.build_torch()
    fmodel = convert.load_torch_state_dict(spec.build(), tmodel.state_dict())
    return tmodel, fmodel


def test_conv_kernel_is_oihw_to_hwio():
    tmodel, fmodel = _torch_and_flax("net")
    w = tmodel.conv1.weight.detach().numpy()
    np.testing.assert_array_equal(fmodel.conv1.kernel[...], w.transpose(2, 3, 1, 0))


def test_linear_kernel_is_transposed():
    tmodel, fmodel = _torch_and_flax("net")
    np.testing.assert_array_equal(fmodel.fc2.kernel[...], tmodel.fc2.weight.detach().numpy().T)


def test_first_linear_rows_follow_nhwc_flatten_order():
    tmodel, fmodel = _torch_and_flax("net")
    w = tmodel.fc1.weight.detach().numpy()  # (32, 8*8*8), columns in (c, h, w) order
    k = np.asarray(fmodel.fc1.kernel[...])  # (8*8*8, 32), rows in (h, w, c) order
    c, h, ww = 5, 2, 7
    np.testing.assert_array_equal(k[h * 8 * 8 + ww * 8 + c], w[:, c * 64 + h * 8 + ww])


def test_batchnorm_buffers_and_counter():
    spec = get_model("net-batchnorm")
    tmodel = spec.build_torch()
    tmodel.train()
    tmodel(torch.randn(4, 3, 32, 32))
    fmodel = convert.load_torch_state_dict(spec.build(), tmodel.state_dict())
    np.testing.assert_array_equal(fmodel.bn1.var[...], tmodel.bn1.running_var.numpy())
    np.testing.assert_array_equal(fmodel.bn1.mean[...], tmodel.bn1.running_mean.numpy())
    assert int(fmodel.bn1.num_batches_tracked[...]) == 1
    back = convert.to_torch_state_dict(fmodel)
    assert back["bn1.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("name", ["net", "net-batchnorm", "convnet"])
def test_round_trip_is_bitwise_and_strict_loadable(name):
    tmodel, fmodel = _torch_and_flax(name, seed=3)
    back = convert.to_torch_state_dict(fmodel)
    original = tmodel.state_dict()
    assert list(back) == list(original)
    for key in original:
        assert back[key].dtype == original[key].dtype
        assert torch.equal(back[key], original[key]), key
    get_model(name).build_torch().load_state_dict(back, strict=True)


def test_strict_errors_list_every_key_with_shapes():
    tmodel, _ = _torch_and_flax("net")
    sd = dict(tmodel.state_dict())
    del sd["fc2.bias"]
    sd["fc3.weight"] = torch.zeros(2, 2)
    sd["conv1.weight"] = torch.zeros(16, 3, 5, 5)
    model = get_model("net").build()
    before = np.asarray(model.fc1.kernel[...]).copy()
    with pytest.raises(ConversionError) as info:
        convert.load_torch_state_dict(model, sd)
    message = str(info.value)
    assert "missing keys: fc2.bias" in message
    assert "unexpected keys: fc3.weight" in message
    assert "conv1.weight: checkpoint has shape (16, 3, 5, 5), model expects (16, 3, 3, 3)" in message
    np.testing.assert_array_equal(model.fc1.kernel[...], before)  # nothing was written


def test_load_pt_reads_a_saved_state_dict(tmp_path):
    tmodel, _ = _torch_and_flax("net")
    path = tmp_path / "net.pt"
    torch.save(tmodel.state_dict(), path)
    fmodel = convert.load_torch_state_dict(get_model("net").build(seed=9), convert.load_pt(path))
    np.testing.assert_array_equal(fmodel.fc2.bias[...], tmodel.fc2.bias.detach().numpy())


def test_load_pt_refuses_a_pickled_module(tmp_path):
    tmodel, _ = _torch_and_flax("net")
    path = tmp_path / "whole.pt"
    torch.save(tmodel, path)
    with pytest.raises(ConversionError, match=r"torch.save\(model.state_dict\(\), path\)"):
        convert.load_pt(path)
