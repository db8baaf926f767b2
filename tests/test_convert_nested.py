"""Conversion of nested modules: nn.Sequential, lists of blocks, nested submodules, both ways, strict."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="the converter's torch tests need torch (pip install flaxcnn[torch])")
import torch.nn as tnn  # noqa: E402

from flaxcnn import convert  # noqa: E402
from flaxcnn.errors import ConversionError  # noqa: E402
from flaxcnn.models.layers import BatchNorm2d, conv2d, linear  # noqa: E402
from parity.examples.vgg import VGG, VGGTorch  # noqa: E402

VGG_KWARGS = dict(channels=(4, 8), image_size=8, hidden=16)


def _round_trip_is_exact(fmodel, tmodel_class, original):
    back = convert.to_torch_state_dict(fmodel)
    assert list(back) == list(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    tmodel_class().load_state_dict(back, strict=True)


def test_sequential_keys_map_to_nnx_sequential_layers():
    torch.manual_seed(0)
    tmodel = VGGTorch(**VGG_KWARGS)
    fmodel = convert.load_torch_state_dict(VGG(**VGG_KWARGS, rngs=nnx.Rngs(1)), tmodel.state_dict())
    conv, bn = fmodel.features.layers[0], fmodel.features.layers[1]
    np.testing.assert_array_equal(conv.kernel[...], tmodel.features[0].weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(bn.var[...], tmodel.features[1].running_var.numpy())
    np.testing.assert_array_equal(fmodel.classifier.layers[4].kernel[...], tmodel.classifier[4].weight.detach().numpy().T)
    # the Linear after the flatten has its rows permuted from (c, h, w) to (h, w, c)
    w = tmodel.classifier[1].weight.detach().numpy()  # (16, 8*2*2)
    k = np.asarray(fmodel.classifier.layers[1].kernel[...])
    c, h, ww = 5, 1, 0
    np.testing.assert_array_equal(k[h * 2 * 8 + ww * 8 + c], w[:, c * 4 + h * 2 + ww])
    _round_trip_is_exact(fmodel, lambda: VGGTorch(**VGG_KWARGS), tmodel.state_dict())


def test_names_follow_pytorch_including_functions_in_a_sequential():
    names = [name for name, _ in convert.named_layers(VGG(**VGG_KWARGS, rngs=nnx.Rngs(0)))]
    torch_names = [name for name, m in VGGTorch(**VGG_KWARGS).named_modules() if name and not list(m.children())]
    assert names == torch_names


class _BlockTorch(tnn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = tnn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = tnn.BatchNorm2d(c_out)
        self.act = tnn.ReLU()


class _NestedTorch(tnn.Module):
    def __init__(self):
        super().__init__()
        self.stem = tnn.Sequential(tnn.Conv2d(3, 4, 3, padding=1), tnn.ReLU())
        self.blocks = tnn.ModuleList([_BlockTorch(4, 4), _BlockTorch(4, 6)])
        self.extra = tnn.ModuleList([tnn.Linear(3, 3)])
        self.heads = tnn.ModuleDict({"main": tnn.Sequential(tnn.Flatten(), tnn.Linear(6, 2))})


class _Block(nnx.Module):
    def __init__(self, c_in: int, c_out: int, rngs: nnx.Rngs):
        self.conv = conv2d(c_in, c_out, 3, 1, init="torch", rngs=rngs)
        self.bn = BatchNorm2d(c_out)


class _Nested(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        import jax

        self.stem = nnx.Sequential(conv2d(3, 4, 3, 1, init="torch", rngs=rngs), jax.nn.relu)
        self.blocks = nnx.List([_Block(4, 4, rngs), _Block(4, 6, rngs)])
        self.extra = nnx.data([linear(3, 3, init="torch", rngs=rngs)])  # a plain list of layers
        self.heads = nnx.Dict(main=nnx.Sequential(lambda x: x.reshape(x.shape[0], -1),
                                                  linear(6, 2, init="torch", rngs=rngs)))


def test_lists_of_blocks_dicts_and_nested_submodules_convert_both_ways():
    torch.manual_seed(0)
    tmodel = _NestedTorch()
    tmodel.train()
    for block in tmodel.blocks:  # non-trivial running statistics and counters
        block.bn(torch.randn(4, block.bn.num_features, 3, 3))
    sd = tmodel.state_dict()
    assert "blocks.1.bn.running_var" in sd and "heads.main.1.weight" in sd and "extra.0.bias" in sd
    fmodel = convert.load_torch_state_dict(_Nested(nnx.Rngs(0)), sd)
    np.testing.assert_array_equal(fmodel.blocks[1].bn.var[...], sd["blocks.1.bn.running_var"].numpy())
    assert int(fmodel.blocks[0].bn.num_batches_tracked[...]) == 1
    np.testing.assert_array_equal(fmodel.extra[0].kernel[...], sd["extra.0.weight"].numpy().T)
    np.testing.assert_array_equal(fmodel.heads["main"].layers[1].bias[...], sd["heads.main.1.bias"].numpy())
    _round_trip_is_exact(fmodel, _NestedTorch, sd)


def test_strict_errors_name_nested_keys():
    torch.manual_seed(0)
    sd = dict(VGGTorch(**VGG_KWARGS).state_dict())
    del sd["features.5.running_var"]
    sd["features.9.weight"] = torch.zeros(3)
    sd["classifier.4.weight"] = torch.zeros(3, 16)
    fmodel = VGG(**VGG_KWARGS, rngs=nnx.Rngs(0))
    before = np.asarray(fmodel.features.layers[0].kernel[...]).copy()
    with pytest.raises(ConversionError) as error:
        convert.load_torch_state_dict(fmodel, sd)
    message = str(error.value)
    assert "missing keys: features.5.running_var" in message
    assert "unexpected keys: features.9.weight" in message
    assert "classifier.4.weight: checkpoint has shape (3, 16), model expects (2, 16)" in message
    np.testing.assert_array_equal(fmodel.features.layers[0].kernel[...], before)  # nothing written


@pytest.mark.parametrize("layer, fragment", [
    (lambda: nnx.BatchNorm(4, rngs=nnx.Rngs(0)), "features.1 (flax.nnx.nn.normalization.BatchNorm)"),
    (lambda: nnx.LayerNorm(4, rngs=nnx.Rngs(0)), "features.1 (flax.nnx.nn.normalization.LayerNorm)"),
    (lambda: nnx.Conv(4, 4, (3,), rngs=nnx.Rngs(0)), "features.1 (nnx.Conv with 1 spatial dimension(s))"),
])
def test_an_unsupported_layer_is_named_with_what_is_supported(layer, fragment):
    class Port(nnx.Module):
        def __init__(self):
            self.features = nnx.Sequential(conv2d(3, 4, 3, 1, init="torch", rngs=nnx.Rngs(0)), layer())

    with pytest.raises(ConversionError) as error:
        convert.to_numpy_state_dict(Port())
    message = str(error.value)
    assert fragment in message
    assert "Supported: " + convert.SUPPORTED_LAYERS in message
    assert "nnx.Conv with a 2-D kernel" in message and "BatchNorm1d/BatchNorm2d" in message


def test_flatten_permutation_is_explicit_and_checked():
    torch.manual_seed(0)
    sd = VGGTorch(**VGG_KWARGS).state_dict()
    declared = convert.load_torch_state_dict(VGG(**VGG_KWARGS, rngs=nnx.Rngs(0)), sd)
    bare = VGG(**VGG_KWARGS, rngs=nnx.Rngs(0))
    bare.nchw_flatten = {}
    passed = convert.load_torch_state_dict(bare, sd, nchw_flatten={"classifier.1": (8, 2, 2)})
    np.testing.assert_array_equal(passed.classifier.layers[1].kernel[...], declared.classifier.layers[1].kernel[...])
    unpermuted = convert.load_torch_state_dict(VGG(**VGG_KWARGS, rngs=nnx.Rngs(0)), sd, nchw_flatten={})
    np.testing.assert_array_equal(unpermuted.classifier.layers[1].kernel[...], sd["classifier.1.weight"].numpy().T)
    with pytest.raises(ConversionError, match=r"nchw_flatten names 'classifier\.0', which is not a Linear layer "
                                              r"of VGG; its Linear layers: classifier\.1, classifier\.4"):
        convert.load_torch_state_dict(bare, sd, nchw_flatten={"classifier.0": (8, 2, 2)})
