"""Which implementation runs each CPU convolution and max-pool: one explicit, immutable value.

A :class:`ConvPolicy` is a rule, not a measurement. Its default:

* on CPU, in float32, flaxcnn's C++ kernels (:mod:`flaxcnn.kernels`) for every part of a
  convolution's training step (forward, kernel gradient, input gradient) they have a kernel
  for, and for max-pools whose windows crop the input; XLA's fused "taps" max-pool where the
  windows tile it (:meth:`PoolLayer.rule` gives the figures);
* XLA's own convolution and max-pool everywhere else: other dtypes (float64 proofs, bfloat16),
  the parts the kernels have no code for (channel counts outside ``kernels.CHANNELS``), strided,
  dilated or grouped convolutions, and every other platform (GPU, TPU: chosen at lowering by
  ``lax.platform_dependent``, so a CPU policy never reaches a GPU);
* two exceptions on CPU in float32, both still XLA programs, where XLA's convolution is measurably
  slow: an im2col matmul for the forward and input gradient of a convolution on a map smaller
  than its kernel (:meth:`ConvLayer.rule`), and one multiply-add per kernel tap for depthwise
  convolutions (:class:`DepthwiseLayer`), with the figures there.

Why a rule: the kernels beat XLA's convolutions on every lab network and CPU kind measured so
far (1.28-2.41x the XLA-only path on a Zen 3 AVX2 EPYC, 2026-12-05), and the per-layer timing
that used to choose between them at trace time was within run-to-run noise of "kernels
wherever they apply" on every lab network (0.956-1.111x with the AVX-512 kernels, 0.961-1.068x
with the AVX2 ones, every interval containing 1.0).

Where a machine is better served otherwise, ``flaxcnn tune`` measures the candidates offline and
writes a policy file (:func:`load`): per-layer overrides of the rule, keyed by the layer's shape
and used with ``--conv-policy FILE``. The policy travels explicitly: a run's config builds it,
:func:`apply` writes it into every layer of a model (a static attribute, so it is part of the
traced program and of the jit cache key), and the run records :meth:`ConvPolicy.describe` in its
``config.json`` and ``summary.json``. Nothing here is process state.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from flaxcnn import kernels
from flaxcnn.errors import ConfigError

#: the parts of a convolution's training step, and of a max-pool (forward alone / train pass)
CONV_PARTS = ("forward", "kernel_grad", "input_grad")
POOL_PARTS = ("pool_forward", "pool")
#: a depthwise convolution is one part: its forward and both gradients come from one formulation
DEPTHWISE_PARTS = ("depthwise",)
FILE_FORMAT = "flaxcnn-conv-policy/1"
#: the name of flaxcnn's C++ kernel implementation in every table of flaxcnn.models.ops
CPP = "cpp"


@dataclass(frozen=True)
class ConvLayer:
    """One stride-1 NHWC/HWIO float32 convolution on CPU, as a policy sees it."""

    n: int
    h: int
    w: int
    kernel_shape: tuple[int, int, int, int]  # HWIO
    padding: tuple[tuple[int, int], tuple[int, int]]
    precision: Any
    isa: str | None  # the C++ kernel variant to call, None when the kernels are not used

    def input_shape_for(self, n: int) -> tuple[int, int, int, int]:
        return (n, self.h, self.w, self.kernel_shape[2])

    @property
    def out_hw(self) -> tuple[int, int]:
        (t, b), (l, r) = self.padding
        return self.h + t + b - self.kernel_shape[0] + 1, self.w + l + r - self.kernel_shape[1] + 1

    def key(self) -> str:
        """The layer's shape without its batch: what a tuned policy's override is keyed by."""
        kh, kw, c, o = self.kernel_shape
        (t, b), (l, r) = self.padding
        return f"conv {c}->{o} {kh}x{kw} pad {t},{b},{l},{r} on {self.h}x{self.w}"

    #: the rule's implementation where neither the C++ kernels nor a rule exception apply
    without_kernel = "xla"

    def has_kernel(self, part: str) -> bool:
        return self.isa is not None and kernels.supports_conv(self.kernel_shape[2], self.kernel_shape[3],
                                                              jnp.float32)[part]

    def rule(self, part: str) -> str:
        """The default rule for ``part``: the C++ kernel wherever there is one (1.3-5x XLA's
        convolution per part on the lab layers; ``flaxcnn tune`` prints the figures for a machine).

        One exception: a layer without a kernel whose map is smaller than its kernel (VGG-11's
        3x3 convolutions on 2x2 maps at 32x32 input) runs its forward and input gradient as one
        im2col matmul (``banded``): XLA's CPU convolution handles those mostly-padding windows
        badly (512->512 on 2x2 at batch 64, forward: XLA 312 ms, banded 16.7 ms on an Intel Xeon
        with AVX-512; 1,694 against 42 ms, input gradient 1,594 against 52 ms, on an AMD EPYC
        with AVX2). Its kernel gradient stays on XLA, which is not slow there; on 4x4 maps XLA
        is as fast (``benchmarks/results/amd-epyc-avx2/rule_exception_parts.txt``)."""
        if self.has_kernel(part):
            return CPP
        kh, kw = self.kernel_shape[:2]
        if part in ("forward", "input_grad") and (self.h < kh or self.w < kw):
            return "banded"
        return self.without_kernel


@dataclass(frozen=True)
class PoolLayer:
    """One k x k, stride-k, floor-mode float32 max-pool on CPU, as a policy sees it."""

    n: int
    h: int
    w: int
    c: int
    k: int
    isa: str | None

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.h, self.w, self.c)

    def key(self) -> str:
        return f"max_pool {self.k}x{self.k} on {self.h}x{self.w}x{self.c}"

    #: the rule's implementation where the C++ kernels do not apply: the XLA formulation that
    #: works on every platform (strided taps and one comparison chain, see flaxcnn.models.ops.POOLS)
    without_kernel = "taps"

    def has_kernel(self, part: str) -> bool:
        return self.isa is not None

    def rule(self, part: str) -> str:
        """The default rule: the C++ pool where the windows crop the input (it skips the rows and
        columns past the last window without a copy: SpeechNet's 99x26 and 49x13 pools, 1.9 vs
        2.0 and 0.76 vs 0.90 ms per training pass), XLA's taps where they tile it exactly (XLA fuses
        them into their producer: NetDepth's three pools on taps took its training step from 14.3
        to 12.5 ms). Measured with ``flaxcnn tune`` on an Intel Xeon with AVX-512, batch 64."""
        crops = bool(self.h % self.k or self.w % self.k)
        return CPP if self.has_kernel(part) and crops else self.without_kernel


@dataclass(frozen=True)
class DepthwiseLayer:
    """One float32 NHWC depthwise convolution on CPU (groups == input channels, ``multiplier``
    outputs per channel), as a policy sees it: MobileNet's, ShuffleNet's, EfficientNet's."""

    n: int
    h: int
    w: int
    c: int
    multiplier: int
    kernel_hw: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dilation: tuple[int, int]
    precision: Any

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:  # HWIO, I = 1
        return (*self.kernel_hw, 1, self.c * self.multiplier)

    @property
    def out_hw(self) -> tuple[int, int]:
        (t, b), (l, r) = self.padding
        return tuple((size + lo + hi - d * (k - 1) - 1) // s + 1 for size, lo, hi, k, s, d in
                     ((self.h, t, b, self.kernel_hw[0], self.strides[0], self.dilation[0]),
                      (self.w, l, r, self.kernel_hw[1], self.strides[1], self.dilation[1])))

    def key(self) -> str:
        (t, b), (l, r) = self.padding
        kh, kw = self.kernel_hw
        return (f"depthwise {self.c}x{self.multiplier} {kh}x{kw} stride {self.strides[0]},{self.strides[1]} "
                f"dilation {self.dilation[0]},{self.dilation[1]} pad {t},{b},{l},{r} on {self.h}x{self.w}")

    #: the rule: one multiply-add of a strided slice per kernel tap (flaxcnn.models.ops.depthwise_taps),
    #: which XLA fuses, forward and backward. XLA's grouped convolution on CPU runs each group as its
    #: own small convolution: MobileNetV2's training step at batch 64 took 6.4 s with it and 2.7 s
    #: with taps (Intel Xeon AVX-512, 2 cores); per layer's training pass the taps were 4-38x
    #: faster on an AMD EPYC with AVX2 (benchmarks/results/amd-epyc-avx2/rule_exception_parts.txt)
    without_kernel = "taps"

    def has_kernel(self, part: str) -> bool:
        return False  # the C++ kernels have no depthwise code

    def rule(self, part: str) -> str:
        return self.without_kernel


Layer = ConvLayer | PoolLayer | DepthwiseLayer


@dataclass(frozen=True)
class ConvPolicy:
    """Which implementation runs each CPU convolution part and max-pool.

    ``kernels``: use flaxcnn's C++ kernels where they apply (the rule; False: XLA only).
    ``isa``: the kernel variant, None for the best this CPU runs (``kernels.selected_isa()``,
    which ``$FLAXCNN_KERNEL_ISA`` can force, e.g. to run the AVX2 code on an AVX-512 CPU).
    ``overrides``: ``((layer key, part, implementation), ...)`` from ``flaxcnn tune``, each
    replacing the rule for one layer shape and part. ``source``: where the policy came from
    (``default``, ``xla``, or the tuned file), for run records.
    """

    kernels: bool = True
    isa: str | None = None
    overrides: tuple[tuple[str, str, str], ...] = ()
    source: str = "default"

    def kernel_isa(self) -> str | None:
        """The variant whose kernels this policy calls; None when it calls none (XLA only, or
        the kernels cannot be built here: no C++ compiler)."""
        if not self.kernels:
            return None
        isa = self.isa or kernels.selected_isa()
        return isa if kernels.available(isa) else None

    def choose(self, layer: Layer, part: str, candidates: Iterable[str]) -> str:
        """The implementation of ``part`` for ``layer`` among ``candidates`` (the names ops knows):
        an override for this layer shape and part, else the rule (``layer.rule``: the C++ kernel
        where it has the part, else the layer kind's XLA formulation, with the exceptions there),
        XLA's formulation when the kernels are off."""
        names = list(candidates)
        for key, over_part, impl in self.overrides:
            if key == layer.key() and over_part == part:
                if impl not in names or (impl == CPP and not layer.has_kernel(part)):
                    raise ConfigError(f"conv policy {self.source}: {impl!r} cannot run {part} of {key} "
                                      f"here (accepted: {', '.join(n for n in names if n != CPP or layer.has_kernel(part))})")
                return impl
        rule = layer.rule(part)
        return rule if rule in names else layer.without_kernel

    def describe(self) -> dict[str, Any]:
        """What a run records: the rule, the kernel variant it calls, and any overrides."""
        try:
            isa = self.kernel_isa()
        except kernels.KernelConfigError as err:
            isa = f"invalid ({err})"
        return {"source": self.source, "rule": RULE if self.kernels else RULE_WITHOUT_KERNELS, "kernel_isa": isa,
                "overrides": [{"layer": k, "part": p, "impl": i} for k, p, i in self.overrides]}


#: what a run records as the rule (ConvLayer.rule, PoolLayer.rule, DepthwiseLayer.rule)
RULE = ("C++ kernels where they apply (max-pools: where the windows crop the input); XLA elsewhere, but "
        "im2col matmuls for maps smaller than the kernel and per-tap multiply-adds for depthwise convolutions")
RULE_WITHOUT_KERNELS = ("no C++ kernels: XLA, with im2col matmuls for maps smaller than the kernel and per-tap "
                        "multiply-adds for depthwise convolutions")


@dataclass(frozen=True, eq=False)
class _RecordingPolicy(ConvPolicy):
    """A policy that also notes each choice it makes (for :func:`explain`; a local object)."""

    record: list = dataclasses.field(default_factory=list)

    def choose(self, layer, part, candidates):
        choice = super().choose(layer, part, candidates)
        self.record.append((layer, part, choice))
        return choice


def traced_layers(model: nnx.Module, input_shape: tuple[int, ...], policy: ConvPolicy | None = None
                  ) -> list[tuple[Layer, str, str]]:
    """``(layer, part, implementation)`` of every CPU convolution part and max-pool a training
    step of ``model`` on inputs of ``input_shape`` runs under ``policy`` (default: the one its
    layers hold), in call order. Traces the forward and backward pass of a copy of the model
    abstractly (nothing is computed)."""
    import jax

    policy = policy or of(model) or DEFAULT
    recorder = _RecordingPolicy(policy.kernels, policy.isa, policy.overrides, policy.source)
    probe = apply(nnx.clone(model), recorder)
    probe.train()
    graph, params, rest = nnx.split(probe, nnx.Param, ...)

    def loss(params, rest, x):
        rest = jax.tree.map(lambda v: v, rest)  # fresh Variables inside the gradient trace (NNX's rule)
        return jnp.sum(nnx.merge(graph, params, rest)(x))

    jax.eval_shape(jax.grad(loss), params, rest, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    return list(recorder.record)


def explain(model: nnx.Module, input_shape: tuple[int, ...], policy: ConvPolicy | None = None
            ) -> list[dict[str, str]]:
    """Which implementation each CPU convolution part and max-pool of ``model`` runs (see
    :func:`traced_layers`): ``[{"layer": key, "forward": impl, ...}, ...]``, one entry a shape."""
    layers: dict[str, dict[str, str]] = {}
    for layer, part, choice in traced_layers(model, input_shape, policy):
        layers.setdefault(layer.key(), {"layer": layer.key()})[part] = choice
    return list(layers.values())


DEFAULT = ConvPolicy()
XLA_ONLY = ConvPolicy(kernels=False, source="xla")


def apply(model: nnx.Module, policy: ConvPolicy) -> nnx.Module:
    """Writes ``policy`` into every layer of ``model`` that holds one (in place; returns it).

    Layers built on :mod:`flaxcnn.models.ops` hold their policy as a static attribute:
    ``conv_policy`` on pools and on :class:`flaxcnn.models.nn.Conv2d` (whose convolution is an
    :class:`flaxcnn.models.ops.Convolution` of that policy)."""
    for _, module in nnx.iter_modules(model):
        if isinstance(getattr(module, "conv_policy", None), ConvPolicy):
            module.conv_policy = policy
        convolution = getattr(module, "conv_general_dilated", None)
        if isinstance(getattr(convolution, "policy", None), ConvPolicy):  # an ops.Convolution
            module.conv_general_dilated = dataclasses.replace(convolution, policy=policy)
    return model


def of(model: nnx.Module) -> ConvPolicy | None:
    """The policy the model's layers hold (None when none holds one); a mixed model is refused."""
    found = {m.conv_policy for _, m in nnx.iter_modules(model) if isinstance(getattr(m, "conv_policy", None), ConvPolicy)}
    if len(found) > 1:
        raise ConfigError(f"the model's layers hold {len(found)} different conv policies; apply one with conv_policy.apply")
    return found.pop() if found else None


def from_setting(setting: str | os.PathLike | None) -> ConvPolicy:
    """``default`` (or None), ``xla``, or the path of a ``flaxcnn tune`` policy file."""
    if setting is None or str(setting) == "default":
        return DEFAULT
    if str(setting) == "xla":
        return XLA_ONLY
    return load(setting)


def load(path: str | os.PathLike) -> ConvPolicy:
    """A policy file written by ``flaxcnn tune`` (see :func:`save`), checked against this CPU."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"conv policy file {path} cannot be read ({err.strerror}); accepted: default, xla, "
                          "or a file written by `flaxcnn tune`") from None
    except ValueError as err:
        raise ConfigError(f"conv policy file {path} is not JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
        raise ConfigError(f"{path} is not a flaxcnn conv policy (expected \"format\": {FILE_FORMAT!r}; "
                          "write one with `flaxcnn tune`)")
    isa = data.get("kernel_isa")
    here = kernels.runnable_isas()
    if isa is not None and isa not in here:
        raise ConfigError(f"{path} was tuned for the {isa} kernels, which this CPU cannot run (it runs "
                          f"{', '.join(here)}); run `flaxcnn tune` on this machine")
    overrides = []
    for i, rule in enumerate(data.get("overrides", [])):
        try:
            layer, part, impl = str(rule["layer"]), str(rule["part"]), str(rule["impl"])
        except (TypeError, KeyError):
            raise ConfigError(f"{path}: override {i} needs \"layer\", \"part\" and \"impl\", got {rule!r}") from None
        if part not in CONV_PARTS + POOL_PARTS + DEPTHWISE_PARTS:
            raise ConfigError(f"{path}: override {i} has part {part!r}; accepted: "
                              f"{', '.join(CONV_PARTS + POOL_PARTS + DEPTHWISE_PARTS)}")
        overrides.append((layer, part, impl))
    return ConvPolicy(kernels=bool(data.get("kernels", True)), isa=isa, overrides=tuple(overrides), source=str(path))


def save(policy: ConvPolicy, path: str | os.PathLike, **extra: Any) -> Path:
    """Writes ``policy`` as a policy file (``extra``: what tune measured, kept for the reader)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": FILE_FORMAT, "kernels": policy.kernels, "kernel_isa": policy.kernel_isa(),
            "overrides": [{"layer": k, "part": p, "impl": i} for k, p, i in policy.overrides], **extra}
    path.write_text(json.dumps(body, indent=1) + "\n")
    return path


def replace(policy: ConvPolicy, **changes: Any) -> ConvPolicy:
    return dataclasses.replace(policy, **changes)
