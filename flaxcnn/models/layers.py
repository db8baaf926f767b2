"""Layers with PyTorch semantics that Flax does not provide as-is, and the layout convention.

Layout, in one place: every flaxcnn model accepts the labs' NCHW input, transposes it to NHWC
once (:func:`nchw_to_nhwc`), runs NHWC convolutions with HWIO kernels, and flattens in NHWC
order. The PyTorch labs flatten in NCHW order (``out.view(-1, C*H*W)``); the converter
(:mod:`flaxcnn.convert`) permutes the rows of the first Linear after a conv stack to match, using
the ``(C, H, W)`` each model declares in ``nchw_flatten``. Outputs are identical; only the
storage order of that one weight matrix differs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flaxcnn.errors import InputShapeError
from flaxcnn.models import ops
# moved to flaxcnn.models.nn (the torch.nn-named layers); importable from here as before
from flaxcnn.models.nn import (  # noqa: F401
    BatchNorm2d, Dropout, Dropout2d, _bn_forward, batch_norm_train, check_init,
)


def check_input(x: jax.Array, expected_chw: Sequence[int], model_name: str) -> jax.Array:
    """Refuse inputs a model cannot take, with the expected shape in the message.

    Shapes are static under ``jit``, so this costs nothing at run time. Float inputs of any
    width are cast to float32; integer inputs (e.g. raw uint8 pixels) are refused because
    silently scaling them would hide a missing normalisation step.
    """
    expected = tuple(int(d) for d in expected_chw)
    if not hasattr(x, "shape"):  # lists, scalars: the checks below then name their shape
        x = jnp.asarray(x)
    shape = tuple(x.shape)
    want = "(N, " + ", ".join(str(d) for d in expected) + ")"
    if len(shape) != 4:
        raise InputShapeError(
            f"{model_name} expects a 4-D NCHW batch {want}, got a {len(shape)}-D array of shape "
            f"{shape}" + (" (add the batch axis with x[None])" if shape == expected else "")
        )
    if shape[1:] != expected:
        hint = ""
        if shape[1:] == (expected[1], expected[2], expected[0]):
            hint = " (this looks like NHWC: transpose with x.transpose(0, 3, 1, 2))"
        raise InputShapeError(f"{model_name} expects input shape {want}, got {shape}{hint}")
    if shape[0] == 0:
        raise InputShapeError(f"{model_name} got an empty batch {shape}; pass at least one example {want}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputShapeError(
            f"{model_name} expects floating-point input, got dtype {x.dtype}; convert pixels with "
            "x.astype(np.float32) / 255 (and normalise) first"
        )
    return x.astype(jnp.float32)


def nchw_to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def torch_uniform_init(fan_in: int) -> nnx.Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Conv2d/Linear weights and biases
    (``kaiming_uniform_(a=sqrt(5))`` reduces to this bound)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv2d(
    in_ch: int, out_ch: int, kernel_size: int, padding: int, *, init: str, rngs: nnx.Rngs
) -> nnx.Conv:
    """``nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding)`` as an NHWC ``nnx.Conv``."""
    kwargs = {}
    if init == "torch":
        fan_in = in_ch * kernel_size * kernel_size
        kwargs = dict(kernel_init=torch_uniform_init(fan_in), bias_init=torch_uniform_init(fan_in))
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel_size, kernel_size),
        padding=((padding, padding), (padding, padding)),
        conv_general_dilated=ops.conv_general_dilated,
        rngs=rngs,
        **kwargs,
    )


def linear(in_f: int, out_f: int, *, init: str, rngs: nnx.Rngs) -> nnx.Linear:
    """``nn.Linear(in_f, out_f)``; the kernel is stored (in, out), the transpose of torch's."""
    kwargs = {}
    if init == "torch":
        kwargs = dict(kernel_init=torch_uniform_init(in_f), bias_init=torch_uniform_init(in_f))
    return nnx.Linear(in_f, out_f, rngs=rngs, **kwargs)
