"""Models are initialised in one jitted call: the same values as drawing each weight eagerly."""

import jax
import numpy as np
import pytest
from flax import nnx

from flaxcnn.models.registry import MODELS


def _arrays(model: nnx.Module) -> dict:
    flat = nnx.to_flat_state(nnx.state(model))
    out = {}
    for path, value in flat:
        value = value.get_value() if hasattr(value, "get_value") else value.value
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        out[path] = np.asarray(value)
    return out


@pytest.mark.parametrize(("name", "init"), [(name, "torch") for name in sorted(MODELS)] + [("net-batchnorm", "flax")])
def test_built_model_equals_eager_construction_bit_for_bit(name, init):
    spec = MODELS[name]
    built = spec.build(seed=3, init=init)
    eager = spec.flax_class(**spec.kwargs, init=init, rngs=nnx.Rngs(params=3, dropout=4))
    a, b = _arrays(built), _arrays(eager)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))
    assert type(built) is type(eager)
    assert len(a) > 2 and any(np.any(v != 0) for v in a.values())
