"""Parity checks: a registered Flax model against its PyTorch reference, from one torch init.

For each model: eval-mode forward, train-mode forward (batch statistics, replayed dropout
masks, updated running statistics), gradients of the lab's loss w.r.t. every parameter (ReLU decisions
made by rounding replayed into PyTorch, :mod:`parity.relu_decisions`),
per-layer output shapes, and the round trip torch -> Flax -> torch (bitwise, and loadable with
``strict=True``). Everything runs in float32 with full-precision matmuls and convolutions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from flaxcnn import convert
from flaxcnn.models.registry import ModelSpec
from parity.losses import flax_loss
from parity.precision import full_precision
from parity.train_pass import flax_replay, rerun_with_flax_decisions, torch_train_pass

FORWARD_TOL = 1e-6
TRAIN_FORWARD_TOL = 1e-6
GRAD_TOL = 1e-5
# Relative part of intermediate-value tolerances (parity.layers, parity.relu_decisions): activations
# inside a network are larger than its outputs, and float32 rounding grows with magnitude.
RTOL = 1e-5

Converter = Callable[[nnx.Module, dict], nnx.Module]
Exporter = Callable[[nnx.Module], dict]


@dataclass
class ParityResult:
    name: str
    params: int
    forward_max_abs_diff: float
    train_forward_max_abs_diff: float
    grad_max_abs_diff: float
    shapes_match: bool
    roundtrip_exact: bool
    passed: bool
    dropout_masks_replayed: int = 0
    relu_decisions_replayed: int = 0
    grad_max_abs_diff_unreplayed: float = 0.0
    worst_grad_key: str = ""
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return asdict(self)


def _max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


class _ShapeRecorder(nnx.Module):
    """Wraps a layer and logs the NCHW shape of each output (eager use only)."""

    def __init__(self, inner: nnx.Module, name: str, log: list):
        self.inner = inner
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_log", log)

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        shape = tuple(out.shape)
        if len(shape) == 4:  # NHWC inside -> NCHW as PyTorch reports it
            shape = (shape[0], shape[3], shape[1], shape[2])
        self._log.append((self._name, shape))
        return out


def flax_layer_shapes(model: nnx.Module, x: jax.Array) -> list[tuple[str, tuple[int, ...]]]:
    model = nnx.clone(model)
    model.eval()
    log: list = []
    for name, value in list(vars(model).items()):
        if isinstance(value, nnx.Module):
            setattr(model, name, _ShapeRecorder(value, name, log))
    out = model(x)
    log.append(("output", tuple(out.shape)))
    return log


def torch_layer_shapes(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    log: list = []
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: log.append((name, tuple(o.shape))))
        for name, module in model.named_children()
    ]
    model.eval()
    with torch.no_grad():
        out = model(x)
    for handle in handles:
        handle.remove()
    log.append(("output", tuple(out.shape)))
    return log


def _grads(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: p.grad.numpy() for k, p in model.named_parameters()}


def _grad_diff(grads_f: dict, grads_t: dict) -> tuple[float, str]:
    """The largest |Δ| over all parameter gradients, and the key where it is."""
    worst_diff, worst = 0.0, ""
    for key, g in grads_t.items():
        d = _max_abs(grads_f.get(key, np.full((), np.inf)), g)
        if d > worst_diff:
            worst_diff, worst = d, key
    return worst_diff, worst


def reference_and_batch(spec: ModelSpec, batch: int, seed: int
                        ) -> tuple[torch.nn.Module, dict, torch.Tensor, torch.Tensor]:
    """The PyTorch reference initialised under ``seed``, a copy of its initial ``state_dict``,
    and the check's batch: N(0, 1) inputs and uniform labels drawn under ``seed + 1``."""
    torch.manual_seed(seed)
    model = spec.build_torch()
    initial = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(spec.example_shape(batch), generator=gen)
    num_classes = initial[list(initial)[-1]].shape[0]
    return model, initial, x, torch.randint(0, num_classes, (batch,), generator=gen)


def check_model(
    spec: ModelSpec,
    *,
    batch: int = 64,
    seed: int = 0,
    converter: Converter = convert.load_torch_state_dict,
    exporter: Exporter = convert.to_torch_state_dict,
) -> ParityResult:
    """Run every check for one model, at full precision for its duration (:mod:`parity.precision`).
    ``converter``/``exporter`` are injectable so tests can prove that a wrong conversion is caught."""
    with full_precision():
        return _check_model(spec, batch, seed, converter, exporter)


def _check_model(spec: ModelSpec, batch: int, seed: int, converter: Converter, exporter: Exporter) -> ParityResult:
    problems: list[str] = []
    tmodel, initial_sd, x_t, y_t = reference_and_batch(spec, batch, seed)
    fmodel = spec.build(seed=seed)
    converter(fmodel, initial_sd)
    x_f, y_f = jnp.asarray(x_t.numpy()), jnp.asarray(y_t.numpy(), jnp.int32)

    # 1. eval-mode forward
    tmodel.eval()
    with torch.no_grad():
        out_t = tmodel(x_t).numpy()
    fmodel.eval()
    forward_diff = _max_abs(fmodel(x_f), out_t)

    # 2. per-layer shapes
    shapes_t = torch_layer_shapes(tmodel, x_t)
    shapes_f = flax_layer_shapes(fmodel, x_f)
    names_t, names_f = {n for n, _ in shapes_t}, {n for n, _ in shapes_f}
    # layers on one side only (a parameter-free one: the port's ReLU layer, torch's F.relu) are not compared
    shapes_match = [s for s in shapes_t if s[0] in names_f] == [s for s in shapes_f if s[0] in names_t]
    if not shapes_match:
        problems.append(f"layer shapes differ: torch {shapes_t} vs flax {shapes_f}")

    # 3. train-mode forward and gradients, dropout masks replayed from PyTorch
    first = torch_train_pass(tmodel, x_t, y_t, spec.loss)
    stats_t = {k: v.numpy() for k, v in first.model.state_dict().items() if "running" in k or "num_batches" in k}

    fmodel.train()

    def loss_fn(model):
        out = model(x_f)
        return flax_loss(spec.loss, out, y_f), out

    with flax_replay(fmodel, first.masks) as relu_inputs_f:
        (_, out_f), grads_f = nnx.value_and_grad(loss_fn, has_aux=True)(fmodel)
    train_diff = _max_abs(out_f, first.output)
    exported_after_step = convert.to_numpy_state_dict(fmodel)
    for key, value in stats_t.items():
        train_diff = max(train_diff, _max_abs(exported_after_step[key], value))

    grad_model = nnx.clone(fmodel)
    nnx.update(grad_model, grads_f)
    grads_f_torch = convert.to_numpy_state_dict(grad_model)
    unreplayed_diff, _ = _grad_diff(grads_f_torch, _grads(first.model))
    relu_replay, compared = rerun_with_flax_decisions(tmodel, x_t, y_t, spec.loss, first, relu_inputs_f,
                                                      atol=FORWARD_TOL, rtol=RTOL)
    grad_diff, worst = _grad_diff(grads_f_torch, _grads(compared.model))
    if relu_replay.beyond_tolerance:
        problems.append(f"{relu_replay.beyond_tolerance} ReLU decisions differ beyond tolerance of zero "
                        f"(PyTorch input up to {relu_replay.largest_beyond:.2e})")
    if relu_replay.unpaired and grad_diff > GRAD_TOL:
        problems.append(f"ReLU decisions not compared: {relu_replay.unpaired}")

    # 4. round trip torch -> Flax -> torch, and strict loading by the reference class
    fresh = spec.build(seed=seed + 7)
    converter(fresh, initial_sd)
    back = exporter(fresh)
    roundtrip = list(back) == list(initial_sd) and all(
        back[k].dtype == initial_sd[k].dtype and torch.equal(torch.as_tensor(back[k]), initial_sd[k])
        for k in initial_sd
    )
    try:
        spec.build_torch().load_state_dict({k: torch.as_tensor(v) for k, v in back.items()}, strict=True)
    except RuntimeError as error:
        roundtrip = False
        problems.append(f"reference refuses the exported state_dict: {error}")

    n_params = sum(p.numel() for p in tmodel.parameters())
    checks = {
        "forward": forward_diff <= FORWARD_TOL,
        "train forward": train_diff <= TRAIN_FORWARD_TOL,
        "gradients": grad_diff <= GRAD_TOL,
        "shapes": shapes_match,
        "round trip": roundtrip,
    }
    problems += [f"{name} check failed" for name, ok in checks.items() if not ok]
    return ParityResult(
        name=spec.name,
        params=int(n_params),
        forward_max_abs_diff=forward_diff,
        train_forward_max_abs_diff=train_diff,
        grad_max_abs_diff=grad_diff,
        shapes_match=shapes_match,
        roundtrip_exact=roundtrip,
        passed=all(checks.values()),
        dropout_masks_replayed=sum(len(v) for v in first.masks.values()),
        relu_decisions_replayed=relu_replay.tolerated,
        grad_max_abs_diff_unreplayed=unreplayed_diff,
        worst_grad_key=worst,
        problems=problems,
    )
