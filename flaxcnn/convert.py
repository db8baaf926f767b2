"""PyTorch ``state_dict`` <-> Flax NNX model state, for parity, export and users.

One rule renames one key and reshapes its tensor (the shape of Hugging Face's converters).
Layers are those of :mod:`flaxcnn.models.nn` (``nnx.Conv``/``nnx.Linear`` built otherwise
convert the same way):

==============================  ==========================  =====================================
PyTorch key                     Flax attribute              tensor transform
==============================  ==========================  =====================================
Conv2d ``weight``               ``kernel``                  (out, in/groups, kh, kw) -> HWIO
                                                            (kh, kw, in/groups, out),
                                                            ``transpose(2, 3, 1, 0)`` (grouped and
                                                            depthwise alike)
ConvTranspose2d ``weight``      ``kernel``                  (in, out/groups, kh, kw) -> (kh, kw,
                                                            out/groups, in), the same transpose
Conv2d/ConvTranspose2d ``bias`` ``bias``                    none
Linear ``weight``               ``kernel``                  (out, in) -> (in, out), transpose
Linear ``weight`` after a       ``kernel``                  rows permuted from NCHW to NHWC
flatten in NHWC order                                       flatten order (``nchw_flatten``)
Linear ``bias``                 ``bias``                    none
BatchNorm1d/2d ``weight``/      ``scale``/``bias``          none (absent with ``affine=False``)
``bias``
BatchNorm ``running_mean``/     ``mean``/``var``            none (both store the unbiased
``running_var``                                             variance; absent with
                                                            ``track_running_stats=False``)
BatchNorm                       ``num_batches_tracked``     int64 <-> int32
``num_batches_tracked``
GroupNorm ``weight``/``bias``   ``scale``/``bias``          none (absent with ``affine=False``)
LayerNorm ``weight``/``bias``   ``scale``/``bias``          none: stored in torch's
                                                            ``normalized_shape`` order (the layer
                                                            transposes for NHWC input)
==============================  ==========================  =====================================

Floating-point tensors are cast to the model's variable dtype, so a float64 state_dict loads
bit-exactly into a float64 model (built with ``dtype=jnp.float64`` under ``jax.enable_x64``)
and comes back float64; the round trip torch -> flax -> torch is exact.

Nested modules are named as PyTorch names them: attributes by name, ``nnx.Sequential``,
``nnx.List`` and lists of blocks by index, ``nnx.Dict`` by key, so ``features.0.weight`` is
``features.layers[0].kernel`` in an ``nnx.Sequential`` and ``blocks.1.bn.running_var`` is
``blocks[1].bn.var`` (:func:`named_layers` gives the names). Supported layers:
:data:`SUPPORTED_LAYERS`, and layers that hold no parameters or statistics (activations,
pooling, dropout, flatten; plain functions in an ``nnx.Sequential``). Anything else that holds
variables is refused in one error naming it.

Flatten order: a Flax model that flattens an NHWC map feeds its first ``Linear`` rows in
(h, w, c) order, PyTorch's ``x.view(N, -1)`` in (c, h, w) order. The rows of that ``Linear``
are permuted when the model declares ``nchw_flatten = {"<torch name of the Linear>": (C, H, W)}``
(the lab models do, e.g. ``{"fc1": (8, 8, 8)}``), or when the same mapping is passed as
``nchw_flatten=`` to the functions below (it then replaces the model's). A model that flattens
in NCHW order itself (transposes back before the reshape) declares nothing.

Conversion is strict like ``load_state_dict(strict=True)``: every missing, unexpected or
mis-shaped key is collected and reported in one :class:`~flaxcnn.errors.ConversionError`.
torch is imported only by the functions that produce or read torch objects.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from flax import nnx

from flaxcnn.errors import ConversionError
from flaxcnn.models.nn import BatchNormNd, ConvTranspose2d, GroupNorm, LayerNorm

Array = np.ndarray


@dataclass(frozen=True)
class Rule:
    """How one PyTorch tensor maps to one Flax variable of a layer."""

    torch_name: str  # suffix after the layer prefix, e.g. "weight"
    flax_name: str  # attribute of the Flax layer, e.g. "kernel"
    to_flax: Callable[[Array], Array]
    to_torch: Callable[[Array], Array]


def _same(a: Array) -> Array:
    return a


def _conv_kernel_rules() -> list[Rule]:
    return [
        Rule("weight", "kernel", lambda w: np.transpose(w, (2, 3, 1, 0)), lambda k: np.transpose(k, (3, 2, 0, 1))),
        Rule("bias", "bias", _same, _same),
    ]


def _linear_rules(nchw_flatten: tuple[int, int, int] | None) -> list[Rule]:
    if nchw_flatten is None:
        weight = Rule("weight", "kernel", lambda w: np.transpose(w), lambda k: np.transpose(k))
    else:
        c, h, w_ = nchw_flatten

        def to_flax(w: Array) -> Array:
            # torch column index = c*H*W + h*W + w; Flax row index = h*W*C + w*C + c.
            out = w.shape[0]
            if w.shape[1] != c * h * w_:
                return np.transpose(w)  # let the shape check report the mismatch
            return w.reshape(out, c, h, w_).transpose(2, 3, 1, 0).reshape(h * w_ * c, out)

        def to_torch(k: Array) -> Array:
            out = k.shape[1]
            return k.reshape(h, w_, c, out).transpose(3, 2, 0, 1).reshape(out, c * h * w_)

        weight = Rule("weight", "kernel", to_flax, to_torch)
    return [weight, Rule("bias", "bias", _same, _same)]


def _batchnorm_rules() -> list[Rule]:
    return [
        *_scale_bias_rules(),
        Rule("running_mean", "mean", _same, _same),
        Rule("running_var", "var", _same, _same),
        Rule("num_batches_tracked", "num_batches_tracked",
             lambda n: np.asarray(n, np.int32), lambda n: np.asarray(n, np.int64)),
    ]


def _scale_bias_rules() -> list[Rule]:
    """GroupNorm/LayerNorm (and BatchNorm's affine part): ``weight`` is ``scale``, unchanged."""
    return [Rule("weight", "scale", _same, _same), Rule("bias", "bias", _same, _same)]


#: every layer type with a rule (checked in order: flaxcnn.models.nn.Conv2d is an nnx.Conv,
#: nn.Linear an nnx.Linear), and its rules; the Linear's depend on nchw_flatten (see _rules_for)
RULES: tuple[tuple[type, Callable[[], list[Rule]] | None], ...] = (
    (nnx.Conv, _conv_kernel_rules),
    (ConvTranspose2d, _conv_kernel_rules),  # (in, out/groups, kh, kw) is OIHW of the transposed conv
    (nnx.Linear, None),
    (BatchNormNd, _batchnorm_rules),
    (GroupNorm, _scale_bias_rules),
    (LayerNorm, _scale_bias_rules),
)

SUPPORTED_LAYERS = (
    "nnx.Conv with a 2-D kernel (flaxcnn.models.nn.Conv2d: nn.Conv2d, grouped and depthwise included), "
    "flaxcnn.models.nn.ConvTranspose2d, nnx.Linear (flaxcnn.models.nn.Linear: nn.Linear), "
    "flaxcnn.models.nn.BatchNorm1d/BatchNorm2d (nn.BatchNorm1d/2d; nnx.BatchNorm stores the biased variance "
    "and uses the other momentum convention), flaxcnn.models.nn.GroupNorm, flaxcnn.models.nn.LayerNorm, "
    "and layers without parameters or statistics (activations, pooling, dropout, flatten, plain functions "
    "in an nnx.Sequential)"
)

FlattenSpec = Mapping[str, tuple[int, int, int]]


def _holds_module(value) -> bool:
    if isinstance(value, nnx.Module):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_module(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_module(v) for v in value.values())
    return False


def _children(node) -> Iterator[tuple[str, object]]:
    """(PyTorch-style name, child) of one node, in definition order (PyTorch's key order)."""
    if isinstance(node, nnx.Sequential):
        # every element, plain functions included: nn.Sequential numbers its modules the same way
        yield from ((str(i), f) for i, f in enumerate(node.layers))
    elif isinstance(node, (list, tuple, nnx.List)):
        yield from ((str(i), v) for i, v in enumerate(node) if _holds_module(v))
    elif isinstance(node, dict):
        yield from ((str(k), v) for k, v in node.items() if _holds_module(v))
    else:  # an nnx.Module, nnx.Dict included: its attributes in assignment order
        yield from ((k, v) for k, v in vars(node).items()
                    if not k.startswith("_pytree__") and _holds_module(v))


def named_layers(model: nnx.Module, *, leaves_only: bool = True) -> Iterator[tuple[str, object]]:
    """(dotted name as PyTorch names it, layer) for every layer of ``model``, in definition order.

    A layer is a module without child modules, or a plain function in an ``nnx.Sequential``
    (``features.1`` for ``nnx.Sequential(conv, jax.nn.relu, ...)``, like ``nn.ReLU()`` at
    ``features.1`` of an ``nn.Sequential``). With ``leaves_only=False`` containers are listed
    too, before their children.
    """

    def walk(node, prefix: str) -> Iterator[tuple[str, object]]:
        for name, child in _children(node):
            path = f"{prefix}{name}"
            if isinstance(child, (list, tuple, dict)) or (
                isinstance(child, nnx.Module) and any(True for _ in _children(child))
            ):
                if not leaves_only and isinstance(child, nnx.Module):
                    yield path, child
                yield from walk(child, path + ".")
            elif isinstance(child, nnx.Module) or callable(child):
                yield path, child

    yield from walk(model, "")


def _has_state(variables) -> bool:
    return any(isinstance(v, nnx.Variable) and not isinstance(v, nnx.RngState) for v in variables)


def _iter_layers(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
    """(dotted name, layer) for every layer that holds tensors; one error for unsupported ones."""
    layers, unsupported = [], []
    for name, node in named_layers(model, leaves_only=False):
        if not isinstance(node, nnx.Module):
            continue  # a plain function in an nnx.Sequential
        own = [v for k, v in vars(node).items() if not k.startswith("_pytree__")]
        if isinstance(node, nnx.Conv) and node.kernel[...].ndim != 4:
            unsupported.append(f"{name} (nnx.Conv with {node.kernel[...].ndim - 2} spatial dimension(s))")
        elif isinstance(node, tuple(layer_type for layer_type, _ in RULES)):
            layers.append((name, node))
        elif _has_state(own):
            unsupported.append(f"{name} ({type(node).__module__}.{type(node).__qualname__})")
    if unsupported:
        raise ConversionError(
            f"{type(model).__name__} has layers with no conversion rule: " + ", ".join(unsupported)
            + ". Supported: " + SUPPORTED_LAYERS + "."
        )
    return iter(layers)


def _flatten_spec(model: nnx.Module, linears: list[str], nchw_flatten: FlattenSpec | None) -> dict:
    spec = dict(getattr(model, "nchw_flatten", {}) or {}) if nchw_flatten is None else dict(nchw_flatten)
    wrong = [name for name in spec if name not in linears]
    if wrong:
        raise ConversionError(
            f"nchw_flatten names {', '.join(map(repr, wrong))}, which "
            + ("is not a Linear layer" if len(wrong) == 1 else "are not Linear layers")
            + f" of {type(model).__name__}; its Linear layers: {', '.join(linears) or 'none'}"
        )
    for name, chw in spec.items():
        if len(tuple(chw)) != 3:
            raise ConversionError(f"nchw_flatten[{name!r}] must be (C, H, W), got {chw!r}")
    return {name: tuple(int(d) for d in chw) for name, chw in spec.items()}


def _rules_for(name: str, layer: nnx.Module, flatten: Mapping[str, tuple[int, int, int]]) -> list[Rule]:
    if isinstance(layer, nnx.Linear):
        return _linear_rules(flatten.get(name))
    for layer_type, rules in RULES:
        if isinstance(layer, layer_type) and rules is not None:
            return rules()
    raise ConversionError(f"no conversion rule for layer {name!r} of type {type(layer).__name__}")


def _plan(model: nnx.Module, nchw_flatten: FlattenSpec | None = None) -> Iterator[tuple[str, nnx.Module, Rule]]:
    """(torch key, Flax layer, rule) for every tensor of the model's torch state_dict."""
    layers = list(_iter_layers(model))
    flatten = _flatten_spec(model, [n for n, layer in layers if isinstance(layer, nnx.Linear)], nchw_flatten)
    for name, layer in layers:
        for rule in _rules_for(name, layer, flatten):
            if getattr(layer, rule.flax_name, None) is None:
                continue  # e.g. a Conv built with use_bias=False
            yield f"{name}.{rule.torch_name}", layer, rule


def _to_numpy(value) -> Array:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def to_numpy_state_dict(model: nnx.Module, *, nchw_flatten: FlattenSpec | None = None
                        ) -> OrderedDict[str, Array]:
    """The model's state in PyTorch's keys, shapes and layouts, as numpy arrays (no torch needed).

    ``nchw_flatten``: ``{torch name of a Linear: (C, H, W)}``, replacing the model's own
    ``nchw_flatten`` attribute (see the module docstring).
    """
    out: OrderedDict[str, Array] = OrderedDict()
    for key, layer, rule in _plan(model, nchw_flatten):
        out[key] = np.array(rule.to_torch(np.asarray(getattr(layer, rule.flax_name)[...])), order="C")
    return out


def to_torch_state_dict(model: nnx.Module, *, nchw_flatten: FlattenSpec | None = None) -> OrderedDict:
    """A ``torch.save``-able state_dict that the PyTorch reference loads with ``strict=True``."""
    import torch

    return OrderedDict((k, torch.from_numpy(v.copy()))
                       for k, v in to_numpy_state_dict(model, nchw_flatten=nchw_flatten).items())


def expected_torch_shapes(model: nnx.Module, *, nchw_flatten: FlattenSpec | None = None
                          ) -> OrderedDict[str, tuple[int, ...]]:
    """PyTorch key -> shape of every tensor the model's state_dict holds."""
    return OrderedDict((k, v.shape) for k, v in to_numpy_state_dict(model, nchw_flatten=nchw_flatten).items())


def load_torch_state_dict(model: nnx.Module, state_dict: Mapping[str, object], *,
                          nchw_flatten: FlattenSpec | None = None) -> nnx.Module:
    """Copy a PyTorch state_dict into ``model`` (in place) and return it.

    Strict: raises one ConversionError listing every missing, unexpected and mis-shaped key
    (with the checkpoint's shape and the expected one); nothing is written unless all keys fit.
    ``nchw_flatten``: ``{torch name of a Linear: (C, H, W)}`` whose rows to permute, replacing
    the model's own ``nchw_flatten`` attribute (see the module docstring).
    """
    plan = list(_plan(model, nchw_flatten))
    expected = expected_torch_shapes(model, nchw_flatten=nchw_flatten)
    given = {k: _to_numpy(v) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [
        f"{k}: checkpoint has shape {tuple(given[k].shape)}, model expects {tuple(expected[k])}"
        for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or misshaped:
        lines = [f"state_dict does not fit {type(model).__name__}:"]
        if missing:
            lines.append("  missing keys: " + ", ".join(missing))
        if unexpected:
            lines.append("  unexpected keys: " + ", ".join(unexpected))
        lines += ["  size mismatch for " + m for m in misshaped]
        raise ConversionError("\n".join(lines))
    for key, layer, rule in plan:
        variable = getattr(layer, rule.flax_name)
        value = rule.to_flax(given[key])
        if value.shape != variable[...].shape:  # a rule bug, not a user error
            raise ConversionError(f"{key}: converted shape {value.shape} != Flax shape {variable[...].shape}")
        variable[...] = np.asarray(value, dtype=variable[...].dtype)
    return model


def load_pt(path: str | os.PathLike) -> dict[str, object]:
    """Read a ``torch.save``-d state_dict with ``weights_only=True`` (no code from the file runs)."""
    import pickle
    import re

    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch names what it refused ("GLOBAL parity.references.Net", "GLOBAL posix.system").
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise ConversionError(
            f"refused to load {path}: it "
            + (f"references {found.group(1)}, which " if found else "holds objects that ")
            + "a plain state_dict never needs (read with torch.load(weights_only=True), so nothing in "
            "the file ran). If it holds a whole pickled model or other objects, re-save just the "
            "weights with torch.save(model.state_dict(), path)."
        ) from None
    except Exception as error:  # noqa: BLE001 - truncated zip, not a torch file at all, ...
        raise ConversionError(
            f"{path} is not a readable PyTorch file ({type(error).__name__}: "
            f"{(str(error).splitlines() or [''])[0]}); it is truncated or damaged: save it again "
            "with torch.save(model.state_dict(), path)."
        ) from None
    if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
        others = [str(k) for k, v in obj.items() if not hasattr(v, "shape")] if isinstance(obj, Mapping) else []
        raise ConversionError(
            f"{path} holds a {type(obj).__name__}, not a state_dict of tensors"
            + (f" (entries that are not tensors: {', '.join(others[:10])})" if others else "")
            + "; save one with torch.save(model.state_dict(), path)"
            + ("; a training checkpoint's weights can be saved alone with "
               "torch.save(torch.load(path)['state_dict'], new_path)" if "state_dict" in others else "")
        )
    return dict(obj)
