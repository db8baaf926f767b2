"""Speech lab networks on log-mel features (N, 1, 99, 26) as Flax NNX modules.

``ConvNet`` mirrors the lab's class attribute by attribute. Output is ``log_softmax`` as in the
lab, trained with NLL loss. Layer shapes for a batch of 256, as the lab prints them:
(256, 1, 99, 26) -> conv (256, 10, 90, 17) -> pool (256, 10, 22, 4) -> (256, 880) -> (256, 100)
-> (256, 35).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxcnn.models.layers import (
    Dropout, Dropout2d, check_init, check_input, conv2d, linear, nchw_to_nhwc,
)
from flaxcnn.models.ops import max_pool

SPEECH_CHW = (1, 99, 26)


class ConvNet(nnx.Module):
    """conv(1->10, k10, valid), max-pool 4, ReLU, Dropout2d(0.2), fc(880->100), Dropout(0.2),
    fc(100->classes), log_softmax. As in the lab there is no activation after ``fc1``."""

    def __init__(self, num_classes: int = 35, *, init: str = "torch", rngs: nnx.Rngs):
        init = check_init(init)
        self.conv1 = conv2d(1, 10, 10, 0, init=init, rngs=rngs)
        self.conv1_drop = Dropout2d(0.2, rngs=rngs)
        self.drop1 = Dropout(0.2, rngs=rngs)
        self.fc1 = linear(880, 100, init=init, rngs=rngs)
        self.fc2 = linear(100, num_classes, init=init, rngs=rngs)
        self.nchw_flatten = {"fc1": (10, 22, 4)}

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nchw_to_nhwc(check_input(x, SPEECH_CHW, "ConvNet"))
        x = self.conv1(x)
        x = jax.nn.relu(max_pool(x, 4))
        x = self.conv1_drop(x)
        x = x.reshape(x.shape[0], -1)
        x = self.fc1(x)
        x = self.drop1(x)
        x = self.fc2(x)
        return jax.nn.log_softmax(x, axis=1)
