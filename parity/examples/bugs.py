"""Realistic porting bugs, planted into a correct Flax port to show that the layer report finds them.

Each function takes the Flax model and the PyTorch-style name of one layer (as
:func:`flaxcnn.convert.named_layers` names it) and changes that layer in place the way a
hand-written port typically gets it wrong. :data:`BUGS` names them for the command line.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from flaxcnn import convert
from flaxcnn.models.layers import BatchNorm2d, Dropout, batch_norm_train


def layer(model: nnx.Module, name: str):
    """The layer of ``model`` that PyTorch would call ``name``."""
    layers = dict(convert.named_layers(model))
    if name not in layers:
        raise KeyError(f"{type(model).__name__} has no layer {name!r}; layers: {', '.join(layers)}")
    return layers[name]


class BiasedVarianceBatchNorm2d(BatchNorm2d):
    """Stores the *biased* batch variance in its running variance (what ``nnx.BatchNorm`` does)."""

    def __call__(self, x: jax.Array, *, use_running_average: bool | None = None) -> jax.Array:
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        if use_ra:
            return super().__call__(x, use_running_average=True)
        y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], self.eps)
        m = self.momentum
        self.mean[...] = (1.0 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
        self.var[...] = (1.0 - m) * self.var[...] + m * jax.lax.stop_gradient(var)
        self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        return y


class UnscaledDropout(Dropout):
    """Zeroes dropped values but forgets to scale the kept ones by 1/(1-p)."""

    def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
        out = super().__call__(inputs, deterministic=deterministic, rngs=rngs)
        deterministic = self.deterministic if deterministic is None else deterministic
        return out if deterministic else out * (1.0 - self.rate)


def flatten_h_w_swapped(model: nnx.Module, name: str) -> None:
    """The Linear after the flatten takes its rows in (w, h, c) order instead of (h, w, c)."""
    linear, (c, h, w) = layer(model, name), model.nchw_flatten[name]
    k = np.asarray(linear.kernel[...])
    linear.kernel[...] = k.reshape(h, w, c, -1).transpose(1, 0, 2, 3).reshape(k.shape)


def kernel_h_w_swapped(model: nnx.Module, name: str) -> None:
    """The conv kernel converted OIHW -> WHIO ``(3, 2, 1, 0)`` instead of HWIO ``(2, 3, 1, 0)``."""
    conv = layer(model, name)
    conv.kernel[...] = conv.kernel[...].transpose(1, 0, 2, 3)


def batchnorm_biased_variance(model: nnx.Module, name: str) -> None:
    """BatchNorm stores the biased batch variance (PyTorch stores the unbiased one)."""
    layer(model, name).__class__ = BiasedVarianceBatchNorm2d


def batchnorm_flax_momentum(model: nnx.Module, name: str) -> None:
    """BatchNorm momentum written in Flax's convention (0.9) where PyTorch's 0.1 is meant."""
    layer(model, name).momentum = 0.9


def dropout_without_scale(model: nnx.Module, name: str) -> None:
    """Dropout without the 1/(1-p) scaling of kept values."""
    layer(model, name).__class__ = UnscaledDropout


def padding_off_by_one(model: nnx.Module, name: str) -> None:
    """A conv padded one row and column more at the end than at the start (e.g. a hand-computed
    'same' padding): the output keeps its shape but is shifted by one position."""
    conv = layer(model, name)
    conv.padding = tuple((lo - 1, hi + 1) for lo, hi in conv.padding)


BUGS: dict[str, Callable[[nnx.Module, str], None]] = {
    "flatten-hw": flatten_h_w_swapped,
    "kernel-hw": kernel_h_w_swapped,
    "bn-biased-var": batchnorm_biased_variance,
    "bn-momentum": batchnorm_flax_momentum,
    "dropout-scale": dropout_without_scale,
    "padding": padding_off_by_one,
}
