"""PyTorch ``state_dict`` <-> Flax NNX model state, for parity, export and users.

One rule renames one key and reshapes its tensor (the shape of Hugging Face's converters):

========================  =========================  =======================================
PyTorch key               Flax attribute             tensor transform
========================  =========================  =======================================
``convN.weight``          ``convN.kernel``           OIHW -> HWIO, ``transpose(2, 3, 1, 0)``
``convN.bias``            ``convN.bias``             none
``fcN.weight``            ``fcN.kernel``             (out, in) -> (in, out), transpose
``fc1.weight`` after a    ``fc1.kernel``             rows permuted from NCHW to NHWC flatten
conv stack                                           order (see ``flaxcnn.models.layers``)
``bnN.weight``/``bias``   ``bnN.scale``/``bias``     none
``bnN.running_mean/var``  ``bnN.mean``/``var``       none (both store the unbiased variance)
``bnN.num_batches_
tracked``                 ``bnN.num_batches_tracked`` int64 <-> int32
========================  =========================  =======================================

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
from flaxcnn.models.layers import BatchNorm2d

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
        Rule("weight", "scale", _same, _same),
        Rule("bias", "bias", _same, _same),
        Rule("running_mean", "mean", _same, _same),
        Rule("running_var", "var", _same, _same),
        Rule("num_batches_tracked", "num_batches_tracked",
             lambda n: np.asarray(n, np.int32), lambda n: np.asarray(n, np.int64)),
    ]


def _iter_layers(module: nnx.Module, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, nnx.Module]]:
    """(dotted name, layer) for every convertible layer, in definition order (torch's key order)."""
    for name, value in vars(module).items():
        if not isinstance(value, nnx.Module):
            continue
        path = prefix + (name,)
        if isinstance(value, (nnx.Conv, nnx.Linear, BatchNorm2d)):
            yield ".".join(path), value
        else:
            yield from _iter_layers(value, path)


def _rules_for(model: nnx.Module, name: str, layer: nnx.Module) -> list[Rule]:
    if isinstance(layer, nnx.Conv):
        return _conv_kernel_rules()
    if isinstance(layer, nnx.Linear):
        flatten = getattr(model, "nchw_flatten", {}) or {}
        return _linear_rules(tuple(flatten[name]) if name in flatten else None)
    if isinstance(layer, BatchNorm2d):
        return _batchnorm_rules()
    raise ConversionError(f"no conversion rule for layer {name!r} of type {type(layer).__name__}")


def _plan(model: nnx.Module) -> Iterator[tuple[str, nnx.Module, Rule]]:
    """(torch key, Flax layer, rule) for every tensor of the model's torch state_dict."""
    for name, layer in _iter_layers(model):
        for rule in _rules_for(model, name, layer):
            if getattr(layer, rule.flax_name, None) is None:
                continue  # e.g. a Conv built with use_bias=False
            yield f"{name}.{rule.torch_name}", layer, rule


def _to_numpy(value) -> Array:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def to_numpy_state_dict(model: nnx.Module) -> OrderedDict[str, Array]:
    """The model's state in PyTorch's keys, shapes and layouts, as numpy arrays (no torch needed)."""
    out: OrderedDict[str, Array] = OrderedDict()
    for key, layer, rule in _plan(model):
        out[key] = np.array(rule.to_torch(np.asarray(getattr(layer, rule.flax_name)[...])), order="C")
    return out


def to_torch_state_dict(model: nnx.Module) -> OrderedDict:
    """A ``torch.save``-able state_dict that the PyTorch reference loads with ``strict=True``."""
    import torch

    return OrderedDict((k, torch.from_numpy(v.copy())) for k, v in to_numpy_state_dict(model).items())


def expected_torch_shapes(model: nnx.Module) -> OrderedDict[str, tuple[int, ...]]:
    return OrderedDict((k, v.shape) for k, v in to_numpy_state_dict(model).items())


def load_torch_state_dict(model: nnx.Module, state_dict: Mapping[str, object]) -> nnx.Module:
    """Copy a PyTorch state_dict into ``model`` (in place) and return it.

    Strict: raises one ConversionError listing every missing, unexpected and mis-shaped key
    (with the checkpoint's shape and the expected one); nothing is written unless all keys fit.
    """
    plan = list(_plan(model))
    expected = expected_torch_shapes(model)
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
        # torch names the refused global ("GLOBAL parity.references.Net", "GLOBAL posix.system").
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
