"""Bad model inputs: a clear InputShapeError naming the expected shape, eagerly and under jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxcnn.errors import InputShapeError
from flaxcnn.models.registry import MODELS, get_model


@pytest.fixture(scope="module")
def models():
    """A real model for the tests that compute (building one compiles its initialisers: slow)."""
    model = MODELS["net"].build()
    model.eval()
    return {"net": model}


@pytest.fixture(scope="module")
def abstract_models():
    """Every registered model with shape-only parameters: the input check runs before any
    parameter is read, so these are enough (and free) to test it on every model."""
    return {name: nnx.eval_shape(lambda spec=spec: spec.build()) for name, spec in MODELS.items()}


def good_batch(name: str, n: int = 2, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).normal(size=MODELS[name].example_shape(n)).astype(dtype)


CALLS = {"eager": lambda model, x: model(x), "jit": lambda model, x: jax.jit(lambda a: model(a))(x)}


def bad_inputs(chw: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, fragment of the message); every fragment names what is expected or wrong."""
    c, h, w = chw
    return {
        "no batch axis": ((c, h, w), "add the batch axis with x[None]"),
        "rank 5": ((1, 2, c, h, w), "got a 5-D array"),
        "rank 2": ((2, c * h * w), "got a 2-D array"),
        "NHWC": ((2, h, w, c), "this looks like NHWC"),
        "wrong channels": ((2, c + 2, h, w), f"got (2, {c + 2}, {h}, {w})"),
        "wrong spatial size": ((2, c, h - 4, w + 1), f"got (2, {c}, {h - 4}, {w + 1})"),
        "empty batch": ((0, c, h, w), "empty batch"),
    }


CASES = [(name, case) for name in MODELS for case in bad_inputs(MODELS[name].input_chw)]


@pytest.mark.parametrize("how", sorted(CALLS))
@pytest.mark.parametrize("name, case", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_wrong_shape_names_the_expected_shape(abstract_models, name, case, how):
    shape, fragment = bad_inputs(MODELS[name].input_chw)[case]
    want = "(N, " + ", ".join(str(d) for d in MODELS[name].input_chw) + ")"
    with pytest.raises(InputShapeError) as err:
        CALLS[how](abstract_models[name], np.zeros(shape, np.float32))
    message = str(err.value)
    assert want in message and fragment in message
    assert MODELS[name].flax_class.__name__ in message
    assert "Traceback" not in message and "XlaRuntimeError" not in message


@pytest.mark.parametrize("how", sorted(CALLS))
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.bool_, np.complex64])
def test_non_float_dtypes_are_refused_with_the_fix(abstract_models, dtype, how):
    x = good_batch("net").astype(dtype)
    with pytest.raises(InputShapeError, match=f"expects floating-point input, got dtype {np.dtype(dtype)}.*/ 255"):
        CALLS[how](abstract_models["net"], x)


@pytest.mark.parametrize("how", sorted(CALLS))
@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_widths_run_in_float32(models, dtype, how):
    """float16/float64 are cast to float32: the result equals feeding the float32 cast."""
    x = good_batch("net", dtype=dtype)
    out = CALLS[how](models["net"], x)
    ref = CALLS[how](models["net"], x.astype(np.float32))
    assert out.dtype == jnp.float32 and out.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_python_lists_and_scalars_get_the_shape_message(models):
    with pytest.raises(InputShapeError, match=r"got a 0-D array of shape \(\)"):
        models["net"](1.0)
    nested = np.zeros((3, 32, 32), np.float32).tolist()
    with pytest.raises(InputShapeError, match=r"add the batch axis"):
        models["net"](nested)
    out = models["net"]([nested])  # a well-formed nested list is an array like any other
    assert out.shape == (1, 2)


def test_batch_of_one_and_odd_sizes_work(models):
    """The checks refuse only what is wrong: any positive batch size is accepted."""
    for n in (1, 3):
        assert CALLS["jit"](models["net"], good_batch("net", n)).shape == (n, 2)


def test_get_model_unknown_name_lists_the_valid_ones():
    from flaxcnn.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        get_model("resnet50")
    assert "resnet50" in str(err.value) and all(name in str(err.value) for name in MODELS)
