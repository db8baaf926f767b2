"""``flaxcnn train --model FILE.py:NAME``: a model from a file trains like a registered one."""

import json
import textwrap

import numpy as np
import pytest

from flaxcnn import cli, convert
from flaxcnn.errors import ConfigError
from flaxcnn.models import from_file
from flaxcnn.models.registry import get_model

MODEL = textwrap.dedent('''
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from flaxcnn.models import nn


    class Tiny(nnx.Module):
        input_chw = (3, 32, 32)

        def __init__(self, *, dtype=jnp.float32, rngs: nnx.Rngs):
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1, dtype=dtype, rngs=rngs)
            self.fc = nnx.Linear(8, OUTPUTS, dtype=dtype, param_dtype=dtype, rngs=rngs)

        def __call__(self, x):
            x = jnp.transpose(x, (0, 2, 3, 1))
            x = jax.nn.relu(self.conv1(x)).mean(axis=(1, 2))
            return FINAL(self.fc(x))
''')


def write_model(tmp_path, outputs=2, final="lambda v: v", weights=True):
    path = tmp_path / "model.py"
    path.write_text(MODEL.replace("OUTPUTS", str(outputs)).replace("FINAL", f"({final})"))
    spec = f"{path}:Tiny"
    if weights:
        np.savez(tmp_path / from_file.WEIGHTS_FILE, **convert.to_numpy_state_dict(from_file.build(spec, seed=5)))
    return spec


def test_a_file_model_trains_from_its_weights_file(tmp_path):
    spec = write_model(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["train", "--model", spec, "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert get_model(spec).loss == "cross_entropy"
    # the weights file is the start: the model built for training holds exactly those weights
    built = convert.to_numpy_state_dict(get_model(spec).build(2))
    with np.load(tmp_path / from_file.WEIGHTS_FILE) as saved:
        assert all(np.array_equal(built[k], saved[k]) for k in saved.files)


def test_a_log_softmax_output_trains_with_nll(tmp_path):
    assert get_model(write_model(tmp_path, final="lambda v: jax.nn.log_softmax(v, axis=1)")).loss == "nll"


def test_misfits_are_clear_errors(tmp_path):
    spec = write_model(tmp_path, outputs=10)
    with pytest.raises(ConfigError, match="10 outputs but the data set has 2 classes"):
        get_model(spec).build(2)
    assert cli.main(["train", "--model", spec, "--epochs", "1", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    other = tmp_path / "other"
    other.mkdir()
    spec2 = write_model(other, weights=False)
    with pytest.raises(ConfigError, match="weights.npz not found.*--init flax"):
        get_model(spec2).build(2)
    get_model(spec2).build(2, init="flax")  # the class's own draw
    with pytest.raises(ConfigError, match="defines no 'Missing'; its NNX classes: Tiny"):
        get_model(f"{other / 'model.py'}:Missing")
    with pytest.raises(ConfigError, match="model file .* not found"):
        get_model(f"{tmp_path / 'nowhere.py'}:Tiny")
    with pytest.raises(ConfigError, match=r"takes inputs of shape \(3, 32, 32\)"):
        get_model(spec2).check_fits((1, 99, 26), 2)
