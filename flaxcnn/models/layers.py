"""Layers with PyTorch semantics that Flax does not provide as-is, and the layout convention.

Layout, in one place: every flaxcnn model accepts the labs' NCHW input, transposes it to NHWC
once (:func:`nchw_to_nhwc`), runs NHWC convolutions with HWIO kernels, and flattens in NHWC
order. The PyTorch labs flatten in NCHW order (``out.view(-1, C*H*W)``); the converter
(:mod:`flaxcnn.convert`) permutes the rows of the first Linear after a conv stack to match, using
the ``(C, H, W)`` each model declares in ``nchw_flatten``. Outputs are identical; only the
storage order of that one weight matrix differs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flaxcnn.errors import InputShapeError
from flaxcnn.models import ops


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


def check_init(init: str) -> str:
    if init not in ("torch", "flax"):
        raise ValueError(f"init must be 'torch' (PyTorch's default) or 'flax' (lecun_normal), got {init!r}")
    return init


class Dropout(nnx.Dropout):
    """``nn.Dropout``: element-wise, inputs scaled by 1/(1-p) in training, identity in eval.

    The keep-mask is drawn by :meth:`keep_mask`, the only random part, so the parity suite can
    replay masks that PyTorch drew (see ``parity.dropout``) and test everything else as is.
    """

    def mask_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def keep_mask(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return jax.random.bernoulli(key, 1.0 - self.rate, shape)

    def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0.0:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        stream = rngs if rngs is not None else self.rngs
        if stream is None:
            raise ValueError("dropout in training mode needs rngs: build the model with nnx.Rngs(dropout=...)")
        key = stream if isinstance(stream, jax.Array) else (
            stream[self.rng_collection]() if isinstance(stream, nnx.Rngs) else stream()
        )
        keep = self.keep_mask(key, self.mask_shape(tuple(inputs.shape)))
        keep_prob = 1.0 - self.rate
        return jnp.where(jnp.broadcast_to(keep, inputs.shape), inputs / keep_prob, 0.0)


class Dropout2d(Dropout):
    """``nn.Dropout2d`` as PyTorch 2.x applies it.

    On a 4-D batch it zeroes whole channels (in NHWC the mask is (N, 1, 1, C)). On a 2-D batch
    PyTorch 2.x warns and falls back to element-wise dropout, which lab 8's ``NetDropout`` relies
    on after ``fc1``; this layer does the same (without the warning).
    """

    def mask_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) == 4:
            return (shape[0], 1, 1, shape[3])
        if len(shape) == 2:
            return shape
        raise InputShapeError(f"Dropout2d takes a 4-D (N, H, W, C) or 2-D (N, F) array, got shape {shape}")


class BatchNorm2d(nnx.Module):
    """``nn.BatchNorm2d`` over the channel (last, NHWC) axis with PyTorch's exact semantics.

    Why not ``nnx.BatchNorm``: PyTorch normalises with the biased batch variance but stores the
    *unbiased* one in ``running_var``, and counts ``num_batches_tracked``; Flax stores the biased
    variance. ``momentum`` here is PyTorch's (weight of the new batch, 0.1), i.e. Flax 0.9.
    Batch statistics are plain means over the batch axes, so under ``jax.sharding`` with a
    sharded batch they are global-batch statistics with no extra code.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.1, eps: float = 1e-5,
                 use_running_average: bool = False):
        self.num_features = num_features
        self.momentum = momentum
        self.eps = eps
        self.use_running_average = use_running_average
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array, *, use_running_average: bool | None = None) -> jax.Array:
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        if use_ra:
            mean, var = self.mean[...], self.var[...]
        else:
            y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], self.eps)
            n = math.prod(x.shape[:-1])
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            self.mean[...] = (1.0 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
            self.var[...] = (1.0 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
            return y
        inv = jax.lax.rsqrt(var + self.eps) * self.scale[...]
        return (x - mean) * inv + self.bias[...]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch norm over all axes but the last: ``(y, batch mean, biased batch var)``.

    The forward pass is the textbook two-pass one (mean, then the mean of squared deviations),
    as PyTorch computes it. The backward pass is written out (the usual closed form: one pass
    that sums ``g`` and ``g * (x - mean)`` per channel, one elementwise pass for ``dx``) rather
    than left to autodiff, whose gradient through the two means took several more passes over
    the activations: NetBatchNorm's training step +16%, SpeechNet's +12% on CPU at batch 64.
    """
    y, mean, var, _ = _bn_forward(x, scale, bias, eps)
    return y, mean, var


def _bn_forward(x, scale, bias, eps):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), axis=axes)
    inv = jax.lax.rsqrt(var + eps)
    return centred * (inv * scale) + bias, mean, var, inv


def _bn_fwd(x, scale, bias, eps):
    y, mean, var, inv = _bn_forward(x, scale, bias, eps)
    return (y, mean, var), (x, mean, inv, scale)


def _bn_bwd(eps, residuals, cotangents):
    x, mean, inv, scale = residuals
    g, g_mean, g_var = cotangents
    axes = tuple(range(x.ndim - 1))
    n = math.prod(x.shape[:-1])
    centred = x - mean
    sum_g = jnp.sum(g, axis=axes)
    sum_g_centred = jnp.sum(g * centred, axis=axes)
    grad_scale = sum_g_centred * inv
    # d/dx of y through x, the mean and the variance; then the batch mean's and variance's own
    # cotangents (zero when, as in BatchNorm2d, they only feed stop_gradient'ed running stats)
    k = scale * inv
    grad_x = k * (g - sum_g / n - centred * (inv * inv) * (sum_g_centred / n))
    grad_x = grad_x + g_mean / n + centred * (2.0 * g_var / n)
    return grad_x, grad_scale, sum_g


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)
