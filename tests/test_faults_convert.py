"""Hostile or broken PyTorch files and state_dicts: one clear ConversionError, no code run."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from flaxcnn import convert
from flaxcnn.errors import ConversionError
from flaxcnn.models.registry import get_model

torch = pytest.importorskip("torch", reason="the converter's .pt tests need torch (pip install flaxcnn[torch])")

SAVE_HINT = "torch.save(model.state_dict(), path)"


@pytest.fixture(scope="module")
def net_state_dict() -> OrderedDict:
    """The state_dict of the PyTorch reference Net (what users hand the converter)."""
    torch.manual_seed(0)
    return get_model("net").build_torch().state_dict()


@pytest.fixture(scope="module")
def flax_net():
    return get_model("net").build(seed=3)


def params_of(model) -> list[np.ndarray]:
    return [np.asarray(v).copy() for v in convert.to_numpy_state_dict(model).values()]


class MarkerPayload:
    """Unpickling this runs ``touch marker`` (via ``os.system``) if the loader allows it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------- state_dict contents


def test_every_problem_is_listed_in_one_error_and_nothing_is_written(net_state_dict, flax_net):
    sd = OrderedDict(net_state_dict)
    del sd["fc2.bias"], sd["conv2.bias"]
    sd["fc3.weight"] = torch.zeros(2, 2)
    sd["module.conv1.weight"] = sd["conv1.weight"]  # a DataParallel prefix
    sd["conv1.weight"] = torch.zeros(16, 3, 5, 5)
    sd["fc1.weight"] = torch.zeros(32, 100)
    before = params_of(flax_net)
    with pytest.raises(ConversionError) as err:
        convert.load_torch_state_dict(flax_net, sd)
    message = str(err.value)
    assert message.startswith("state_dict does not fit Net:")
    assert "missing keys: conv2.bias, fc2.bias" in message
    assert "unexpected keys: fc3.weight, module.conv1.weight" in message
    assert "conv1.weight: checkpoint has shape (16, 3, 5, 5), model expects (16, 3, 3, 3)" in message
    assert "fc1.weight: checkpoint has shape (32, 100), model expects (32, 512)" in message
    for a, b in zip(params_of(flax_net), before):
        np.testing.assert_array_equal(a, b)  # strict: all or nothing


def test_state_dict_of_another_model_is_refused(flax_net):
    """The speech ConvNet's weights handed to the CIFAR Net: every key is reported."""
    with pytest.raises(ConversionError) as err:
        convert.load_torch_state_dict(flax_net, get_model("convnet").build_torch().state_dict())
    message = str(err.value)
    assert "missing keys: conv1.weight" not in message  # conv1/fc1/fc2 exist in both...
    assert "size mismatch for conv1.weight: checkpoint has shape (10, 1, 10, 10)" in message  # ...with other shapes
    assert "size mismatch for fc2.weight: checkpoint has shape (35, 100), model expects (2, 32)" in message
    assert "missing keys: conv2.weight, conv2.bias" in message


def test_a_non_tensor_value_is_reported_as_a_shape_problem(net_state_dict, flax_net):
    sd = dict(net_state_dict, **{"conv1.weight": "not a tensor"})
    with pytest.raises(ConversionError, match=r"conv1.weight: checkpoint has shape \(\), model expects \(16, 3, 3, 3\)"):
        convert.load_torch_state_dict(flax_net, sd)


# ---------------------------------------------------------------- .pt files


def test_a_whole_pickled_module_is_refused_with_how_to_save_a_state_dict(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(get_model("net").build_torch(), path)
    with pytest.raises(ConversionError) as err:
        convert.load_pt(path)
    message = str(err.value)
    assert str(path) in message and "references parity.references.Net" in message
    assert "weights_only=True" in message and SAVE_HINT in message
    assert "\x1b[" not in message  # torch's terminal colour codes are not passed on


@pytest.mark.parametrize("how", ["torch.save, value in a dict", "plain pickle, whole file"])
def test_malicious_pt_is_refused_and_its_code_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if how.startswith("torch.save"):
        torch.save({"conv1.weight": MarkerPayload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(MarkerPayload(marker), protocol=2))
    with pytest.raises(ConversionError) as err:
        convert.load_pt(path)
    assert "refused to load" in str(err.value) and "nothing in the file ran" in str(err.value)
    assert SAVE_HINT in str(err.value)
    assert not marker.exists()


def test_the_marker_payload_really_runs_when_unpickled_unsafely(tmp_path):
    """Guards the test above: the payload does create the marker under a plain pickle.load."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(MarkerPayload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_pt_files_name_the_file(tmp_path, net_state_dict, damage):
    path = tmp_path / "net.pt"
    torch.save(net_state_dict, path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"hello world", "empty": b""}[damage])
    with pytest.raises(ConversionError) as err:
        convert.load_pt(path)
    assert str(path) in str(err.value) and "truncated or damaged" in str(err.value)


@pytest.mark.parametrize(
    "content, fragments",
    [([1, 2, 3], ["holds a list"]),
     ({"state_dict": {"a": 1}, "epoch": 3}, ["not tensors: state_dict, epoch", "['state_dict']"]),
     ({"conv1.weight": 1.5}, ["not tensors: conv1.weight"])],
    ids=["list", "training checkpoint dict", "float value"],
)
def test_pt_with_something_else_than_a_state_dict(tmp_path, content, fragments):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(ConversionError) as err:
        convert.load_pt(path)
    assert all(f in str(err.value) for f in fragments) and SAVE_HINT in str(err.value)


def test_missing_file_and_folder(tmp_path):
    for path in (tmp_path / "nope.pt", tmp_path):
        with pytest.raises(ConversionError, match=f"checkpoint file not found: {path}"):
            convert.load_pt(path)


def test_a_good_pt_still_round_trips(tmp_path, net_state_dict):
    """The refusals above leave the normal path intact: load_pt + strict load are exact."""
    path = tmp_path / "net.pt"
    torch.save(net_state_dict, path)
    model = convert.load_torch_state_dict(get_model("net").build(seed=5), convert.load_pt(path))
    back = convert.to_numpy_state_dict(model)
    for key, value in net_state_dict.items():
        np.testing.assert_array_equal(back[key], value.numpy())
