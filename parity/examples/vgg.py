"""A small VGG-style network written with ``nn.Sequential``, and its Flax NNX port.

The worked example of ``docs/hand-port.md``; the tests import this very code. Each stage is
conv 3x3 (padding 1) -> BatchNorm2d -> ReLU -> max-pool 2; the classifier is flatten ->
Linear -> ReLU -> Dropout -> Linear. The port mirrors the PyTorch containers one to one, so
the state_dict keys (``features.0.weight``, ``features.1.running_var``,
``classifier.1.weight``) name the same layers on both sides:

=======================  ===========================================  ========================
PyTorch                  Flax NNX                                     note
=======================  ===========================================  ========================
``nn.Sequential``        ``nnx.Sequential``                           same indices
``nn.Conv2d(k=3, p=1)``  ``flaxcnn.models.layers.conv2d``             NHWC, HWIO kernel
``nn.BatchNorm2d``       ``flaxcnn.models.layers.BatchNorm2d``        not ``nnx.BatchNorm``
``nn.ReLU()``            ``jax.nn.relu``                              a plain function
``nn.MaxPool2d(2)``      ``max_pool2`` (``flaxcnn.models.ops``)       a plain function
``nn.Flatten()``         ``flatten``                                  NHWC order, see below
``nn.Dropout(p)``        ``flaxcnn.models.layers.Dropout(p)``
``nn.Linear``            ``flaxcnn.models.layers.linear``             (in, out) kernel
=======================  ===========================================  ========================

Flatten order: the port flattens its NHWC map, so the first Linear sees features in (h, w, c)
order where PyTorch's ``nn.Flatten`` gives (c, h, w). ``VGG.nchw_flatten`` tells the converter
to permute that Linear's rows (``{"classifier.1": (C, H, W)}``).
"""

from __future__ import annotations

import jax
import torch.nn as nn
from flax import nnx

from flaxcnn.models.layers import BatchNorm2d, Dropout, check_init, check_input, conv2d, linear, nchw_to_nhwc
from flaxcnn.models.ops import max_pool

CHANNELS = (8, 16)  # two stages: small enough for tests, deep enough to have a flatten after pooling


def max_pool2(x: jax.Array) -> jax.Array:
    """``nn.MaxPool2d(2)`` on an NHWC batch."""
    return max_pool(x, 2)


def flatten(x: jax.Array) -> jax.Array:
    """``nn.Flatten()`` on an NHWC batch: features in (h, w, c) order."""
    return x.reshape(x.shape[0], -1)


def _side(image_size: int, channels: tuple[int, ...]) -> int:
    side = image_size // 2 ** len(channels)
    if side < 1:
        raise ValueError(f"image_size {image_size} is too small for {len(channels)} poolings by 2")
    return side


class VGG(nnx.Module):
    """Flax NNX port of :class:`VGGTorch`; takes NCHW input (N, 3, image_size, image_size)."""

    def __init__(self, num_classes: int = 2, channels: tuple[int, ...] = CHANNELS, image_size: int = 32,
                 hidden: int = 32, dropout: float = 0.5, *, init: str = "torch", rngs: nnx.Rngs):
        init = check_init(init)
        self.input_chw = (3, image_size, image_size)
        layers: list = []
        c_in = 3
        for c in channels:
            layers += [conv2d(c_in, c, 3, 1, init=init, rngs=rngs), BatchNorm2d(c), jax.nn.relu, max_pool2]
            c_in = c
        self.features = nnx.Sequential(*layers)
        side = _side(image_size, channels)
        self.classifier = nnx.Sequential(
            flatten,
            linear(c_in * side * side, hidden, init=init, rngs=rngs),
            jax.nn.relu,
            Dropout(dropout, rngs=rngs),
            linear(hidden, num_classes, init=init, rngs=rngs),
        )
        self.nchw_flatten = {"classifier.1": (c_in, side, side)}

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nchw_to_nhwc(check_input(x, self.input_chw, "VGG"))
        return self.classifier(self.features(x))


class VGGTorch(nn.Module):
    """The PyTorch network, written the usual way with ``nn.Sequential``."""

    def __init__(self, num_classes: int = 2, channels: tuple[int, ...] = CHANNELS, image_size: int = 32,
                 hidden: int = 32, dropout: float = 0.5):
        super().__init__()
        layers: list = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, kernel_size=3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        side = _side(image_size, channels)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * side * side, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))
