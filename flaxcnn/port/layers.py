"""Standard ``torch.nn`` layers -> constructors of :mod:`flaxcnn.models.nn`'s layers.

Each :class:`LayerSpec` names the NNX layer and lists its constructor parameters (PyTorch's
names and defaults, which ``flaxcnn.models.nn`` keeps) with how to read each value from the
torch module. A value equal to its default is left out of the generated constructor unless it
varies between instances of one class (see :mod:`flaxcnn.port.codegen`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from flaxcnn.port.capture import torch_layer_type

#: marks a parameter written positionally (always) rather than as ``name=value`` when non-default
POSITIONAL = object()
#: marks a keyword parameter written always (kernel_size reads better stated)
ALWAYS = object()


def compact(value):
    """A pair of equal ints as one int (``(3, 3)`` -> ``3``), lists as tuples: how a hand port writes them."""
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, tuple) and len(value) > 1 and all(v == value[0] and type(v) is int for v in value):
        return value[0]
    return value


@dataclass(frozen=True)
class Param:
    name: str
    default: object  # POSITIONAL, ALWAYS or the default value
    read: Callable[[nn.Module, int | None], object] | None = None  # (module, input rank) -> value

    def value(self, module: nn.Module, rank: int | None):
        if self.read is not None:
            return self.read(module, rank)
        return compact(getattr(module, self.name))


@dataclass(frozen=True)
class LayerSpec:
    nnx_name: str  # attribute of flaxcnn.models.nn
    params: tuple[Param, ...] = ()
    dtype: bool = False  # takes dtype=
    rngs: bool = False  # takes rngs=


def _bias(module, rank):
    return module.bias is not None


def _pool_stride(module, rank):
    """None when the stride is the kernel size (PyTorch's default), else the stride."""
    stride, kernel = compact(module.stride), compact(module.kernel_size)
    return None if stride == kernel or stride is None else stride


def _softmax_dim(module, rank):
    """flaxcnn's Softmax takes the physical axis: torch's dim of a 4-D tensor, translated to NHWC."""
    dim = module.dim
    if dim is None or rank != 4:
        return dim
    return (0, 3, 1, 2)[dim % 4]


def _normalized_shape(module, rank):
    shape = tuple(module.normalized_shape)
    return shape[0] if len(shape) == 1 else shape


def _scale_factor(module, rank):
    s = module.scale_factor
    return compact(tuple(float(v) for v in s)) if isinstance(s, (tuple, list)) else s


_CONV = (Param("in_channels", POSITIONAL), Param("out_channels", POSITIONAL), Param("kernel_size", ALWAYS),
         Param("stride", 1), Param("padding", 0))
_BN = (Param("num_features", POSITIONAL), Param("eps", 1e-5), Param("momentum", 0.1), Param("affine", True),
       Param("track_running_stats", True))
_UPSAMPLE = (Param("size", None), Param("scale_factor", None, _scale_factor))

LAYERS: dict[type, LayerSpec] = {
    nn.Conv2d: LayerSpec("Conv2d", _CONV + (Param("dilation", 1), Param("groups", 1), Param("bias", True, _bias),
                                            Param("padding_mode", "zeros")), dtype=True, rngs=True),
    nn.ConvTranspose2d: LayerSpec("ConvTranspose2d", _CONV + (Param("output_padding", 0), Param("groups", 1),
                                                              Param("bias", True, _bias), Param("dilation", 1)),
                                  dtype=True, rngs=True),
    nn.Linear: LayerSpec("Linear", (Param("in_features", POSITIONAL), Param("out_features", POSITIONAL),
                                    Param("bias", True, _bias)), dtype=True, rngs=True),
    nn.BatchNorm1d: LayerSpec("BatchNorm1d", _BN, dtype=True),
    nn.BatchNorm2d: LayerSpec("BatchNorm2d", _BN, dtype=True),
    nn.GroupNorm: LayerSpec("GroupNorm", (Param("num_groups", POSITIONAL), Param("num_channels", POSITIONAL),
                                          Param("eps", 1e-5), Param("affine", True)), dtype=True),
    nn.LayerNorm: LayerSpec("LayerNorm", (Param("normalized_shape", POSITIONAL, _normalized_shape), Param("eps", 1e-5),
                                          Param("elementwise_affine", True), Param("bias", True, _bias)), dtype=True),
    nn.Dropout: LayerSpec("Dropout", (Param("p", 0.5),), rngs=True),
    nn.Dropout2d: LayerSpec("Dropout2d", (Param("p", 0.5),), rngs=True),
    nn.MaxPool2d: LayerSpec("MaxPool2d", (Param("kernel_size", POSITIONAL), Param("stride", None, _pool_stride),
                                          Param("padding", 0), Param("dilation", 1), Param("return_indices", False),
                                          Param("ceil_mode", False))),
    nn.AvgPool2d: LayerSpec("AvgPool2d", (Param("kernel_size", POSITIONAL), Param("stride", None, _pool_stride),
                                          Param("padding", 0), Param("ceil_mode", False),
                                          Param("count_include_pad", True), Param("divisor_override", None))),
    nn.AdaptiveAvgPool2d: LayerSpec("AdaptiveAvgPool2d", (Param("output_size", POSITIONAL),)),
    nn.AdaptiveMaxPool2d: LayerSpec("AdaptiveMaxPool2d", (Param("output_size", POSITIONAL),
                                                          Param("return_indices", False))),
    nn.ReLU: LayerSpec("ReLU"),
    nn.ReLU6: LayerSpec("ReLU6"),
    nn.Hardswish: LayerSpec("Hardswish"),
    nn.Hardsigmoid: LayerSpec("Hardsigmoid"),
    nn.SiLU: LayerSpec("SiLU"),
    nn.Sigmoid: LayerSpec("Sigmoid"),
    nn.Tanh: LayerSpec("Tanh"),
    nn.LeakyReLU: LayerSpec("LeakyReLU", (Param("negative_slope", 0.01),)),
    nn.ELU: LayerSpec("ELU", (Param("alpha", 1.0),)),
    nn.GELU: LayerSpec("GELU", (Param("approximate", "none"),)),
    nn.Softmax: LayerSpec("Softmax", (Param("dim", None, _softmax_dim),)),
    nn.LogSoftmax: LayerSpec("LogSoftmax", (Param("dim", None, _softmax_dim),)),
    nn.Identity: LayerSpec("Identity"),
    nn.Flatten: LayerSpec("Flatten", (Param("start_dim", 1), Param("end_dim", -1))),
    nn.Upsample: LayerSpec("Upsample", _UPSAMPLE + (Param("mode", "nearest"), Param("align_corners", None))),
    nn.UpsamplingNearest2d: LayerSpec("UpsamplingNearest2d", _UPSAMPLE),
    nn.UpsamplingBilinear2d: LayerSpec("UpsamplingBilinear2d", _UPSAMPLE),
}


def layer_spec(module: nn.Module) -> LayerSpec | None:
    """The spec of ``module``'s exact torch type, or of the torch layer whose forward it keeps."""
    spec = LAYERS.get(type(module))
    if spec is None:
        base = torch_layer_type(module)
        spec = LAYERS.get(base) if base is not None and isinstance(module, base) else None
    return spec


def supported_layers() -> str:
    return ", ".join(f"nn.{t.__name__}" for t in LAYERS)
