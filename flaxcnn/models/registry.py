"""Name -> model: the Flax class, its PyTorch reference, the input it takes and its loss.

A new variant is one Flax module, one PyTorch reference in ``parity/references.py`` and one
``register(...)`` line here. The PyTorch reference is named by import path so that flaxcnn
itself never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Literal

from flax import nnx

from flaxcnn.errors import ConfigError
from flaxcnn.models import cifar, speech
from flaxcnn.models import conv_policy as conv_policy_module
from flaxcnn.models.conv_policy import DEFAULT, ConvPolicy

Loss = Literal["cross_entropy", "nll"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    flax_class: type[nnx.Module]
    torch_reference: str  # "module:Class", importable when torch is installed
    input_chw: tuple[int, int, int]
    loss: Loss  # "cross_entropy" on logits (lab 8) or "nll" on log_softmax (speech lab)
    domain: Literal["cifar", "speech"]
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def build(self, num_classes: int | None = None, *, seed: int = 0, init: str = "torch",
              conv_policy: ConvPolicy = DEFAULT) -> nnx.Module:
        """A fresh model; ``num_classes`` None keeps the lab's default (2 for CIFAR, 35 for speech);
        ``conv_policy``: which implementation runs each CPU convolution and pool."""
        kwargs = dict(self.kwargs)
        if num_classes is not None:
            kwargs["num_classes"] = int(num_classes)
        model = self.flax_class(**kwargs, init=init, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
        return conv_policy_module.apply(model, conv_policy) if conv_policy != DEFAULT else model

    def torch_class(self):
        """The PyTorch reference class (imports torch)."""
        module_name, _, class_name = self.torch_reference.partition(":")
        return getattr(importlib.import_module(module_name), class_name)

    def build_torch(self, num_classes: int | None = None):
        kwargs = dict(self.kwargs)
        if num_classes is not None:
            kwargs["num_classes"] = int(num_classes)
        return self.torch_class()(**kwargs)

    def example_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, *self.input_chw)


MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in MODELS:
        raise ValueError(f"model {spec.name!r} is registered twice")
    MODELS[spec.name] = spec
    return spec


def get_model(name: str) -> ModelSpec:
    """The registered model ``name``, or the model class of a file for ``FILE.py:NAME``
    (:class:`flaxcnn.models.from_file.FileModelSpec`)."""
    from flaxcnn.models import from_file

    if from_file.is_file_spec(name):
        return from_file.file_spec(name)
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, or FILE.py:NAME "
                          "(a ported or hand-written NNX class)") from None


_CIFAR = cifar.CIFAR_CHW
_SPEECH = speech.SPEECH_CHW
register(ModelSpec("net", cifar.Net, "parity.references:Net", _CIFAR, "cross_entropy", "cifar",
                   description="lab 8 Net: conv16-conv8-fc32"))
register(ModelSpec("net-width", cifar.NetWidth, "parity.references:NetWidth", _CIFAR, "cross_entropy", "cifar",
                   description="lab 8 NetWidth(32): conv32-conv64-fc128"))
register(ModelSpec("net-depth", cifar.NetDepth, "parity.references:NetDepth", _CIFAR, "cross_entropy", "cifar",
                   description="lab 8 NetDepth(32): three conv32 (pool after conv2 restored)"))
register(ModelSpec("net-dropout", cifar.NetDropout, "parity.references:NetDropout", _CIFAR, "cross_entropy",
                   "cifar", description="lab 8 NetDropout(32): Dropout2d(0.5) after pool1 and fc1"))
register(ModelSpec("net-batchnorm", cifar.NetBatchNorm, "parity.references:NetBatchNorm", _CIFAR,
                   "cross_entropy", "cifar", description="lab 8 NetBatchNorm(32): BN after each conv"))
register(ModelSpec("convnet", speech.ConvNet, "parity.references:ConvNet", _SPEECH, "nll", "speech",
                   description="speech lab ConvNet: conv10(k10)-pool4-fc100"))
register(ModelSpec("speechnet", speech.SpeechNet, "parity.references:SpeechNet", _SPEECH, "nll", "speech",
                   description="speech lab exercise: input BN, conv3x3-BN-ReLU x4 (8-16-32-64), GAP, fc"))
register(ModelSpec("speechresnet", speech.SpeechResNet, "parity.references:SpeechResNet", _SPEECH, "nll", "speech",
                   description="speech exercise: input BN, stem conv3x3 16, residual stages 16-32-64 "
                               "(pool, 2 conv3x3-BN + shortcut), GAP, fc"))
# A candidate screened for the speech exercise by speaker-grouped cross-validation
# (benchmarks/results/speech_cv/screen.md): the same class and reference, twice the channels.
register(ModelSpec("speechresnet-wide", speech.SpeechResNet, "parity.references:SpeechResNet", _SPEECH, "nll",
                   "speech", kwargs={"channels": (32, 64, 128)},
                   description="SpeechResNet with twice the channels: stages 32-64-128"))
