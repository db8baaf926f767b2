"""Lab 8 networks (CIFAR-2, airplane vs bird) as Flax NNX modules, attribute by attribute.

Each class mirrors the PyTorch class of the same name in the lab notebook: the same attribute
names (``conv1``, ``fc1``, ``bn1``, ``dropout``), the same layer sizes and the same forward.
``num_classes`` defaults to the lab's 2; ``init="torch"`` draws weights like PyTorch does.
Input is NCHW (N, 3, 32, 32); see :mod:`flaxcnn.models.layers` for the layout inside.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxcnn.models.layers import (
    BatchNorm2d, Dropout, Dropout2d, check_init, check_input, conv2d, linear, nchw_to_nhwc,
)
from flaxcnn.models.conv_policy import DEFAULT
from flaxcnn.models.ops import max_pool

CIFAR_CHW = (3, 32, 32)


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


class Net(nnx.Module):
    """conv(3->16) tanh pool, conv(16->8) tanh pool, fc(512->32) tanh, fc(32->classes)."""

    def __init__(self, num_classes: int = 2, *, init: str = "torch", rngs: nnx.Rngs):
        init = check_init(init)
        self.conv_policy = DEFAULT  # which implementation runs each pool (see conv_policy.apply)
        self.conv1 = conv2d(3, 16, 3, 1, init=init, rngs=rngs)
        self.conv2 = conv2d(16, 8, 3, 1, init=init, rngs=rngs)
        self.fc1 = linear(8 * 8 * 8, 32, init=init, rngs=rngs)
        self.fc2 = linear(32, num_classes, init=init, rngs=rngs)
        self.nchw_flatten = {"fc1": (8, 8, 8)}

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nchw_to_nhwc(check_input(x, CIFAR_CHW, "Net"))
        out = max_pool(jnp.tanh(self.conv1(out)), 2, self.conv_policy)
        out = max_pool(jnp.tanh(self.conv2(out)), 2, self.conv_policy)
        out = _flatten(out)
        out = jnp.tanh(self.fc1(out))
        return self.fc2(out)


class NetWidth(nnx.Module):
    """Net with n_chans1 and 2*n_chans1 channels and a 4*n_chans1 hidden layer."""

    def __init__(self, n_chans1: int = 32, num_classes: int = 2, *, init: str = "torch", rngs: nnx.Rngs):
        init = check_init(init)
        self.conv_policy = DEFAULT  # which implementation runs each pool (see conv_policy.apply)
        self.n_chans1 = n_chans1
        self.conv1 = conv2d(3, n_chans1, 3, 1, init=init, rngs=rngs)
        self.conv2 = conv2d(n_chans1, n_chans1 * 2, 3, 1, init=init, rngs=rngs)
        self.fc1 = linear(n_chans1 * 2 * 8 * 8, n_chans1 * 4, init=init, rngs=rngs)
        self.fc2 = linear(n_chans1 * 4, num_classes, init=init, rngs=rngs)
        self.nchw_flatten = {"fc1": (n_chans1 * 2, 8, 8)}

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nchw_to_nhwc(check_input(x, CIFAR_CHW, "NetWidth"))
        out = max_pool(jnp.tanh(self.conv1(out)), 2, self.conv_policy)
        out = max_pool(jnp.tanh(self.conv2(out)), 2, self.conv_policy)
        out = _flatten(out)
        out = jnp.tanh(self.fc1(out))
        return self.fc2(out)


class NetDepth(nnx.Module):
    """Three convolutions, each followed by tanh and a 2x2 max-pool, then fc(16*n_chans1).

    NOTE: the lab's forward has no max-pool after ``conv2``. Its feature map is then
    (n_chans1, 8, 8) and ``out.view(-1, n_chans1 * 4 * 4)`` folds every image into 4 rows, so the
    model returns 4N rows for N images and ``CrossEntropyLoss`` fails with a batch-size
    mismatch. ``fc1``'s size (n_chans1 * 4 * 4) says three poolings were meant, as in the
    textbook network the lab follows; this class and its PyTorch reference
    (``parity.references.NetDepth``) pool after ``conv2``. ``parity.references.NetDepthAsWritten``
    keeps the lab's text, and a test shows it cannot train.
    """

    def __init__(self, n_chans1: int = 32, num_classes: int = 2, *, init: str = "torch", rngs: nnx.Rngs):
        init = check_init(init)
        self.conv_policy = DEFAULT  # which implementation runs each pool (see conv_policy.apply)
        self.n_chans1 = n_chans1
        self.conv1 = conv2d(3, n_chans1, 3, 1, init=init, rngs=rngs)
        self.conv2 = conv2d(n_chans1, n_chans1, 3, 1, init=init, rngs=rngs)
        self.conv3 = conv2d(n_chans1, n_chans1, 3, 1, init=init, rngs=rngs)
        self.fc1 = linear(n_chans1 * 4 * 4, n_chans1 * 4, init=init, rngs=rngs)
        self.fc2 = linear(n_chans1 * 4, num_classes, init=init, rngs=rngs)
        self.nchw_flatten = {"fc1": (n_chans1, 4, 4)}

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nchw_to_nhwc(check_input(x, CIFAR_CHW, "NetDepth"))
        out = max_pool(jnp.tanh(self.conv1(out)), 2, self.conv_policy)
        out = max_pool(jnp.tanh(self.conv2(out)), 2, self.conv_policy)
        out = max_pool(jnp.tanh(self.conv3(out)), 2, self.conv_policy)
        out = _flatten(out)
        out = jnp.tanh(self.fc1(out))
        return self.fc2(out)


class NetDropout(nnx.Module):
    """Net widened to n_chans1 with ``nn.Dropout2d(p=0.5)`` after the first pool and after fc1.

    As in the lab, one ``dropout`` attribute serves both places: on the 4-D map it drops whole
    channels; on the 2-D ``fc1`` output PyTorch 2.x falls back to element-wise dropout
    (:class:`~flaxcnn.models.layers.Dropout2d` does the same).
    """

    def __init__(self, n_chans1: int = 32, num_classes: int = 2, *, init: str = "torch", rngs: nnx.Rngs):
        init = check_init(init)
        self.conv_policy = DEFAULT  # which implementation runs each pool (see conv_policy.apply)
        self.n_chans1 = n_chans1
        self.conv1 = conv2d(3, n_chans1, 3, 1, init=init, rngs=rngs)
        self.conv2 = conv2d(n_chans1, n_chans1, 3, 1, init=init, rngs=rngs)
        self.fc1 = linear(n_chans1 * 8 * 8, n_chans1 * 4, init=init, rngs=rngs)
        self.fc2 = linear(n_chans1 * 4, num_classes, init=init, rngs=rngs)
        self.dropout = Dropout2d(0.5, rngs=rngs)
        self.nchw_flatten = {"fc1": (n_chans1, 8, 8)}

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nchw_to_nhwc(check_input(x, CIFAR_CHW, "NetDropout"))
        out = max_pool(jnp.tanh(self.conv1(out)), 2, self.conv_policy)
        out = self.dropout(out)
        out = max_pool(jnp.tanh(self.conv2(out)), 2, self.conv_policy)
        out = _flatten(out)
        out = jnp.tanh(self.fc1(out))
        out = self.dropout(out)
        return self.fc2(out)


class NetBatchNorm(nnx.Module):
    """conv-BN-tanh-pool twice, fc1 tanh, ``nn.Dropout(p=0.5)``, fc2."""

    def __init__(self, n_chans1: int = 32, num_classes: int = 2, *, init: str = "torch", rngs: nnx.Rngs):
        init = check_init(init)
        self.conv_policy = DEFAULT  # which implementation runs each pool (see conv_policy.apply)
        self.n_chans1 = n_chans1
        self.conv1 = conv2d(3, n_chans1, 3, 1, init=init, rngs=rngs)
        self.bn1 = BatchNorm2d(n_chans1)
        self.conv2 = conv2d(n_chans1, n_chans1, 3, 1, init=init, rngs=rngs)
        self.bn2 = BatchNorm2d(n_chans1)
        self.fc1 = linear(n_chans1 * 8 * 8, n_chans1 * 4, init=init, rngs=rngs)
        self.fc2 = linear(n_chans1 * 4, num_classes, init=init, rngs=rngs)
        self.dropout = Dropout(0.5, rngs=rngs)
        self.nchw_flatten = {"fc1": (n_chans1, 8, 8)}

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nchw_to_nhwc(check_input(x, CIFAR_CHW, "NetBatchNorm"))
        out = max_pool(jnp.tanh(self.bn1(self.conv1(out))), 2, self.conv_policy)
        out = max_pool(jnp.tanh(self.bn2(self.conv2(out))), 2, self.conv_policy)
        out = _flatten(out)
        out = jnp.tanh(self.fc1(out))
        out = self.dropout(out)
        return self.fc2(out)
