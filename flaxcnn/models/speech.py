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
    BatchNorm2d, Dropout, Dropout2d, check_init, check_input, conv2d, linear, nchw_to_nhwc,
)
from flaxcnn.models.conv_policy import DEFAULT
from flaxcnn.models.nn import ReLU
from flaxcnn.models.ops import global_avg_pool, max_pool

SPEECH_CHW = (1, 99, 26)


class ConvNet(nnx.Module):
    """conv(1->10, k10, valid), max-pool 4, ReLU, Dropout2d(0.2), fc(880->100), Dropout(0.2),
    fc(100->classes), log_softmax. As in the lab there is no activation after ``fc1``."""

    def __init__(self, num_classes: int = 35, *, init: str = "torch", rngs: nnx.Rngs):
        init = check_init(init)
        self.conv_policy = DEFAULT  # which implementation runs each pool (see conv_policy.apply)
        self.conv1 = conv2d(1, 10, 10, 0, init=init, rngs=rngs)
        self.relu = ReLU()  # a layer, not jax.nn.relu inline: the parity checks' seam (``tap``)
        self.conv1_drop = Dropout2d(0.2, rngs=rngs)
        self.drop1 = Dropout(0.2, rngs=rngs)
        self.fc1 = linear(880, 100, init=init, rngs=rngs)
        self.fc2 = linear(100, num_classes, init=init, rngs=rngs)
        self.nchw_flatten = {"fc1": (10, 22, 4)}

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nchw_to_nhwc(check_input(x, SPEECH_CHW, "ConvNet"))
        x = self.conv1(x)
        x = self.relu(max_pool(x, 4, self.conv_policy))
        x = self.conv1_drop(x)
        x = x.reshape(x.shape[0], -1)
        x = self.fc1(x)
        x = self.drop1(x)
        x = self.fc2(x)
        return jax.nn.log_softmax(x, axis=1)


class SpeechNet(nnx.Module):
    """A small all-3x3 CNN for unseen speakers: the small-model baseline beside the exercise's
    :class:`SpeechResNet`.

    ``bn0`` (BatchNorm2d(1)) normalises the raw log energies, then one block per entry of
    ``channels``: conv 3x3 (padding 1) -> BatchNorm2d -> ReLU, followed by max-pool 2 except
    after the last block, which average pooling over all positions summarises over time and frequency; then
    ``Dropout(dropout)``, ``fc`` to the classes and log_softmax (NLL loss, as in the lab).
    With the default (8, 16, 32, 64): (N, 1, 99, 26) -> (N, 8, 49, 13) -> (N, 16, 24, 6) ->
    (N, 32, 12, 3) -> (N, 64, 12, 3) -> (N, 64) -> (N, classes); 26,901 parameters for 35
    classes. Averaging the last block over 36 positions (rather than pooling it to 6 first)
    also keeps float32 rounding differences from PyTorch at about one ulp of the output.
    Blocks are attributes ``conv1, bn1, conv2, bn2, ...`` so the state_dict keys are flat.
    """

    def __init__(self, num_classes: int = 35, channels: tuple[int, ...] = (8, 16, 32, 64),
                 dropout: float = 0.3, *, init: str = "torch", rngs: nnx.Rngs):
        init = check_init(init)
        self.conv_policy = DEFAULT  # which implementation runs each pool (see conv_policy.apply)
        self.num_blocks = len(channels)
        self.bn0 = BatchNorm2d(1)
        self.relu = ReLU()  # a layer, not jax.nn.relu inline: the parity checks' seam (``tap``)
        for i, (c_in, c_out) in enumerate(zip((1, *channels[:-1]), channels), start=1):
            setattr(self, f"conv{i}", conv2d(c_in, c_out, 3, 1, init=init, rngs=rngs))
            setattr(self, f"bn{i}", BatchNorm2d(c_out))
        self.drop = Dropout(dropout, rngs=rngs)
        self.fc = linear(channels[-1], num_classes, init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.bn0(nchw_to_nhwc(check_input(x, SPEECH_CHW, "SpeechNet")))
        for i in range(1, self.num_blocks + 1):
            x = self.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            if i < self.num_blocks:  # the last block is averaged over all positions instead
                x = max_pool(x, 2, self.conv_policy)
        x = self.drop(global_avg_pool(x))
        return jax.nn.log_softmax(self.fc(x), axis=1)


class SpeechResNet(nnx.Module):
    """A small residual network for keywords from unseen speakers (the exercise, chosen by
    speaker-grouped cross-validation: see the README's speech section).

    ``bn_in`` (BatchNorm2d(1)) normalises the raw log energies; a stem conv 3x3 ->
    BatchNorm2d -> ReLU with ``channels[0]`` maps at full resolution; then one residual stage
    per entry of ``channels``, each after a 2x2 max-pool: ``blocks`` residual blocks of two conv
    3x3 -> BatchNorm2d layers (ReLU between them and after the sum), whose shortcut is the
    identity, or a 1x1 conv -> BatchNorm2d where the channel count changes. Global average
    pooling, ``Dropout(dropout)``, ``fc``, log_softmax (NLL loss, as in the lab).
    With the default (16, 32, 64): (N, 1, 99, 26) -> stem (N, 16, 99, 26) -> (N, 16, 49, 13)
    -> (N, 32, 24, 6) -> (N, 64, 12, 3) -> (N, 64) -> (N, classes).
    Layers are flat attributes (``s1b1_conv1``, ``s1b1_bn1``, ..., ``s2b1_proj``,
    ``s2b1_proj_bn``) so the state_dict keys are flat.
    """

    def __init__(self, num_classes: int = 35, channels: tuple[int, ...] = (16, 32, 64), blocks: int = 1,
                 dropout: float = 0.3, *, init: str = "torch", rngs: nnx.Rngs):
        init = check_init(init)
        self.conv_policy = DEFAULT  # which implementation runs each pool (see conv_policy.apply)
        self.channels, self.blocks = tuple(channels), int(blocks)
        self.bn_in = BatchNorm2d(1)
        self.relu = ReLU()  # a layer, not jax.nn.relu inline: the parity checks' seam (``tap``)
        self.stem = conv2d(1, channels[0], 3, 1, init=init, rngs=rngs)
        self.stem_bn = BatchNorm2d(channels[0])
        c_in = channels[0]
        for name, c_out in self.block_names():
            setattr(self, f"{name}_conv1", conv2d(c_in, c_out, 3, 1, init=init, rngs=rngs))
            setattr(self, f"{name}_bn1", BatchNorm2d(c_out))
            setattr(self, f"{name}_conv2", conv2d(c_out, c_out, 3, 1, init=init, rngs=rngs))
            setattr(self, f"{name}_bn2", BatchNorm2d(c_out))
            if c_in != c_out:
                setattr(self, f"{name}_proj", conv2d(c_in, c_out, 1, 0, init=init, rngs=rngs))
                setattr(self, f"{name}_proj_bn", BatchNorm2d(c_out))
            c_in = c_out
        self.drop = Dropout(dropout, rngs=rngs)
        self.fc = linear(channels[-1], num_classes, init=init, rngs=rngs)

    def block_names(self) -> list[tuple[str, int]]:
        """(attribute prefix, output channels) of every residual block, in order."""
        return [(f"s{s}b{b}", c) for s, c in enumerate(self.channels, start=1) for b in range(1, self.blocks + 1)]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.bn_in(nchw_to_nhwc(check_input(x, SPEECH_CHW, "SpeechResNet")))
        x = self.relu(self.stem_bn(self.stem(x)))
        for name, _ in self.block_names():
            if name.rsplit("b", 1)[1] == "1":  # first block of a stage
                x = max_pool(x, 2, self.conv_policy)
            layer = lambda suffix: getattr(self, f"{name}_{suffix}")  # noqa: E731
            out = self.relu(layer("bn1")(layer("conv1")(x)))
            out = layer("bn2")(layer("conv2")(out))
            shortcut = layer("proj_bn")(layer("proj")(x)) if hasattr(self, f"{name}_proj") else x
            x = self.relu(out + shortcut)
        x = self.drop(global_avg_pool(x))
        return jax.nn.log_softmax(self.fc(x), axis=1)
