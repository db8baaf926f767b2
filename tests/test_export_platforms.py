"""The jitted steps lower to the right code for each platform, decided at lowering.

Every registered network's training step (the engine's ``step`` and ``scan`` paths) and
evaluation step, built as ``flaxcnn train`` builds them (:func:`flaxcnn.train.loop.build_session`),
is exported with ``jax.export`` for ``cuda`` and for ``cpu`` on this (CPU-only) machine. The CUDA
program must hold no flaxcnn custom call (the C++ kernels are CPU code) and must hold XLA's
convolutions instead; the CPU program must call the kernels when they are available. Nothing
runs: exporting only traces and lowers, so no GPU is needed.

Also here: ``--path auto`` and ``flaxcnn sweep --strategy auto`` follow the platform of the
device the run is placed on, not ``jax.default_backend()``.
"""

from __future__ import annotations

import functools
import re
import types

import jax
import numpy as np
import pytest
from jax import export

from flaxcnn import kernels
from flaxcnn.data.arrays import Dataset, SplitArrays
from flaxcnn.models.registry import MODELS, get_model
from flaxcnn.train import sweep
from flaxcnn.train.config import TrainConfig
from flaxcnn.train.loop import Session, build_session
from flaxcnn.train.steps import default_path, placement_platform

#: small on purpose: lowering does not depend on the batch size, and tracing is what costs time
BATCH, SCAN_STEPS = 4, 2
CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w.]+)")
#: the kernels are flaxcnn's own custom calls; jax.export refuses custom calls without a
#: compatibility guarantee unless told, and the test wants the text to say what is in it
ALLOW_KERNELS = [export.DisabledSafetyCheck.custom_call(f"{target}_{isa}") for target in kernels.TARGETS
                 for isa in kernels.ISAS]


@functools.cache
def session(model: str) -> Session:
    """The model's session from a tiny generated data set (two classes, 2 x BATCH samples)."""
    spec = get_model(model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2 * BATCH, *spec.input_chw), dtype=np.float32)
    y = (np.arange(2 * BATCH) % 2).astype(np.int32)
    name = "cifar2" if spec.domain == "cifar" else "speech"
    dataset = Dataset(name, SplitArrays(x, y), SplitArrays(x, y), ("a", "b"), source="generated")
    return build_session(TrainConfig(model=model, dataset=name, batch_size=BATCH, epochs=1, path="step"), dataset)


def programs(model: str) -> dict[str, tuple]:
    """The engine's three jitted functions with arguments of the shapes a run gives them.
    ``runner._scan`` and ``evaluator._step`` are private: they are the exact objects the engine
    calls, which is the point."""
    s = session(model)
    x, y = s.device_arrays["train"]
    idx = np.arange(BATCH, dtype=np.int32)
    return {
        "train step": (s.runner.step_fn, (s.state, x, y, idx)),
        "train scan": (s.runner._scan, (s.state, x, y, np.stack([idx] * SCAN_STEPS))),
        "eval step": (s.evaluator._step, (s.state.params, s.state.rest, x[:BATCH], y[:BATCH])),
    }


def exported_text(model: str, platform: str) -> dict[str, str]:
    """Each program exported for ``platform``; its StableHLO text."""
    texts = {}
    for name, (fn, args) in programs(model).items():
        exported = export.export(fn, platforms=[platform], disabled_checks=ALLOW_KERNELS)(*args)
        assert exported.platforms == (platform,)
        assert exported.mlir_module_serialized, f"{model} {name}: empty {platform} module"
        texts[name] = exported.mlir_module()
    return texts


def flaxcnn_targets(text: str) -> set[str]:
    """flaxcnn's custom-call targets in ``text``, without their ISA suffix (``_avx512``, ...)."""
    return {t.rsplit("_", 1)[0] for t in CUSTOM_CALL.findall(text) if t.startswith("flaxcnn_")}


@pytest.mark.parametrize("model", list(MODELS))
def test_cuda_export_has_no_cpu_kernels_and_xla_convolutions(model):
    for name, text in exported_text(model, "cuda").items():
        found = flaxcnn_targets(text)
        assert not found, (f"{model} {name} exported for cuda calls flaxcnn's CPU-only kernels {sorted(found)}: "
                           "the CPU code must be chosen at lowering (jax.lax.platform_dependent), not at trace time")
        assert "stablehlo.convolution" in text, f"{model} {name} exported for cuda has no XLA convolution"


@pytest.mark.parametrize("model", list(MODELS))
def test_cpu_export_calls_the_kernels_when_available(model):
    if not kernels.available():
        pytest.skip("flaxcnn's C++ kernels are not available here (no C++ compiler)")
    texts = exported_text(model, "cpu")
    for name in ("train step", "train scan"):
        assert {"flaxcnn_conv_forward", "flaxcnn_conv_kernel_grad"} <= flaxcnn_targets(texts[name]), (
            f"{model} {name} exported for cpu does not call the C++ convolution kernels")
    assert "flaxcnn_conv_forward" in flaxcnn_targets(texts["eval step"]), (
        f"{model} eval step exported for cpu does not call the C++ convolution kernel")


# ----------------------------------------------------------------------------- platform of placement

def fake_devices(*platforms: str) -> list:
    return [types.SimpleNamespace(platform=p, id=i) for i, p in enumerate(platforms)]


def test_path_follows_the_devices_given():
    assert default_path(fake_devices("cpu", "cpu")) == "step"
    assert default_path(fake_devices("gpu")) == "scan"
    assert default_path(fake_devices("tpu")) == "scan"
    with pytest.raises(ValueError, match="one platform.*cpu, gpu"):
        placement_platform(fake_devices("cpu", "gpu"))


def test_path_follows_the_default_device_not_the_default_backend():
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        assert placement_platform() == "cpu" and default_path() == "step"
    with jax.default_device("cpu"):
        assert placement_platform() == "cpu"
    assert placement_platform() == jax.devices()[0].platform


def test_sweep_strategy_follows_the_placement_platform(monkeypatch):
    base = TrainConfig(model="net")
    monkeypatch.setattr(sweep, "placement_platform", lambda devices=None: "gpu")
    assert sweep.choose_strategy("auto", base) == "vmap"
    assert sweep.choose_strategy("auto", TrainConfig(model="net", schedule="cosine")) == "sequential"
    monkeypatch.setattr(sweep, "placement_platform", lambda devices=None: "cpu")
    assert sweep.choose_strategy("auto", base) == "sequential"
