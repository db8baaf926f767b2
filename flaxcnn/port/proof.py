"""The proof that a ported NNX module computes what its PyTorch module computes, in float32 and float64.

:func:`prove` runs both on the same weights and input and compares, per dtype:

==================  ==========================================================================
``forward``         eval-mode outputs
``train_forward``   train-mode outputs, PyTorch's random draws replayed (:mod:`flaxcnn.port.draws`)
``grads``           the gradient of the loss with respect to every parameter (one train-mode pass)
``buffers``         every buffer (BatchNorm's running statistics and counter) after one SGD step
``steps``           w_k - w_0 of every parameter and buffer over ``steps`` SGD steps, fresh draws at
                    every step replayed into the port's jitted step (the draws are its arguments)
==================  ==========================================================================

float32 runs JAX at full matmul precision, float64 runs PyTorch's ``.double()`` copy against the
port built with ``jnp.float64`` inside ``jax.enable_x64`` (both scoped to the proof). The loss
follows the output (:func:`choose_loss`) and is written once per side (:mod:`parity.losses`).
Parameters and buffers are compared in PyTorch's keys and layout
(:func:`flaxcnn.convert.to_numpy_state_dict`); the optimiser is plain SGD on both sides
(``torch.optim.SGD``, ``optax.sgd``).

The metric, per tensor: ``ratio = max|flax - torch| / scale`` with ``scale = max|torch|``, so a
wrong tensor with small values is not hidden by a large one; each part reports its worst tensor
(``max_abs_diff``, ``max_abs_ref``, ``scale``, ``ratio``, ``tol``, ``passed``). One exception, in
the gradients and the steps: a tensor whose exact value is zero (the gradient of a conv bias that
a BatchNorm follows; its change over the steps) holds rounding noise on both sides, and its ratio
to its own size is noise over noise. Such a tensor is measured against its layer's noise floor,
``scale = max(max|torch|, NOISE_ULPS * eps * max|torch| of its layer's largest tensor / tol)``,
i.e. it passes when it differs by at most :data:`NOISE_ULPS` rounding errors of its layer's
scale; a tensor 1% wrong is still caught unless it is over ~600 times (float64: ~10^11 times)
smaller than its layer's largest. Three more rounding rules, each from a failure a correct port
showed (and each tested to still fail a tensor of normal size that is 1% wrong):

- ``buffers`` take the same floor: a BatchNorm fed by a bias-free 1x1 conv of another
  BatchNorm's train-mode output sees a batch mean that is exactly 0 per channel, so its
  running mean is rounding noise (3e-9 beside a running_var of ~1 in MobileNetV2).
- A layer's values are sums over n products (a conv's gradient over the batch and every output
  pixel, a BatchNorm's batch statistics; n measured by forward hooks on PyTorch's first step),
  and a sum that cancels keeps the rounding of its terms, ~sqrt(n) ulps of them: the floor is
  ``max(NOISE_ULPS, REDUCTION_ULPS * sqrt(n))`` ulps (speechnet's bn0 gamma gradient, float64: a
  sum of 4*99*26 products cancelling to 5.8e-8, rounded by 3.6e-16, i.e. 270 ulps of its
  layer's 6e-3). float32 then holds a small tensor to ~1/100 of its layer's largest for n ~ 10^4;
  float64 still to ~10^-10.
- ``steps``: w_k - w_0 is computed from weights that are each rounded to their own ulp at every
  step, so a change is known to ~``steps * eps * max|w_0|`` only; its scale is at least
  ``WEIGHT_ROUNDING_ULPS * steps * eps * max|w_0| / tol`` (SqueezeNet's
  features.11.expand3x3.weight, float32: a 3-step change of 1.5e-5 off by 7.45e-9, one ulp of its
  weights in [0.0625, 0.125); float64 agrees to 2e-13). A change 1% wrong is caught once it is
  over ~7e-5 (float32) of its weights' largest magnitude.

float32 rounding the port cannot be blamed for: a deep network's float32 gradients and steps can be
ill-conditioned (a ReLU decided by rounding on a 1x1 map carries 1/batch of its channel's
gradient; every later step amplifies what the last one left), and PyTorch's own float32 is then
farther from the exact result than the tolerance (full-size MobileNetV2 at batch 32, three steps:
PyTorch float32 against PyTorch float64, 1.2 of a weight's change; SqueezeNet 1.1's vanished stem
gradient, 6.7e-3; AMD EPYC, benchmarks/results/port/). So a float32 ``grads`` or ``steps`` tensor over tolerance passes when the port
differs from PyTorch by at most :data:`PYTORCH_ERROR_FACTOR` times PyTorch's own float32 error on
that tensor (max|float32 - float64| of PyTorch's two runs, each with its own decisions): the
bound a port exactly as accurate as PyTorch's float32 meets. Such tensors are counted under the
row's ``"within_pytorch_error"`` (``†`` in the report); the row still names the worst ratio. The
float64 proof has no such allowance, so a wrong conversion still fails at 1e-10, and a
float32-only error (a weight rounded to bfloat16) is far outside PyTorch's float32 error.

ReLU decisions made by rounding: a ReLU input within rounding of 0 (a ReLU6 input within
rounding of 0 or 6, a Hardswish's of -3 or 3, ...) can be decided differently by two correct
forwards, and every gradient upstream then moves by that element's whole contribution. As in
the parity suite (:mod:`parity.relu_decisions`), both sides' inputs of these piecewise
activations are recorded at every step (the port's through the ``tap`` of its
:class:`flaxcnn.models.nn.KinkedActivation` layers, inside its jitted step); where they differ
only within the forward tolerance (relative to the call's largest input) of a kink, PyTorch's
steps are run again, each step taking the port's decisions of that step (PyTorch's values, the
derivative of the port's side of the kink), on the same draws. Gradients, buffers and steps are compared against that run, forwards
against the first; the count is in ``relu_replays`` (per dtype: ``grads``, ``steps``). A
decision that differs outside that band is a real difference, never replayed (a note says how
many). Max-pool windows are replayed the same way (:mod:`parity.pool_decisions`): where the
two sides' chosen elements are within that band of each other on both sides, PyTorch keeps its
values and sends the window's gradient to the port's element (``max_pool_replays``); it is what
a ReLU decided by rounding before a pool needs (VGG-11-BN's float32 gradients, AMD EPYC). A part's row names its worst tensor among those measured
against their own size (so ``ratio == max_abs_diff / max_abs_ref`` there), unless one measured
against the floor fails; the worst of those is under the row's ``"noise_floor"``. Where ``scale`` is 0 the
difference is checked as an absolute one.

When a part is over tolerance, the first divergent layer is named by
:func:`parity.layers.compare_layers` on the float32 pair (for an MSE proof on the outputs
flattened as logits); where it cannot say (draws other than dropout modules', a divergence
only float64 shows), by the first layer in PyTorch's ``named_modules`` order whose parameter
gradients or buffers are over tolerance.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from flaxcnn import convert
from flaxcnn.errors import ConfigError
from flaxcnn.port.draws import TorchDraws, replaying
from flaxcnn.port.near_ties import count_max_pool_near_ties
from parity.losses import Loss, flax_loss, torch_loss
from parity.precision import full_precision
from parity.pool_decisions import (PoolReplay, pool_choices_to_replay, record_flax_pool_inputs,
                                   record_torch_pool_inputs, replay_torch_pool_choices)
from parity.relu_decisions import (DecisionReplay, decisions_to_replay, record_flax_relu_inputs,
                                   record_torch_relu_inputs, replay_torch_relu_decisions)

DTYPES = ("float32", "float64")
PARTS = ("forward", "train_forward", "grads", "buffers", "steps")

#: the largest accepted max|flax - torch| / max|torch| of a tensor, per dtype and part
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"forward": 1e-5, "train_forward": 1e-5, "grads": 1e-4, "buffers": 1e-5, "steps": 1e-4},
    "float64": {part: 1e-10 for part in PARTS},
}

#: a tensor far smaller than the largest of its layer in a part (the gradient of a conv bias
#: before BatchNorm, zero but for rounding) is measured against this many rounding errors (eps of
#: the dtype) of the layer's largest value instead of its own size: both sides hold rounding noise
NOISE_ULPS = 128
#: the parts where such tensors occur: a zero gradient, the zero change it makes over the steps,
#: and a BatchNorm's running mean of a batch mean that is exactly zero (a bias-free 1x1 conv of
#: another BatchNorm's train-mode output: mean 0 per channel, linear per pixel)
FLOORED_PARTS = ("grads", "buffers", "steps")
#: a layer's tensors of a part are sums over n products (a conv's gradient over the batch and
#: every output pixel, a BatchNorm's batch mean): rounding grows like sqrt(n) ulps of the terms
#: (random-walk rounding), so the floor is max(NOISE_ULPS, REDUCTION_ULPS * sqrt(n)) ulps
REDUCTION_ULPS = 8
#: ``steps`` compares w_k - w_0 of two weights each rounded to the weight's own ulp at every step:
#: the change of a tensor is only known to about ``steps * eps * max|w_0|``, so its scale is at
#: least this many of those over the tolerance
WEIGHT_ROUNDING_ULPS = 2
#: float32 ``grads`` and ``steps`` of a deep network can be ill-conditioned: a ReLU decided by
#: rounding on a 1x1 map carries 1/batch of its channel's gradient, and later steps amplify it, so
#: PyTorch's own float32 is then farther from the exact (float64) result than the tolerance. A tensor
#: over tolerance passes when the port differs from PyTorch's float32 by at most this many times
#: PyTorch's own float32 error on it: if the port is no less accurate than PyTorch's float32
#: (|port - exact| <= |torch - exact|), the triangle inequality bounds |port - torch| by twice it.
#: float64 (1e-10, no such allowance) still proves the conversion; this only says float32 rounding
#: is not the port's doing.
PYTORCH_ERROR_FACTOR = 2.0
#: the float32 parts the allowance applies to: those whose error grows with depth and steps
ACCURACY_PARTS = ("grads", "steps")

#: a 2-D output whose rows' logsumexp are all within this of 0 holds log-probabilities
LOG_PROB_ATOL = 1e-4

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_JAX_DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


class ProofError(ConfigError):
    """The two modules cannot be compared: their tensors do not correspond one to one, or the
    torch module does not return one batched tensor."""


def choose_loss(torch_output: torch.Tensor) -> str:
    """'nll' for a 2-D output whose rows are log-probabilities (logsumexp == 0 within 1e-4),
    'cross_entropy' for any other 2-D output (logits), 'mse' for any other rank (against a fixed
    random target drawn from the proof's seed)."""
    out = torch_output.detach()
    if out.dim() != 2:
        return "mse"
    lse = torch.logsumexp(out.double(), dim=1)
    return "nll" if bool(torch.all(lse.abs() <= LOG_PROB_ATOL)) else "cross_entropy"


# ------------------------------------------------------------------------------- the result


@dataclass
class Proof:
    """The verdict and, per dtype and part, the worst tensor (see the module docstring)."""

    passed: bool
    first_divergent_layer: str | None
    loss: str
    parts: dict  # {dtype: {part: {"max_abs_diff", "max_abs_ref", "tensor", "ratio", "tol", "passed"}}}
    settings: dict = field(default_factory=dict)  # steps, lr, seed
    notes: list[str] = field(default_factory=list)
    #: {dtype: {"grads": n, "steps": m}}: ReLU decisions made by rounding, taken as the port took them
    relu_replays: dict = field(default_factory=dict)
    #: {dtype: {"grads": n, "steps": m}}: max-pool windows chosen by rounding, routed as the port did
    max_pool_replays: dict = field(default_factory=dict)
    #: {part: ...}: each float32 side against PyTorch's float64 run (:func:`float32_accuracy`)
    float32_vs_float64: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        """What ``DIR/parity.json`` holds (non-finite numbers written as strings)."""
        return {
            "passed": self.passed,
            "first_divergent_layer": self.first_divergent_layer,
            "loss": self.loss,
            **{dtype: {part: _json_row(row) for part, row in self.parts[dtype].items()}
               for dtype in DTYPES if dtype in self.parts},
            "tolerances": {dtype: dict(TOLERANCES[dtype]) for dtype in DTYPES},
            "noise_floor": {"ulps": NOISE_ULPS, "parts": list(FLOORED_PARTS), "reduction_ulps": REDUCTION_ULPS,
                            "weight_rounding_ulps": WEIGHT_ROUNDING_ULPS},
            "float32_allowance": {"pytorch_error_factor": PYTORCH_ERROR_FACTOR, "parts": list(ACCURACY_PARTS)},
            "relu_replays": {dtype: dict(counts) for dtype, counts in self.relu_replays.items()},
            "max_pool_replays": {dtype: dict(counts) for dtype, counts in self.max_pool_replays.items()},
            "float32_vs_float64": {part: _json_row(row) for part, row in self.float32_vs_float64.items()},
            "settings": dict(self.settings),
            "notes": list(self.notes),
        }

    def format(self) -> str:
        """The printed report: one row per part and dtype, then the verdict."""
        header = ("part", "dtype", "max|Δ|", "max|ref|", "ratio", "tol", "tensor", "")
        rows = [header]
        for part in PARTS:
            for dtype in DTYPES:
                r = self.parts.get(dtype, {}).get(part)
                if r is None:
                    continue
                floored = ("*" if r.get("scale", 0.0) > r["max_abs_ref"] else "") + ("†" if r.get("within_pytorch_error") else "")
                rows.append((part, dtype, _num(r["max_abs_diff"]), _num(r["max_abs_ref"]), _num(r["ratio"]) + floored,
                             _num(r["tol"]), r["tensor"] or "-", "PASS" if r["passed"] else "FAIL"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if any(r.get("scale", 0.0) > r["max_abs_ref"] for d in self.parts.values() for r in d.values()):
            lines.append("* measured against its noise floor, not its own max|ref|")
        noise = [f"{part}/{dtype} {r['noise_floor']['tensors']} (worst {r['noise_floor']['tensor']}, "
                 f"ratio {_num(r['noise_floor']['ratio'])})"
                 for part in PARTS for dtype in DTYPES
                 if (r := self.parts.get(dtype, {}).get(part)) is not None and r.get("noise_floor")]
        if noise:
            lines.append(f"tensors far below their layer's largest (rounding noise on both sides), checked against "
                         f"max({NOISE_ULPS}, {REDUCTION_ULPS} * sqrt(n)) rounding errors of the layer's largest value "
                         f"(n: the layer's reduction length; steps: at least {WEIGHT_ROUNDING_ULPS} * steps rounding "
                         "errors of the tensor's weights): " + "; ".join(noise))
        excused = [f"{part} {r['within_pytorch_error']['tensors']} (worst {r['within_pytorch_error']['tensor']}: "
                   f"{_num(r['within_pytorch_error']['share_of_allowance'])} of the allowance)"
                   for part in PARTS if (r := self.parts.get("float32", {}).get(part)) and r.get("within_pytorch_error")]
        if excused:
            lines.append(f"† float32 tensors over tolerance that differ from PyTorch by at most {PYTORCH_ERROR_FACTOR:g} times "
                         "PyTorch's own float32 error (max|PyTorch float32 - PyTorch float64|), so passed: "
                         + "; ".join(excused))
        replays = [f"{dtype} " + ", ".join(f"{part} {n}" for part, n in counts.items())
                   for dtype, counts in self.relu_replays.items() if any(counts.values())]
        if replays:
            lines.append("ReLU decisions made by rounding, replayed into PyTorch as the port took them: "
                         + "; ".join(replays))
        pools = [f"{dtype} " + ", ".join(f"{part} {n}" for part, n in counts.items())
                 for dtype, counts in self.max_pool_replays.items() if any(counts.values())]
        if pools:
            lines.append("max-pool windows chosen by rounding (near ties), routed in PyTorch as the port chose: "
                         + "; ".join(pools))
        accuracy = [f"{part}: port {_num(r['port'])} ({r['port_tensor']}; PyTorch {_num(r['pytorch_on_that_tensor'])} "
                    f"there), PyTorch's worst {_num(r['pytorch'])} ({r['pytorch_tensor']})"
                    for part, r in self.float32_vs_float64.items()]
        if accuracy:
            lines.append("float32 against PyTorch's float64 run, max|float32 - float64| / max|float64| (not part of "
                         "the verdict): " + "; ".join(accuracy))
        lines.append(f"loss: {self.loss}; verdict: {'passed' if self.passed else 'failed'}")
        lines.append(f"first divergent layer: {self.first_divergent_layer or 'none'}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _num(value: float) -> str:
    return f"{value:.2e}" if math.isfinite(value) else str(value)


def _json_row(row: dict) -> dict:
    return {k: _json_row(v) if isinstance(v, dict) else _json_number(v) for k, v in row.items()}


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ------------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class TensorDiff:
    """One tensor compared: max|flax - torch|, max|torch|, and whether it holds integers."""

    diff: float
    ref: float
    integer: bool = False
    #: the smallest scale this tensor is measured against on its own account (``steps``: the
    #: rounding of the weights its change is computed from); 0 for none
    floor: float = 0.0
    #: float32 ``grads``/``steps``: max|PyTorch float32 - PyTorch float64| of this tensor, PyTorch's
    #: own float32 error (:func:`with_pytorch_errors`); None where not measured
    pytorch_error: float | None = None


def within_pytorch_error(d: TensorDiff) -> bool:
    """Whether a tensor over tolerance is excused by PyTorch's own float32 error: the port differs from
    PyTorch by at most :data:`PYTORCH_ERROR_FACTOR` times PyTorch's float32 distance from float64."""
    return d.pytorch_error is not None and not d.integer and d.diff <= PYTORCH_ERROR_FACTOR * d.pytorch_error


def tensor_diff(flax_value, torch_value, *, integer: bool = False) -> TensorDiff:
    """Both in float64; a shape mismatch is an infinite difference."""
    f = np.asarray(flax_value, np.float64)
    t = np.asarray(torch_value.detach().cpu().numpy() if isinstance(torch_value, torch.Tensor) else torch_value)
    integer = integer or not np.issubdtype(t.dtype, np.floating)
    t = t.astype(np.float64)
    if f.shape != t.shape:
        return TensorDiff(math.inf, float(np.max(np.abs(t))) if t.size else 0.0, integer)
    if t.size == 0:
        return TensorDiff(0.0, 0.0, integer)
    return TensorDiff(float(np.max(np.abs(f - t))), float(np.max(np.abs(t))), integer)


def noise_ulps(reduction: int = 1) -> float:
    """The rounding errors a layer's tensors may differ by: :data:`NOISE_ULPS`, or
    ``REDUCTION_ULPS * sqrt(n)`` for sums over more products (n: the layer's reduction length)."""
    return max(float(NOISE_ULPS), REDUCTION_ULPS * math.sqrt(max(reduction, 1)))


def noise_floors(diffs: Mapping[str, TensorDiff], dtype: str, part: str,
                 reductions: Mapping[str, int] | None = None) -> dict[str, float]:
    """Per layer, the smallest scale its tensors of this part are measured against:
    :func:`noise_ulps` rounding errors (eps of the dtype) of the layer's largest floating-point
    PyTorch value, over the tolerance (so that a tensor below it passes when it differs by at
    most that many rounding errors of its layer's scale). ``reductions``: per layer, how many
    products each of its values sums (absent: 1)."""
    if part not in FLOORED_PARTS:
        return {}
    reductions = reductions or {}
    eps_over_tol = float(np.finfo(dtype).eps) / TOLERANCES[dtype][part]
    floors: dict[str, float] = {}
    for name, d in diffs.items():
        layer = name.rpartition(".")[0]
        if not d.integer and math.isfinite(d.ref):
            factor = min(1.0, noise_ulps(reductions.get(layer, 1)) * eps_over_tol)
            floors[layer] = max(floors.get(layer, 0.0), d.ref * factor)
    return floors


def weight_rounding_floor(w0_max: float, steps: int, dtype: str) -> float:
    """The scale floor of a ``steps`` tensor whose weights reach ``w0_max``: w_k - w_0 inherits the
    rounding of both weights, ~``steps`` ulps of ``w0_max``, so a change is measured against at
    least :data:`WEIGHT_ROUNDING_ULPS` of those over the tolerance."""
    return WEIGHT_ROUNDING_ULPS * steps * float(np.finfo(dtype).eps) * w0_max / TOLERANCES[dtype]["steps"]


def ratios(diffs: Mapping[str, TensorDiff], dtype: str, part: str,
           reductions: Mapping[str, int] | None = None) -> dict[str, tuple[float, float]]:
    """Per tensor, (scale, ratio): scale is max(max|torch|, its layer's noise floor, its own
    floor); ratio is max|diff| / scale (max|diff| itself where the scale is 0)."""
    floors = noise_floors(diffs, dtype, part, reductions)
    out = {}
    for name, d in diffs.items():
        scale = max(d.ref, floors.get(name.rpartition(".")[0], 0.0), 0.0 if d.integer else d.floor)
        out[name] = (scale, math.nan if math.isnan(d.diff) else (d.diff / scale if scale > 0 else d.diff))
    return out


def _worst(measured: Mapping[str, tuple[float, float]], names) -> str:
    return max(names, key=lambda k: math.inf if math.isnan(measured[k][1]) else measured[k][1])


def part_summary(diffs: Mapping[str, TensorDiff], dtype: str, part: str,
                 reductions: Mapping[str, int] | None = None) -> dict:
    """A part as the report holds it: its worst tensor (largest ratio; NaN counts as the worst)
    among those measured against their own size, so that ``ratio == max_abs_diff / max_abs_ref``;
    the tensors measured against their layer's noise floor are checked too (``passed``) and the
    worst of them is under ``"noise_floor"`` (it is the part's tensor when it fails). Tensors over
    tolerance but within PyTorch's own float32 error pass and are counted under
    ``"within_pytorch_error"``; a tensor that fails outright is the part's tensor."""
    tol = TOLERANCES[dtype][part]
    row = {"max_abs_diff": 0.0, "max_abs_ref": 0.0, "tensor": None, "ratio": 0.0, "tol": tol, "passed": True,
           "scale": 0.0, "noise_floor": None, "within_pytorch_error": None}
    if not diffs:
        return row
    measured = ratios(diffs, dtype, part, reductions)
    over = [k for k, (_, r) in measured.items() if not r <= tol]
    excused = [k for k in over if within_pytorch_error(diffs[k])]
    failing = [k for k in over if k not in excused]
    floored = [k for k, (scale, _) in measured.items() if scale > diffs[k].ref]
    candidates = failing or [k for k in measured if k not in floored]
    name = _worst(measured, candidates or list(measured))
    scale, ratio = measured[name]
    row.update(max_abs_diff=diffs[name].diff, max_abs_ref=diffs[name].ref, tensor=name, ratio=ratio,
               passed=not failing, scale=scale)
    if excused:
        def share(k: str) -> float:  # of the allowance, PYTORCH_ERROR_FACTOR * PyTorch's error
            return diffs[k].diff / (PYTORCH_ERROR_FACTOR * diffs[k].pytorch_error)
        worst = max(excused, key=share)
        row["within_pytorch_error"] = {"tensors": len(excused), "tensor": worst, "max_abs_diff": diffs[worst].diff,
                                       "pytorch_error": diffs[worst].pytorch_error, "ratio": measured[worst][1],
                                       "share_of_allowance": share(worst)}
    if floored:
        # the worst judged by the floor alone; those the allowance passed are counted under it too
        worst = _worst(measured, [k for k in floored if k not in excused] or floored)
        row["noise_floor"] = {"tensors": len(floored), "tensor": worst, "max_abs_diff": diffs[worst].diff,
                              "max_abs_ref": diffs[worst].ref, "scale": measured[worst][0],
                              "ratio": measured[worst][1], "within_pytorch_error": worst in excused}
    return row


def over_tolerance(diffs: Mapping[str, TensorDiff], dtype: str, part: str,
                   reductions: Mapping[str, int] | None = None) -> list[str]:
    """The tensors of a part whose ratio is over tolerance (or NaN), but for those within PyTorch's
    own float32 error (:func:`within_pytorch_error`)."""
    tol = TOLERANCES[dtype][part]
    return [name for name, (_, ratio) in ratios(diffs, dtype, part, reductions).items()
            if not ratio <= tol and not within_pytorch_error(diffs[name])]


# ------------------------------------------------------------------------------- the two sides


@dataclass
class SideRun:
    """What one side computed, every tensor in PyTorch's layout and keys."""

    forward: np.ndarray
    train_forward: np.ndarray
    grads: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray]  # after one step
    deltas: dict[str, np.ndarray]  # w_k - w_0, parameters and buffers
    draws: list[list] = field(default_factory=list)  # per step, then the eval pass, the draws (torch side)
    notes: list[str] = field(default_factory=list)
    integers: frozenset[str] = frozenset()  # the integer tensors (BatchNorm's num_batches_tracked)
    w0_max: dict[str, float] = field(default_factory=dict)  # max|w_0| per tensor (torch side)
    reductions: dict[str, int] = field(default_factory=dict)  # per layer, products per value (torch side)
    relu_inputs: list[list[np.ndarray]] = field(default_factory=list)  # per step, every ReLU input (NCHW)
    relu_replays: list[DecisionReplay] = field(default_factory=list)  # per step, when replayed (torch side)
    pool_inputs: list[list[np.ndarray]] = field(default_factory=list)  # per step, every max-pool input (NCHW)
    pool_replays: list[PoolReplay] = field(default_factory=list)  # per step, when replayed (torch side)


def step_seed(seed: int, step: int) -> int:
    """The torch.Generator seed of step ``step``'s draws: distinct per (seed, step)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


@contextmanager
def counting_reductions(model: torch.nn.Module, reductions: dict[str, int]) -> Iterator[None]:
    """For the block, per module holding tensors of its own: how many products each of its values
    sums in the backward pass and its batch statistics, ``output elements / tensor's first dim``
    summed over calls (a conv: N * H_out * W_out; a BatchNorm: N * H * W; a Linear: N)."""
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        own = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
               if t.is_floating_point() and t.dim() > 0]
        if own:
            def hook(_module, _args, out, name=name, channels=max(int(own[0].shape[0]), 1)):
                if isinstance(out, torch.Tensor):
                    counts[name] = counts.get(name, 0) + out.numel() // channels
            handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        reductions.update(counts)


def run_torch(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, loss: Loss, *, steps: int,
              lr: float, seed: int, flax_relu_inputs: list[list[np.ndarray]] | None = None,
              flax_pool_inputs: list[list[np.ndarray]] | None = None, relu_band: float = 0.0) -> SideRun:
    """PyTorch's side on ``model`` (modified: pass a copy): eval forward, then ``steps`` SGD steps.

    ``flax_relu_inputs`` (the port's ReLU inputs, per step): each step first runs a copy of the
    model on the step's draws, and where its ReLU decisions differ from the port's within
    ``relu_band`` (relative to each call's largest input) of zero, the step takes the port's
    decisions there (:mod:`parity.relu_decisions`)."""
    model.eval()
    with torch.no_grad(), TorchDraws(torch.Generator().manual_seed(step_seed(seed, steps))) as mode:
        forward = _numpy(model(x))
    eval_draws = mode.draws  # none for dropout and stochastic depth; replayed all the same
    model.train()
    param_names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    w0 = {k: _numpy(v) for k, v in model.state_dict().items()}
    draws, train_forward, grads, buffers = [], None, {}, {}
    reductions: dict[str, int] = {}
    relu_inputs: list[list[np.ndarray]] = []
    pool_inputs: list[list[np.ndarray]] = []
    replays: list[DecisionReplay] = []
    pool_replays: list[PoolReplay] = []
    for k in range(steps):
        relus, pools = record_torch_relu_inputs(), record_torch_pool_inputs()
        if flax_relu_inputs is not None:
            with TorchDraws(torch.Generator().manual_seed(step_seed(seed, k))), \
                    record_torch_relu_inputs() as probe_inputs, record_torch_pool_inputs() as probe_pools:
                copy.deepcopy(model)(x)  # a copy: its BatchNorm statistics are not the step's
            decision = decisions_to_replay(probe_inputs, flax_relu_inputs[k], atol=0.0, rtol=relu_band)
            replays.append(decision)
            if decision.tolerated:
                relus = replay_torch_relu_decisions(decision)
            choices = pool_choices_to_replay(probe_pools, flax_pool_inputs[k] if flax_pool_inputs else [],
                                             rtol=relu_band)
            pool_replays.append(choices)
            pools = replay_torch_pool_choices(choices) if choices.tolerated else nullcontext()
        counting = counting_reductions(model, reductions) if k == 0 else nullcontext()
        with counting, TorchDraws(torch.Generator().manual_seed(step_seed(seed, k))) as mode, relus as inputs, \
                pools as pooled:
            out = model(x)
        draws.append(mode.draws)
        relu_inputs.append(inputs or [])
        pool_inputs.append(pooled or [])
        opt.zero_grad(set_to_none=True)
        torch_loss(loss, out, target).backward()
        if k == 0:
            train_forward = _numpy(out)
            # a parameter the loss does not reach has no .grad: its gradient is zero
            grads = {n: _numpy(p.grad) if p.grad is not None else np.zeros(tuple(p.shape), _numpy(p).dtype)
                     for n, p in model.named_parameters()}
        opt.step()
        if k == 0:
            buffers = {n: _numpy(v) for n, v in model.state_dict().items() if n not in param_names}
    deltas = {n: _numpy(v).astype(np.float64) - w0[n].astype(np.float64) for n, v in model.state_dict().items()}
    integers = frozenset(k for k, v in w0.items() if not np.issubdtype(v.dtype, np.floating))
    w0_max = {k: float(np.max(np.abs(v))) if v.size else 0.0 for k, v in w0.items() if k not in integers}
    return SideRun(forward, train_forward, grads, buffers, deltas, draws + [eval_draws], integers=integers,
                   w0_max=w0_max, reductions=reductions, relu_inputs=relu_inputs, relu_replays=replays,
                   pool_inputs=pool_inputs, pool_replays=pool_replays)


def train_step(graphdef: nnx.GraphDef, loss: Loss, lr: float, *,
               on_trace: Callable[[int, int], None] | None = None) -> Callable:
    """The port's jitted SGD step: ``step(params, rest, masks, x, target) -> (params, rest, out, grads)``.

    ``masks`` (the step's random draws, NNX layout, call order) are arguments of the jitted
    function, so each call replays its own; ``rest`` holds the buffers and RNG state.
    ``on_trace(replayed, given)``: called when the step is traced, with how many of the masks
    the port's random layers took."""
    tx = optax.sgd(lr)

    def step(params, rest, masks, x, target):
        def loss_fn(params, rest):
            model = nnx.merge(graphdef, params, rest, copy=True)  # variables of this trace
            with replaying(model, masks) as replay:
                out = model(x)
            if on_trace is not None:
                on_trace(replay.used, len(masks))
            _, _, new_rest = nnx.split(model, nnx.Param, ...)
            return flax_loss(loss, out, target), (out, new_rest)

        (_, (out, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates), new_rest, out, grads

    return jax.jit(step)


def _torch_keyed(graphdef: nnx.GraphDef, params, rest) -> dict[str, np.ndarray]:
    return dict(convert.to_numpy_state_dict(nnx.merge(graphdef, params, rest)))


def run_flax(model: nnx.Module, x: jax.Array, target: jax.Array, loss: Loss, draws: list[list], *,
             param_names: list[str], steps: int, lr: float) -> SideRun:
    """The port's side, replaying ``draws`` (PyTorch's, per step): the same passes as :func:`run_torch`."""
    model.eval()
    eval_graphdef, state = nnx.split(model)

    replays: list[tuple[str, int, int]] = []  # (pass, masks taken, masks given), at trace time

    def evaluate(state, masks, x):
        model = nnx.merge(eval_graphdef, state)
        with replaying(model, masks) as replay:
            out = model(x)
        replays.append(("eval", replay.used, len(masks)))
        return out

    forward = np.asarray(jax.jit(evaluate)(state, [jnp.asarray(d.nnx_layout()) for d in draws[steps]], x))
    model.train()
    relu_inputs: list[list[np.ndarray]] = []
    pool_inputs: list[list[np.ndarray]] = []
    # the taps are in the graphdef the step is jitted on
    with record_flax_relu_inputs(model) as recorded, record_flax_pool_inputs(model) as pooled:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    step = train_step(graphdef, loss, lr, on_trace=lambda used, given: replays.append(("train", used, given)))
    w0 = _torch_keyed(graphdef, params, rest)
    train_forward, grads, buffers = None, {}, {}
    for k in range(steps):
        masks = [jnp.asarray(d.nnx_layout()) for d in draws[k]]
        params, rest, out, g = step(params, rest, masks, x, target)
        jax.effects_barrier()
        relu_inputs.append(recorded.take())
        pool_inputs.append(list(pooled))
        pooled.clear()
        if k == 0:
            train_forward = np.asarray(out)
            grads = {n: v for n, v in _torch_keyed(graphdef, g, rest).items() if n in param_names}
            buffers = {n: v for n, v in _torch_keyed(graphdef, params, rest).items() if n not in param_names}
    final = _torch_keyed(graphdef, params, rest)
    deltas = {n: final[n].astype(np.float64) - w0[n].astype(np.float64) for n in final}
    notes = [f"the port's output is {out.dtype}, not {x.dtype}: it does not compute in {x.dtype} end to end"
             for out in (forward, train_forward) if out.dtype != x.dtype][:1]
    notes += [f"{mode} mode: PyTorch drew {given} random mask(s) per pass, the port replayed {used} (a random "
             "layer other than flaxcnn's Dropout/Dropout2d/Bernoulli draws its own)"
             for mode, used, given in dict.fromkeys(replays) if used != given]
    return SideRun(forward, train_forward, grads, buffers, deltas, notes=notes, relu_inputs=relu_inputs,
                   pool_inputs=pool_inputs)


# ------------------------------------------------------------------------------- the proof


def _targets(loss: str, out_shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Labels (cross-entropy, NLL) or a target of the output's shape (MSE), drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    if loss == "mse":
        return rng.standard_normal(out_shape)
    return rng.integers(0, out_shape[1], size=out_shape[0])


def _check_keys(what: str, flax_keys, torch_keys) -> None:
    missing, extra = sorted(set(torch_keys) - set(flax_keys)), sorted(set(flax_keys) - set(torch_keys))
    if missing or extra:
        raise ProofError(f"the port's {what} do not correspond to the torch module's: "
                         + (f"missing {', '.join(missing)}" if missing else "")
                         + ("; " if missing and extra else "") + (f"unexpected {', '.join(extra)}" if extra else ""))


def compare_runs(flax_run: SideRun, torch_run: SideRun, *, dtype: str = "float32", steps: int = 1,
                 replayed: SideRun | None = None) -> dict[str, dict[str, TensorDiff]]:
    """Per part, per tensor, the differences; ``steps`` tensors carry their weight-rounding floor
    (:func:`weight_rounding_floor`). ``replayed``: PyTorch's run with the port's ReLU decisions
    made by rounding, which the gradients, buffers and steps are compared against (the forwards
    against ``torch_run``, as they were computed)."""
    forwards, torch_run = torch_run, replayed or torch_run
    for what, f, t in (("parameters", flax_run.grads, torch_run.grads),
                       ("buffers", flax_run.buffers, torch_run.buffers),
                       ("tensors", flax_run.deltas, torch_run.deltas)):
        _check_keys(what, f, t)
    return {
        "forward": {"output": tensor_diff(flax_run.forward, forwards.forward)},
        "train_forward": {"output": tensor_diff(flax_run.train_forward, forwards.train_forward)},
        "grads": {k: tensor_diff(flax_run.grads[k], v) for k, v in torch_run.grads.items()},
        "buffers": {k: tensor_diff(flax_run.buffers[k], v) for k, v in torch_run.buffers.items()},
        "steps": {k: _with_floor(tensor_diff(flax_run.deltas[k], v, integer=k in torch_run.integers),
                                 weight_rounding_floor(torch_run.w0_max.get(k, 0.0), steps, dtype))
                  for k, v in torch_run.deltas.items()},
    }


def _with_floor(d: TensorDiff, floor: float) -> TensorDiff:
    return TensorDiff(d.diff, d.ref, d.integer, 0.0 if d.integer else floor)


def replay_counts(replays: list[DecisionReplay] | list[PoolReplay]) -> dict[str, int]:
    """Decisions taken as the port took them: in the gradients' pass (step 0) and over the steps."""
    return {"grads": replays[0].tolerated if replays else 0, "steps": sum(r.tolerated for r in replays)}


relu_replay_counts = replay_counts


def _pool_notes(choices: list[PoolReplay]) -> list[str]:
    notes = [f"max-pool choices not paired, none replayed: {c.unpaired}" for c in choices if c.unpaired][:1]
    beyond = sum(c.beyond_tolerance for c in choices)
    if beyond:
        notes.append(f"{beyond} max-pool window(s) choose a different element with no near tie: not replayed")
    return notes


def _relu_notes(decisions: list[DecisionReplay]) -> list[str]:
    notes = [f"ReLU decisions not paired, none replayed: {d.unpaired}" for d in decisions if d.unpaired][:1]
    beyond = [d for d in decisions if d.beyond_tolerance]
    if beyond:
        notes.append(f"{sum(d.beyond_tolerance for d in beyond)} ReLU decision(s) differ outside the forward "
                     f"tolerance of a kink (ReLU's 0, ReLU6's 0 and 6, ...; largest |input| "
                     f"{max(d.largest_beyond for d in beyond):.2e}): not replayed")
    return notes


@dataclass
class DtypeRun:
    """One dtype's comparison: the differences, PyTorch's draws, notes, the layers' reduction
    lengths and the ReLU decisions replayed."""

    diffs: dict[str, dict[str, TensorDiff]]
    draws: list[list]
    notes: list[str]
    reductions: dict[str, int]
    relu_replays: dict[str, int]
    flax_side: SideRun | None = None  # the port's run
    torch_side: SideRun | None = None  # PyTorch's run the gradients and steps were compared against
    torch_own: SideRun | None = None  # PyTorch's run with its own ReLU decisions (none replayed)
    max_pool_replays: dict[str, int] = field(default_factory=dict)


def float32_accuracy(runs: Mapping[str, DtypeRun], steps: int) -> dict[str, dict]:
    """How far each float32 side is from PyTorch's float64 run (the exact result, to ~1e-12 here),
    per part, measured as the proof measures (:func:`part_summary`: per tensor against its own
    size or its layer's float32 noise floor): the port's worst tensor and ratio, PyTorch's ratio on
    that tensor, and PyTorch's own worst. Not part of the verdict: it says whether a float32
    difference between the two sides is the port's or both sides' rounding, as when a deep
    network's float32 steps move both sides away from the exact trajectory."""
    f32, f64 = runs["float32"], runs["float64"]
    out: dict[str, dict] = {}
    for part, attr in (("grads", "grads"), ("steps", "deltas")):
        exact = getattr(f64.torch_side, attr)
        names = [n for n in exact if n not in f32.torch_side.integers]
        if not names:
            continue

        def against_exact(side: SideRun) -> dict[str, TensorDiff]:
            diffs = {n: tensor_diff(getattr(side, attr)[n], exact[n]) for n in names}
            if part == "steps":
                diffs = {n: _with_floor(d, weight_rounding_floor(f32.torch_side.w0_max.get(n, 0.0), steps, "float32"))
                         for n, d in diffs.items()}
            return diffs

        port, pytorch = against_exact(f32.flax_side), against_exact(f32.torch_side)
        port_row = part_summary(port, "float32", part, f32.reductions)
        torch_row = part_summary(pytorch, "float32", part, f32.reductions)
        on_port_worst = ratios(pytorch, "float32", part, f32.reductions)[port_row["tensor"]][1]
        out[part] = {"port": port_row["ratio"], "port_tensor": port_row["tensor"],
                     "pytorch_on_that_tensor": on_port_worst,
                     "pytorch": torch_row["ratio"], "pytorch_tensor": torch_row["tensor"]}
    return out


def with_pytorch_errors(runs: Mapping[str, DtypeRun]) -> dict[str, dict[str, TensorDiff]]:
    """float32's differences, its ``grads`` and ``steps`` tensors carrying PyTorch's own float32 error
    (:data:`PYTORCH_ERROR_FACTOR`): max|float32 - float64| of PyTorch's runs with their own ReLU
    decisions, i.e. what PyTorch's float32 gives a PyTorch user, against the exact result."""
    f32, f64 = runs["float32"], runs["float64"]
    diffs = dict(f32.diffs)
    for part, attr in (("grads", "grads"), ("steps", "deltas")):
        own, exact = getattr(f32.torch_own, attr), getattr(f64.torch_side, attr)
        diffs[part] = {name: d if d.integer or name not in exact else
                       replace(d, pytorch_error=tensor_diff(own[name], exact[name]).diff)
                       for name, d in f32.diffs[part].items()}
    return diffs


def _prove_dtype(torch_module: torch.nn.Module, build_flax: Callable[[Any], nnx.Module], x: np.ndarray,
                 dtype: str, loss: Loss, target: np.ndarray, *, steps: int, lr: float, seed: int) -> DtypeRun:
    """Both sides in ``dtype``; where a ReLU is decided differently by rounding (both inputs within the
    forward tolerance, relative to the call's largest input, of zero) in any step, PyTorch's steps
    are run again taking the port's decisions of each step (:func:`run_torch`)."""
    tmodel = copy.deepcopy(torch_module).to(_TORCH_DTYPES[dtype])
    x_t = torch.from_numpy(x.astype(dtype))
    target_t = torch.from_numpy(target.astype(dtype) if loss == "mse" else target.astype(np.int64))
    torch_run = run_torch(tmodel, x_t, target_t, loss, steps=steps, lr=lr, seed=seed)
    param_names = [n for n, _ in tmodel.named_parameters()]
    fmodel = build_flax(_JAX_DTYPES[dtype])
    target_f = jnp.asarray(target.astype(dtype) if loss == "mse" else target.astype(np.int32))
    flax_run = run_flax(fmodel, jnp.asarray(x.astype(dtype)), target_f, loss, torch_run.draws,
                        param_names=param_names, steps=steps, lr=lr)
    band = TOLERANCES[dtype]["forward"]
    decisions = [decisions_to_replay(t, f, atol=0.0, rtol=band)
                 for t, f in zip(torch_run.relu_inputs, flax_run.relu_inputs)]
    choices = [pool_choices_to_replay(t, f, rtol=band) for t, f in zip(torch_run.pool_inputs, flax_run.pool_inputs)]
    replayed, counts, pool_counts = None, relu_replay_counts([]), replay_counts([])
    if any(d.tolerated for d in decisions) or any(c.tolerated for c in choices):
        replayed = run_torch(copy.deepcopy(torch_module).to(_TORCH_DTYPES[dtype]), x_t, target_t, loss, steps=steps,
                             lr=lr, seed=seed, flax_relu_inputs=flax_run.relu_inputs,
                             flax_pool_inputs=flax_run.pool_inputs, relu_band=band)
        counts, pool_counts = relu_replay_counts(replayed.relu_replays), replay_counts(replayed.pool_replays)
        decisions, choices = replayed.relu_replays, replayed.pool_replays
    diffs = compare_runs(flax_run, torch_run, dtype=dtype, steps=steps, replayed=replayed)
    return DtypeRun(diffs, torch_run.draws, flax_run.notes + _relu_notes(decisions) + _pool_notes(choices),
                    torch_run.reductions, counts, flax_run, replayed or torch_run, torch_run, pool_counts)


def prove(torch_module: torch.nn.Module, build_flax: Callable[[Any], nnx.Module],
          example_input: np.ndarray, *, steps: int = 3, lr: float = 0.01, seed: int = 0) -> Proof:
    """build_flax(dtype) -> a fresh NNX module of the port, holding torch_module's current weights
    converted to dtype (jnp.float32 or jnp.float64; it is called inside the proof's float64 scope
    for float64). torch_module is not modified (deep-copied, .double() for float64).
    example_input: one NCHW batch (numpy)."""
    if steps < 1:
        raise ConfigError(f"steps must be at least 1 (the buffers are compared after one step), got {steps}")
    x = np.asarray(example_input.detach().cpu().numpy() if isinstance(example_input, torch.Tensor)
                   else example_input)
    if not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(f"example_input must be a floating-point NCHW batch, got dtype {x.dtype}")
    probe = copy.deepcopy(torch_module).float().eval()
    with torch.no_grad(), TorchDraws(torch.Generator().manual_seed(seed)):
        out = probe(torch.from_numpy(x.astype(np.float32)))
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        raise ProofError(f"the torch module returns {type(out).__name__}"
                         + (" (a scalar)" if isinstance(out, torch.Tensor) else "")
                         + "; the proof takes modules that return one batched tensor (N, ...)")
    loss: Loss = choose_loss(out)  # type: ignore[assignment]
    target = _targets(loss, tuple(out.shape), seed)

    runs: dict[str, DtypeRun] = {}
    notes: list[str] = []
    with full_precision():
        for dtype in DTYPES:
            with jax.enable_x64(dtype == "float64"):
                runs[dtype] = _prove_dtype(torch_module, build_flax, x, dtype, loss, target, steps=steps, lr=lr,
                                           seed=seed)
            notes += [f"{dtype}: {n}" for n in runs[dtype].notes]
    diffs = {"float32": with_pytorch_errors(runs), "float64": runs["float64"].diffs}
    reductions = {dtype: run.reductions for dtype, run in runs.items()}
    parts = {dtype: {part: part_summary(diffs[dtype][part], dtype, part, reductions[dtype]) for part in PARTS}
             for dtype in DTYPES}
    passed = all(row["passed"] for dtype in DTYPES for row in parts[dtype].values())
    first = None
    if not passed:
        first, layer_notes = first_divergent_layer(torch_module, build_flax, x, target, loss, diffs,
                                                   runs["float32"].draws, seed=seed, reductions=reductions)
        notes += layer_notes + max_pool_near_tie_notes(torch_module, x, seed=seed)
    return Proof(passed, first, loss, parts, {"steps": steps, "lr": lr, "seed": seed}, notes,
                 {dtype: run.relu_replays for dtype, run in runs.items()},
                 {dtype: run.max_pool_replays for dtype, run in runs.items()}, float32_accuracy(runs, steps))


def max_pool_near_tie_notes(torch_module: torch.nn.Module, x: np.ndarray, *, seed: int) -> list[str]:
    """Where PyTorch's float32 train pass (step 0's draws) has max-pool windows whose two largest
    values are within the forward tolerance (of the pool input's largest): a correct port may route
    their gradient to the other one, and the proof does not replay pool choices (a note)."""
    model = copy.deepcopy(torch_module).float().train()
    with torch.no_grad(), TorchDraws(torch.Generator().manual_seed(step_seed(seed, 0))), \
            count_max_pool_near_ties(rtol=TOLERANCES["float32"]["forward"]) as pools:
        model(torch.from_numpy(x.astype(np.float32)))
    tied = [p for p in pools if p.ties]
    if not tied:
        return []
    where = ", ".join(f"call {p.call + 1}: {p.ties} of {p.windows}" for p in tied)
    return [f"float32: max-pool windows whose two largest values are within rounding (not replayed; the port may "
            f"pass their gradient to the other one): {where}"]


# ------------------------------------------------------------------------------- the divergent layer


class _FlatTorch(torch.nn.Module):
    """A module's output flattened to (N, features): the logits the layer report's loss takes."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).flatten(1)


class _FlatNNX(nnx.Module):
    """The port's output flattened like :class:`_FlatTorch` (a 4-D output of a port is NCHW)."""

    def __init__(self, inner: nnx.Module):
        self.inner = inner

    def __call__(self, x):
        out = self.inner(x)
        return out.reshape(out.shape[0], -1)


#: the prefix the wrappers above give every layer name
_INNER = "inner."


def _layer_report(torch_module: torch.nn.Module, fmodel: nnx.Module, x: np.ndarray, target: np.ndarray,
                  loss: str, seed: int):
    """:func:`parity.layers.compare_layers` of the float32 pair, and the prefix of its layer names.

    It differentiates cross-entropy or NLL; for an MSE proof it runs on the outputs flattened to
    (N, features) as logits (its labels drawn from ``seed``): any loss locates a divergence."""
    from parity.layers import compare_layers

    # flaxcnn's own models flatten NHWC maps and permute the Linear's rows (nchw_flatten);
    # ports flatten in PyTorch's order (flaxcnn.models.nn.Flatten)
    flatten = "nhwc" if getattr(fmodel, "nchw_flatten", None) else "nchw"
    tmodel = copy.deepcopy(torch_module).float()
    if loss == "mse":
        return compare_layers(_FlatTorch(tmodel), _FlatNNX(fmodel), x.astype(np.float32), loss="cross_entropy",
                              seed=seed, flax_flatten=flatten), _INNER
    return compare_layers(tmodel, fmodel, x.astype(np.float32), target, loss=loss, seed=seed,
                          flax_flatten=flatten), ""


def first_divergent_layer(torch_module: torch.nn.Module, build_flax: Callable[[Any], nnx.Module], x: np.ndarray,
                          target: np.ndarray, loss: str, diffs: Mapping[str, Mapping[str, Mapping[str, TensorDiff]]],
                          draws: list[list], *, seed: int, reductions: Mapping[str, Mapping[str, int]] | None = None
                          ) -> tuple[str | None, list[str]]:
    """The layer a failed proof points at (PyTorch's module name), and notes on how it was found.
    ``reductions``: per dtype, the layers' reduction lengths (:func:`noise_floors`)."""
    notes = []
    reductions = reductions or {}
    float32_passed = all(not over_tolerance(diffs["float32"][part], "float32", part, reductions.get("float32"))
                         for part in PARTS)
    if float32_passed:
        notes.append("float32 passes: the layer is found from the float64 tensors (the layer report runs float32)")
    elif all(d.source.startswith("F.") for step in draws for d in step):
        try:
            report, prefix = _layer_report(torch_module, build_flax(jnp.float32), x, target, loss, seed)
        except Exception as error:  # noqa: BLE001 - any failure falls back to the tensors' verdict
            notes.append(f"layer report failed ({type(error).__name__}: {error}); layer found from the tensors")
        else:
            if report.first_divergence is not None:
                row = next((r for r in report.rows if r.label == report.first_divergence), None)
                name = row.name if row else report.first_divergence
                name = name[len(prefix):] if prefix and name.startswith(prefix) else name
                notes.append(f"layer report: {report.divergence_kind} divergence at {name}"
                             + (f" (call {row.call + 1})" if row and row.call else ""))
                return name, notes
            notes.append("layer report (float32) found no divergent layer; layer found from the tensors")
    else:
        notes.append("layer found from the tensors (the layer report replays dropout modules' masks, not "
                     "torch.bernoulli draws)")
    layer = _first_layer_over_tolerance(torch_module, diffs, reductions)
    if layer is None:
        notes.append("no layer's parameter gradients or buffers are over tolerance: the code after the last "
                     "layer, or an eval-mode-only difference, holds the divergence")
    return layer, notes


def _first_layer_over_tolerance(torch_module: torch.nn.Module,
                                diffs: Mapping[str, Mapping[str, Mapping[str, TensorDiff]]],
                                reductions: Mapping[str, Mapping[str, int]]) -> str | None:
    """The first module, in ``named_modules`` order, with a parameter gradient or buffer over tolerance."""
    for dtype in DTYPES:
        over = {k.rpartition(".")[0] for part in ("grads", "buffers", "steps")
                for k in over_tolerance(diffs[dtype][part], dtype, part, reductions.get(dtype))}
        for name, _ in torch_module.named_modules():
            if name in over:
                return name
    return None


__all__ = ["ACCURACY_PARTS", "DTYPES", "FLOORED_PARTS", "NOISE_ULPS", "PARTS", "PYTORCH_ERROR_FACTOR", "REDUCTION_ULPS",
           "TOLERANCES", "WEIGHT_ROUNDING_ULPS", "Proof", "ProofError", "TensorDiff", "choose_loss",
           "first_divergent_layer", "max_pool_near_tie_notes", "noise_floors", "noise_ulps", "over_tolerance",
           "part_summary", "prove", "ratios", "relu_replay_counts", "train_step", "weight_rounding_floor",
           "with_pytorch_errors", "within_pytorch_error"]
