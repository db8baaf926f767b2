"""Layer-by-layer comparison of a PyTorch module and its Flax NNX port: where does a port diverge?

:func:`compare_layers` runs both models on the same weights and input and records, for every
layer call, the layer's input and output (eval mode, then train mode), the gradient of the loss
with respect to the output and to the layer's parameters, and the layer's buffers after the
training step (BatchNorm's running statistics). It then reports, per layer, the largest
absolute difference of each, and names the first layer that goes over tolerance.

How it records. PyTorch: forward hooks on every leaf module (inputs and outputs) and a tensor
hook on each output (its gradient). Flax NNX: the layers of a clone of the model are given a
recording subclass whose ``__call__`` records its input and output and adds a zero "probe" to the
output; the gradient of the loss with respect to the probes is the gradient with respect to
each layer's output. Plain functions inside an ``nnx.Sequential`` (``jax.nn.relu``, a pooling
function) are recorded by the same means on the ``nnx.Sequential``. Dropout in train mode
replays PyTorch's masks, drawn again exactly, into flaxcnn's dropout layers (:mod:`parity.dropout`).
ReLU inputs that the two sides decide differently while both are within tolerance of zero are
replayed into a second PyTorch training step, whose gradients and buffers are then compared
(:mod:`parity.relu_decisions`, ReLU6, Hardswish, Hardsigmoid and LeakyReLU likewise at their
kinks; this needs the port's activations to be :class:`flaxcnn.models.nn.KinkedActivation`
layers, the seam they are recorded through, as in flaxcnn's models and generated ports; a ReLU
written inline as ``jax.nn.relu`` is not seen, the calls do not pair and nothing is replayed).
PyTorch's layer inputs are copied before each call: an ``inplace=True`` activation overwrites
its input.
The recording, the masks and the decisions are the same flow as the parity checks'
(:mod:`parity.train_pass`).

How layers are paired: by name. Torch names are ``named_modules()`` names of leaf modules
(``features.0``, ``fc1``); Flax names are those :func:`flaxcnn.convert.named_layers` gives, the
names the converter uses (attributes by name; ``nnx.Sequential``, ``nnx.List`` and lists by
index, so ``features.layers[0]`` is ``features.0``). ``rename={flax name or prefix: torch name}``
pairs layers whose names differ (``{"head": "classifier"}`` renames ``head.1`` to ``classifier.1``). A layer that holds parameters or buffers and has no partner
raises :class:`LayerPairingError`; a parameter-free layer on one side only (say an ``nn.ReLU``
module where the port calls ``jax.nn.relu`` inline) is listed as unpaired and not compared.
A layer called several times (one dropout module used twice) is paired call by call.

Layout: 4-D Flax values are NHWC and are compared with PyTorch's NCHW values transposed. A
2-D value made by flattening an NHWC map (a layer whose input is 4-D and output 2-D, what such
a layer's output flows into unchanged, and the input of each Linear named in ``nchw_flatten``)
is in (h, w, c) order and is compared with PyTorch's (c, h, w) flatten permuted accordingly;
``flax_flatten="nchw"`` is for ports that flatten in NCHW order themselves.

Which layer is named: the first layer, in the order PyTorch calls them, whose input, output
or buffers differ (an input that differs while the previous layer's output matched means the
code between the two layers, e.g. an inline pooling, holds the bug); if every forward value and
buffer matches, the gradients say it: the layer just after the last one, in call order, whose
output gradient differs (the gradient at its own output matches; its backward pass, or code
between the two, holds the bug); a layer whose parameter gradients alone differ holds the bug
itself.

Tolerances: a value passes when ``max|diff| <= atol + rtol * max|torch value|``, with the
suite's absolute tolerances (forward 1e-6, gradients 1e-5, :mod:`parity.checks`) and
``rtol = 1e-5``: intermediate activations are larger than the final outputs the suite checks
and float32 rounding grows with magnitude (one ulp is 1.2e-7 of the value); the bugs this is
for change values by percent, not by ulps.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from flaxcnn import convert
from flaxcnn.models.layers import Dropout as FlaxcnnDropout
from parity.checks import FORWARD_TOL, GRAD_TOL, RTOL
from parity.dropout import forward_hooks, renamed as _renamed
from parity.losses import Loss, check_loss, flax_loss
from parity.precision import full_precision
from parity.train_pass import flax_replay, rerun_with_flax_decisions, torch_train_pass

Key = tuple[str, int]  # (layer name, call index)
FlatLayout = tuple[int, int, int]  # (C, H, W) of an NHWC map flattened in (h, w, c) order
Layout = Literal["nhwc"] | FlatLayout | None


class LayerPairingError(ValueError):
    """A layer with parameters or buffers has no partner of the same name in the other model."""


# ------------------------------------------------------------------------------- report


@dataclass
class LayerRow:
    """One call of one layer, compared. ``None``: not measured (e.g. no gradient reached it)."""

    name: str
    call: int
    torch_type: str
    flax_type: str
    torch_shape: tuple[int, ...] | None
    flax_shape: tuple[int, ...] | None
    input_diff: float | None = None
    forward_diff: float | None = None  # max over the eval-mode and train-mode outputs
    backward_diff: float | None = None  # max over the output gradient and the parameter gradients
    state_diff: float | None = None  # buffers after the training step
    relative: float | None = None  # the worst max|diff| / max|torch value| of the row
    input_ok: bool = True
    forward_ok: bool = True
    backward_ok: bool = True
    state_ok: bool = True
    output_grad_ok: bool = True
    param_grad_ok: bool = True
    note: str = ""

    @property
    def label(self) -> str:
        return self.name if self.call == 0 else f"{self.name} (call {self.call + 1})"

    @property
    def ok(self) -> bool:
        return self.input_ok and self.forward_ok and self.backward_ok and self.state_ok


@dataclass
class LayerReport:
    """Every layer call compared, in PyTorch's call order, and the verdict."""

    rows: list[LayerRow]
    output_diff: float
    train_output_diff: float
    first_divergence: str | None  # the row label, or None
    divergence_kind: str  # "input", "forward", "state", "backward", "output" or ""
    explanation: str
    unpaired: list[str] = field(default_factory=list)
    relu_decisions_replayed: int = 0

    @property
    def passed(self) -> bool:
        return self.first_divergence is None and self.divergence_kind == ""

    def format(self) -> str:
        """The table, then one line with the verdict."""
        header = ("layer", "torch / flax", "torch shape", "flax shape", "fwd max|Δ|", "bwd max|Δ|",
                  "state max|Δ|", "rel", "")
        table = [header]
        for r in self.rows:
            mark = "" if r.ok else "x"
            if r.label == self.first_divergence:
                mark = f"<-- first divergence ({self.divergence_kind})"
            table.append((
                r.label, f"{r.torch_type} / {r.flax_type}", _shape(r.torch_shape), _shape(r.flax_shape),
                _num(r.forward_diff), _num(r.backward_diff), _num(r.state_diff), _num(r.relative),
                (mark + ("; " if mark and r.note else "") + r.note).strip(),
            ))
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in table]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        lines.append(f"model output max|Δ|: eval {self.output_diff:.2e}, train {self.train_output_diff:.2e}")
        lines.append(self.explanation)
        return "\n".join(lines)


def _shape(shape) -> str:
    return "-" if shape is None else "(" + ", ".join(str(d) for d in shape) + ")"


def _num(value) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.2e}"


# ------------------------------------------------------------------------------- torch side


@dataclass
class _TorchCall:
    type: str
    input: np.ndarray | None
    output: np.ndarray | None
    has_state: bool


def _leaf_modules(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    for name, module in model.named_modules():
        if name and next(module.children(), None) is None:
            yield name, module


@contextmanager
def _record_torch(model: torch.nn.Module, calls: dict[Key, _TorchCall], grads: dict[Key, np.ndarray] | None):
    """Record every leaf module call into ``calls`` (and its output gradient into ``grads``)."""
    counts: dict[str, int] = defaultdict(int)
    pending: dict[str, np.ndarray | None] = {}  # a call's input, copied before the call

    def pre_hook_for(name: str):
        # copied before the call: an in-place layer (nn.ReLU(inplace=True)) overwrites its input
        def pre_hook(_module, inputs):
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            pending[name] = None if x is None else x.detach().clone().numpy()

        return pre_hook

    def hook_for(name: str, module: torch.nn.Module):
        has_state = any(True for _ in module.parameters()) or any(True for _ in module.buffers())

        def hook(_module, inputs, output):
            key = (name, counts[name])
            counts[name] += 1
            y = output if isinstance(output, torch.Tensor) else None
            calls[key] = _TorchCall(
                type(module).__name__,
                pending.pop(name, None),
                None if y is None else y.detach().clone().numpy(),
                has_state,
            )
            if grads is not None and y is not None and y.requires_grad:
                y.register_hook(lambda g, key=key: grads.__setitem__(key, g.detach().clone().numpy()))

        return hook

    leaves = list(_leaf_modules(model))
    pre_handles = [module.register_forward_pre_hook(pre_hook_for(name)) for name, module in leaves]
    try:
        with forward_hooks((module, hook_for(name, module)) for name, module in leaves):
            yield
    finally:
        for handle in pre_handles:
            handle.remove()


# ------------------------------------------------------------------------------- flax side

_NAME = "_parity_layer_name"
_SESSION = "_parity_session"  # the recording clone's session, set on its layers per pass (see _session)


@dataclass
class _FlaxCall:
    type: str
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    input_layout: Layout
    output_layout: Layout
    has_state: bool


class _FlaxSession:
    """What one forward pass of a recording Flax model saw."""

    def __init__(self, probes: Mapping[Key, jax.Array], linear_flatten: Mapping[str, FlatLayout], flatten: str):
        self.probes = probes
        self.linear_flatten = linear_flatten
        self.flatten = flatten
        self.counts: dict[str, int] = defaultdict(int)
        self.calls: dict[Key, _FlaxCall] = {}
        self.arrays: dict[Key, tuple[Any, Any]] = {}  # (input, output); tracers under autodiff
        self._flat: dict[int, tuple[Any, FlatLayout]] = {}  # id(array) -> (array, layout)

    def _layout_in(self, name: str, x) -> Layout:
        if x is None:
            return None
        if x.ndim == 4:
            return "nhwc"
        if id(x) in self._flat and self._flat[id(x)][0] is x:
            return self._flat[id(x)][1]
        return self.linear_flatten.get(name)

    def record(self, name: str, layer, args: tuple, out):
        if not isinstance(out, jax.Array):
            return out
        key = (name, self.counts[name])
        self.counts[name] += 1
        x = args[0] if args and isinstance(args[0], jax.Array) else None
        if key in self.probes and self.probes[key].shape == out.shape:
            out = out + self.probes[key]
        layout_in = self._layout_in(name, x)
        if out.ndim == 4:
            layout_out: Layout = "nhwc"
        elif out.ndim == 2 and x is not None and x.ndim == 4 and self.flatten == "nhwc":
            layout_out = (x.shape[3], x.shape[1], x.shape[2])  # a flatten of an NHWC map
        elif isinstance(layout_in, tuple) and x is not None and out.shape == x.shape:
            layout_out = layout_in  # an elementwise layer after the flatten
        else:
            layout_out = None
        if isinstance(layout_out, tuple):
            self._flat[id(out)] = (out, layout_out)
        self.calls[key] = _FlaxCall(
            _type_name(layer), None if x is None else tuple(x.shape), tuple(out.shape), layout_in, layout_out,
            _holds_state(layer),
        )
        self.arrays[key] = (x, out)
        return out


def _type_name(layer) -> str:
    if isinstance(layer, nnx.Module):
        return type(layer).__mro__[1].__name__ if getattr(type(layer), "_parity_recording", False) \
            else type(layer).__name__
    return getattr(layer, "__name__", None) or getattr(getattr(layer, "fun", None), "__name__", type(layer).__name__)


def _holds_state(layer) -> bool:
    if not isinstance(layer, nnx.Module):
        return False
    return bool(jax.tree.leaves(nnx.state(layer, nnx.Not(nnx.RngState))))


_RECORDING_CLASSES: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    """A subclass of ``cls`` whose calls are recorded into the active session."""
    if cls not in _RECORDING_CLASSES:
        if issubclass(cls, nnx.Sequential):

            def __call__(self, *args, rngs=None, **kwargs):  # nnx.Sequential.__call__, recording functions
                session = getattr(self, _SESSION, None)
                output: Any = None
                for i, f in enumerate(self.layers):
                    if i > 0:
                        args, kwargs = ((), output) if isinstance(output, dict) else (
                            (output if isinstance(output, tuple) else (output,)), {})
                    if rngs is not None and nnx.helpers.has_keyword_arg(f, "rngs"):
                        kwargs["rngs"] = rngs
                    output = f(*args, **kwargs)
                    if session is not None and not isinstance(f, nnx.Module):
                        output = session.record(f"{getattr(self, _NAME)}.{i}", f, args, output)
                return output
        else:

            def __call__(self, *args, **kwargs):
                out = cls.__call__(self, *args, **kwargs)
                session = getattr(self, _SESSION, None)
                return out if session is None else session.record(getattr(self, _NAME), self, args, out)

        _RECORDING_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_parity_recording": True})
    return _RECORDING_CLASSES[cls]


def _recording_clone(model: nnx.Module, rename: Mapping[str, str]) -> tuple[nnx.Module, dict[str, object]]:
    """A clone of ``model`` whose layers record their calls; {torch-style name: layer}."""
    clone = nnx.clone(model)
    layers = {}
    for name, node in convert.named_layers(clone, leaves_only=False):
        name = _renamed(name, rename)
        if not isinstance(node, nnx.Module):
            layers[name] = node
            continue
        is_leaf = not any(True for _ in convert.named_layers(node))
        if is_leaf or isinstance(node, nnx.Sequential):
            object.__setattr__(node, _NAME, name)
            node.__class__ = _recording_class(type(node))
            if is_leaf:
                layers[name] = node
    return clone, layers


@contextmanager
def _session(clone: nnx.Module, session: _FlaxSession):
    """Attach ``session`` to the recording layers of ``clone`` (one of :func:`_recording_clone`'s)
    for the block: the recording ``__call__`` finds it there, on the model it runs, not in any
    process-wide place."""
    nodes = [node for _, node in nnx.iter_modules(clone) if getattr(type(node), "_parity_recording", False)]
    for node in nodes:
        object.__setattr__(node, _SESSION, session)
    try:
        yield session
    finally:
        for node in nodes:
            object.__delattr__(node, _SESSION)


# ------------------------------------------------------------------------------- comparison


def _to_flax_layout(value: np.ndarray, layout: Layout) -> np.ndarray:
    if layout == "nhwc" and value.ndim == 4:
        return value.transpose(0, 2, 3, 1)
    if isinstance(layout, tuple) and value.ndim == 2 and value.shape[1] == math.prod(layout):
        c, h, w = layout
        return value.reshape(value.shape[0], c, h, w).transpose(0, 2, 3, 1).reshape(value.shape[0], -1)
    return value


def _diff(flax_value, torch_value, layout: Layout) -> tuple[float, float]:
    """(max|diff|, max|torch value|); inf when the shapes cannot be matched."""
    t = _to_flax_layout(np.asarray(torch_value, np.float64), layout)
    f = np.asarray(flax_value, np.float64)
    if t.shape != f.shape:
        return math.inf, 0.0
    if t.size == 0:
        return 0.0, 0.0
    return float(np.max(np.abs(t - f))), float(np.max(np.abs(t)))


def _within(diff: float, scale: float, atol: float, rtol: float) -> bool:
    return diff <= atol + rtol * scale


def _pair(torch_calls: Mapping[Key, _TorchCall], flax_calls: Mapping[Key, _FlaxCall]) -> list[str]:
    """Check that every layer with state has a partner; return notes on unpaired stateless ones."""
    t_names = {k[0]: c for k, c in torch_calls.items()}
    f_names = {k[0]: c for k, c in flax_calls.items()}
    t_only = [n for n in t_names if n not in f_names]
    f_only = [n for n in f_names if n not in t_names]
    bad_t = [f"{n} ({t_names[n].type})" for n in t_only if t_names[n].has_state]
    bad_f = [f"{n} ({f_names[n].type})" for n in f_only if f_names[n].has_state]
    if bad_t or bad_f:
        lines = ["cannot pair the layers of the two models by name:"]
        if bad_t:
            lines.append("  torch layers with parameters or buffers and no Flax layer of that name: "
                         + ", ".join(bad_t))
        if bad_f:
            lines.append("  Flax layers with parameters or statistics and no torch layer of that name: "
                         + ", ".join(bad_f))
        lines.append(
            "  torch names are named_modules() names of leaf modules; Flax names are "
            "flaxcnn.convert.named_layers() names (attributes, nnx.Sequential/nnx.List indices). "
            f"torch layers: {', '.join(t_names) or 'none'}; Flax layers: {', '.join(f_names) or 'none'}. "
            "Pass rename={flax name: torch name} to pair layers named differently."
        )
        raise LayerPairingError("\n".join(lines))
    return [f"torch only: {n} ({t_names[n].type})" for n in t_only] + \
           [f"flax only: {n} ({f_names[n].type})" for n in f_only]


def _group_by_layer(values: Mapping[str, np.ndarray], rename: Mapping[str, str] | None = None
                    ) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for key, value in values.items():
        layer, _, tensor = key.rpartition(".")
        out[_renamed(layer, rename or {})][tensor] = value
    return out


def compare_layers(
    torch_model: torch.nn.Module,
    flax_model: nnx.Module,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    loss: Loss = "cross_entropy",
    rename: Mapping[str, str] | None = None,
    nchw_flatten: Mapping[str, FlatLayout] | None = None,
    flax_flatten: Literal["nhwc", "nchw"] = "nhwc",
    forward_tol: float = FORWARD_TOL,
    grad_tol: float = GRAD_TOL,
    rtol: float = RTOL,
    seed: int = 0,
) -> LayerReport:
    """Compare ``torch_model`` and its port ``flax_model`` layer by layer; neither is modified.

    Both must already hold the same weights (e.g. ``flaxcnn.convert.load_torch_state_dict``).
    ``x``: one NCHW batch, fed to both; ``y``: integer labels for the loss (default: drawn from
    ``seed``); ``loss``: ``"cross_entropy"`` on logits or ``"nll"`` on log-probabilities.
    ``rename``: ``{flax name: torch name}`` for layers whose names differ (see the module
    docstring for how layers are paired). ``nchw_flatten``: ``{Flax name of a Linear: (C, H, W)}``
    whose input is an NHWC map flattened in (h, w, c) order and whose rows the converter
    permutes (default: the model's ``nchw_flatten`` attribute, as the converter uses it). ``flax_flatten``: the order in which
    the port flattens a 4-D map ("nhwc", flaxcnn's convention, or "nchw").

    Raises :class:`LayerPairingError` when a layer with parameters or buffers has no partner.
    """
    if flax_flatten not in ("nhwc", "nchw"):
        raise ValueError(f"flax_flatten must be 'nhwc' or 'nchw', got {flax_flatten!r}")
    if loss not in ("cross_entropy", "nll"):
        raise ValueError(f"loss must be 'cross_entropy' or 'nll', got {loss!r}")
    with full_precision():
        return _compare(torch_model, flax_model, x, y, loss=check_loss(loss), rename=dict(rename or {}),
                        nchw_flatten=nchw_flatten, flax_flatten=flax_flatten, forward_tol=forward_tol,
                        grad_tol=grad_tol, rtol=rtol, seed=seed)


class _TorchRecording:
    """Hooks for one PyTorch pass (:func:`parity.train_pass.torch_train_pass`'s ``record``):
    every leaf module call, and with ``grads``, each output's gradient."""

    def __init__(self, grads: bool):
        self.calls: dict[Key, _TorchCall] = {}
        self.grads: dict[Key, np.ndarray] | None = {} if grads else None

    def __call__(self, model: torch.nn.Module):
        return _record_torch(model, self.calls, self.grads)


def _flax_eval_pass(clone: nnx.Module, x: jax.Array, linear_flatten, flax_flatten: str) -> tuple[_FlaxSession, np.ndarray]:
    clone.eval()
    with _session(clone, _FlaxSession({}, linear_flatten, flax_flatten)) as session:
        out = np.asarray(clone(x))
    return session, out


def _flax_train_pass(clone: nnx.Module, x: jax.Array, y: jax.Array, loss: Loss, probes, masks, rename,
                     linear_flatten, flax_flatten: str):
    """Train-mode forward and backward of the recording clone, PyTorch's masks replayed: the
    session (its calls, their input/output values), the output, the parameter gradients, the
    gradients at each layer's output (the probes') and the ReLU inputs."""
    clone.train()
    sessions: list[_FlaxSession] = []

    def loss_fn(model, probes):
        with _session(model, _FlaxSession(probes, linear_flatten, flax_flatten)) as session:
            out = model(x)
        sessions.append(session)
        return flax_loss(loss, out, y), (out, session.arrays)

    with flax_replay(clone, masks, rename) as relu_inputs:
        (_, (out, arrays)), (param_grads, probe_grads) = nnx.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True)(clone, probes)
    return sessions[-1], arrays, np.asarray(out), param_grads, probe_grads, relu_inputs


def _compare(torch_model, flax_model, x, y, *, loss: Loss, rename: dict[str, str], nchw_flatten, flax_flatten,
             forward_tol: float, grad_tol: float, rtol: float, seed: int) -> LayerReport:
    flatten_spec = dict(getattr(flax_model, "nchw_flatten", {}) or {}) if nchw_flatten is None else dict(nchw_flatten)
    flatten_spec = {k: tuple(int(d) for d in v) for k, v in flatten_spec.items()}  # Flax names, as converted
    linear_flatten = {_renamed(k, rename): v for k, v in flatten_spec.items()}  # torch names, as recorded
    x = np.asarray(x, np.float32)
    x_t, x_f = torch.from_numpy(x.copy()), jnp.asarray(x)

    # ---- eval mode: outputs with the models' current statistics
    tmodel = copy.deepcopy(torch_model)
    tmodel.eval()
    t_eval: dict[Key, _TorchCall] = {}
    with _record_torch(tmodel, t_eval, None), torch.no_grad():
        out_t_eval = tmodel(x_t).numpy()
    fclone, flayers = _recording_clone(flax_model, rename)
    f_eval, out_f_eval = _flax_eval_pass(fclone, x_f, linear_flatten, flax_flatten)
    unpaired = _pair(t_eval, f_eval.calls)

    if y is None:
        y = np.random.default_rng(seed).integers(0, out_t_eval.shape[1], size=x.shape[0])
    y = np.asarray(y)
    y_t, y_f = torch.from_numpy(y.astype(np.int64)), jnp.asarray(y, jnp.int32)

    # ---- train mode: outputs, gradients, statistics after the step; dropout masks replayed
    recording = _TorchRecording(grads=True)
    first = torch_train_pass(torch_model, x_t, y_t, loss, record=recording)
    fclone, flayers = _recording_clone(flax_model, rename)
    probes = {k: jnp.zeros(c.output_shape, jnp.float32) for k, c in f_eval.calls.items()}
    f_session, f_arrays, out_f_train, f_param_grads, f_probe_grads, f_relu_inputs = _flax_train_pass(
        fclone, x_f, y_f, loss, probes, first.masks, rename, linear_flatten, flax_flatten)
    f_train = f_session.calls
    # ReLUs decided by rounding (parity.relu_decisions): PyTorch's step again, with flaxcnn's
    # decisions where the two differ within tolerance of zero; gradients and buffers from that run
    rerun = _TorchRecording(grads=True)
    decisions, compared = rerun_with_flax_decisions(torch_model, x_t, y_t, loss, first, f_relu_inputs,
                                                    atol=forward_tol, rtol=rtol, record=rerun)
    if compared is not first:
        recording = rerun
    tmodel, t_train, t_grads, out_t_train = compared.model, recording.calls, recording.grads, compared.output
    t_param_grads = _group_by_layer({k: p.grad.numpy() for k, p in tmodel.named_parameters() if p.grad is not None})
    t_buffers = _group_by_layer({k: b.numpy() for k, b in tmodel.named_buffers()})
    grad_model = nnx.clone(flax_model)
    nnx.update(grad_model, f_param_grads)
    f_param_grads_t = _group_by_layer(convert.to_numpy_state_dict(grad_model, nchw_flatten=flatten_spec), rename)
    f_state_t = _group_by_layer(convert.to_numpy_state_dict(fclone, nchw_flatten=flatten_spec), rename)
    t_param_names = {n for n, _ in tmodel.named_parameters()}

    # ---- rows, in torch's call order, then Flax-only calls
    rows: list[LayerRow] = []
    keys = list(t_eval) + [k for k in f_eval.calls if k not in t_eval]
    for key in keys:
        name, call = key
        tc, fc = t_eval.get(key), f_eval.calls.get(key)
        if tc is None or fc is None:
            if name in {k[0] for k in t_eval} and name in {k[0] for k in f_eval.calls}:
                n_t = sum(1 for k in t_eval if k[0] == name)
                n_f = sum(1 for k in f_eval.calls if k[0] == name)
                rows.append(LayerRow(name, call, tc.type if tc else "-", fc.type if fc else "-",
                                     None, None, forward_diff=math.inf, forward_ok=False,
                                     note=f"called {n_t}x in torch, {n_f}x in Flax"))
            continue  # unpaired stateless layers are listed below the table
        row = LayerRow(name, call, tc.type, fc.type,
                       None if tc.output is None else tuple(tc.output.shape), fc.output_shape)
        notes = []
        scales = []

        def check(flax_value, torch_value, layout, atol):
            d, s = _diff(flax_value, torch_value, layout)
            if s > atol or math.isinf(d):  # a ratio to values below the tolerance says nothing
                scales.append((d, s))
            return d, _within(d, s, atol, rtol)

        # inputs and outputs, eval and train
        in_diffs, out_diffs = [], []
        ok_in, ok_out = True, True
        tt, ft = t_train.get(key), f_train.get(key)
        f_in_eval, f_out_eval = f_eval.arrays[key]
        pairs = [(f_in_eval, f_out_eval, tc, fc)]
        if tt is not None and ft is not None:
            f_in_train, f_out_train = f_arrays[key]
            pairs.append((f_in_train, f_out_train, tt, ft))
        for f_in, f_out, t_rec, f_rec in pairs:
            if f_in is not None and t_rec.input is not None:
                d, ok = check(f_in, t_rec.input, f_rec.input_layout, forward_tol)
                in_diffs.append(d)
                ok_in &= ok
            if t_rec.output is not None:
                d, ok = check(f_out, t_rec.output, f_rec.output_layout, forward_tol)
                out_diffs.append(d)
                ok_out &= ok
        row.input_diff = max(in_diffs) if in_diffs else None
        row.forward_diff = max(out_diffs) if out_diffs else None
        row.input_ok, row.forward_ok = ok_in, ok_out
        if row.forward_diff is not None and math.isinf(row.forward_diff):
            notes.append("shapes differ")

        # gradients: w.r.t. the output, and w.r.t. the layer's parameters (first call only)
        back = []
        if key in t_grads and key in f_probe_grads and ft is not None:
            d, row.output_grad_ok = check(f_probe_grads[key], t_grads[key], ft.output_layout, grad_tol)
            back.append(d)
        if call == 0:
            for tensor, g_t in t_param_grads.get(name, {}).items():
                g_f = f_param_grads_t.get(name, {}).get(tensor)
                d, ok = (math.inf, False) if g_f is None else check(g_f, g_t, None, grad_tol)
                back.append(d)
                row.param_grad_ok &= ok
        row.backward_diff = max(back) if back else None
        row.backward_ok = row.output_grad_ok and row.param_grad_ok

        # buffers after the training step (BatchNorm's running statistics and counter)
        if call == 0:
            state = []
            for tensor, b_t in t_buffers.get(name, {}).items():
                if f"{name}.{tensor}" in t_param_names:
                    continue
                b_f = f_state_t.get(name, {}).get(tensor)
                d, ok = (math.inf, False) if b_f is None else check(b_f, b_t, None, forward_tol)
                state.append(d)
                row.state_ok &= ok
            row.state_diff = max(state) if state else None
        finite = [d / s for d, s in scales if s > 0 and not math.isinf(d)]
        row.relative = math.inf if any(math.isinf(d) for d, _ in scales) else (max(finite) if finite else None)
        if isinstance(tc.type, str) and "Dropout" in tc.type and isinstance(flayers.get(name), nnx.Module) \
                and not isinstance(flayers[name], FlaxcnnDropout):
            notes.append("masks not replayed: use flaxcnn.models.layers.Dropout")
        row.note = "; ".join(notes)
        rows.append(row)

    output_diff, _ = _diff(out_f_eval, out_t_eval, None)
    train_output_diff, _ = _diff(np.asarray(out_f_train), out_t_train, None)
    first, kind, why = _verdict(rows, output_diff, train_output_diff, forward_tol)
    if unpaired:
        why += "\nnot compared (no parameters, one side only): " + ", ".join(unpaired)
    if decisions.tolerated:
        why += (f"\n{decisions.tolerated} ReLU decision(s) made by rounding (inputs within tolerance of zero, "
                "decided differently) replayed into PyTorch's training step (parity.relu_decisions)")
    if decisions.beyond_tolerance:
        why += (f"\n{decisions.beyond_tolerance} ReLU decision(s) differ beyond tolerance of zero "
                f"(PyTorch input up to {decisions.largest_beyond:.2e})")
    return LayerReport(rows, output_diff, train_output_diff, first, kind, why, unpaired,
                       relu_decisions_replayed=decisions.tolerated)


def _verdict(rows: Sequence[LayerRow], output_diff: float, train_output_diff: float, tol: float
             ) -> tuple[str | None, str, str]:
    previous = "the model's input"
    for row in rows:
        if not row.input_ok:
            return row.label, "input", (
                f"first divergence: the input of {row.label}, while the output of {previous} matched: "
                f"the code between them (inline functions in __call__/forward) differs")
        if not row.forward_ok:
            return row.label, "forward", f"first divergence: the output of {row.label} ({row.torch_type})"
        if not row.state_ok:
            return row.label, "state", (
                f"first divergence: the buffers of {row.label} ({row.torch_type}) after one training "
                "step (running statistics: momentum convention, biased vs unbiased variance)")
        previous = row.label
    for row in rows:
        if row.output_grad_ok and not row.param_grad_ok:
            return row.label, "backward", (
                f"first divergence: the parameter gradients of {row.label} ({row.torch_type}), with its "
                "input, output and output gradient matching: its backward pass differs")
    for i in range(len(rows) - 1, -1, -1):
        if not rows[i].output_grad_ok:
            if i + 1 == len(rows):
                return rows[i].label, "backward", (
                    f"first divergence in backward order: the gradient at the output of {rows[i].label}, "
                    "the last layer, with every forward value matching: the loss or the code after the "
                    "last layer differs in its backward pass")
            return rows[i + 1].label, "backward", (
                f"first divergence in backward order: every forward value matches, the gradient at the "
                f"output of {rows[i + 1].label} matches and the one at the output of {rows[i].label} does "
                f"not: the backward pass of {rows[i + 1].label} (or of code between the two) differs")
    if output_diff > tol or train_output_diff > tol:
        return (rows[-1].label if rows else None), "output", (
            "every layer matches but the model outputs differ: the code after the last layer "
            "(e.g. an inline activation or log_softmax) differs")
    return None, "", "no divergence: every layer within tolerance"


def report_for_model(name: str, *, batch: int = 8, seed: int = 0) -> LayerReport:
    """The layer report of a registered model against its PyTorch reference (same torch init)."""
    from flaxcnn.models.registry import get_model

    spec = get_model(name)
    torch.manual_seed(seed)
    tmodel = spec.build_torch()
    fmodel = convert.load_torch_state_dict(spec.build(seed=seed), tmodel.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(spec.example_shape(batch), generator=gen).numpy()
    return compare_layers(tmodel, fmodel, x, loss=spec.loss, seed=seed)


__all__ = ["LayerPairingError", "LayerReport", "LayerRow", "RTOL", "compare_layers", "report_for_model"]

