"""``flaxcnn.port`` on well-known architectures (tests/port_zoo.py) and on the labs' networks.

Each network is ported at its small size with a batch of 4 and must pass its proof at the
tolerances of the port's contract (max_abs_diff / max_abs_ref of the worst tensor: float64 <=
1e-10 for every part; float32 forward, train-mode forward and buffers <= 1e-5, gradients and
SGD steps <= 1e-4). Its output folder must hold an importable ``model.py`` with one NNX class
per torch class, ``weights.npz`` equal to the torch state dict bit for bit, and ``parity.json``.
The labs' networks must also load the same state dicts as their hand-written mirrors and then
compute the mirrors' outputs.

The full-size zoo runs are marked ``slow`` and run only when selected (``pytest -m slow
tests/test_port_zoo.py``); they write ``benchmarks/results/port/<name>/parity.json``.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flaxcnn import convert, port
from flaxcnn.models.registry import MODELS
from parity import references
from tests import port_zoo

BATCH = 4
PARTS = ("forward", "train_forward", "grads", "buffers", "steps")
#: the port's contract: the largest max_abs_diff / max_abs_ref accepted per dtype and part
TOLERANCES = {
    "float32": {"forward": 1e-5, "train_forward": 1e-5, "buffers": 1e-5, "grads": 1e-4, "steps": 1e-4},
    "float64": {part: 1e-10 for part in PARTS},
}
#: a float32 gradient or step over tolerance is accepted when the port differs from PyTorch by at most
#: twice PyTorch's own float32 error on that tensor (PyTorch float32 against float64): the bound a port
#: as accurate as PyTorch's float32 meets (flaxcnn.port.proof.PYTORCH_ERROR_FACTOR)
PYTORCH_ERROR_FACTOR = 2.0
#: forward of a loaded float32 port against torch's, relative to torch's largest output
FORWARD_TOL = 1e-5
REPO_ROOT = Path(__file__).resolve().parents[1]
FULL_RESULTS = REPO_ROOT / "benchmarks" / "results" / "port"
#: the labs' networks: registered models (with their hand-written mirrors) and the one
#: reference class that has no mirror (NetDepth as the lab wrote it)
UNREGISTERED_REFERENCES = {"net-depth-as-written": (references.NetDepthAsWritten, (3, 32, 32))}

# Full-size runs take minutes each: only when asked for (`-m slow`), never in the default run.
# They run at batch 32: at batch 4, train-mode BatchNorm on the late 4x4 to 1x1 maps normalises
# over 4-64 values per channel, and float32 rounding grows through the layers (MobileNetV2's
# recorded activations: 3e-7 of their largest value at the stem, 3e-5 at the head in the first
# step, ten times that in the next); at batch 32 ShuffleNetV2's and EfficientNet-B0's float32
# steps pass. DenseNet-121 passes at batch 4, and its proof at batch 32 took more than the 24 GB
# of the machine it ran on (killed at 18.6 GB resident), so it stays at 4.
FULL_BATCH = 32
FULL_BATCH_OVERRIDES = {"densenet121": 4}
run_only_when_selected = pytest.mark.skipif("'slow' not in config.getoption('markexpr')",
                                            reason="full-size port proofs run only with -m slow")


def example_input(chw: tuple[int, int, int], batch: int = BATCH, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *chw)).astype(np.float32)


def zoo_loss(name: str) -> str:
    return "mse" if name == "unet" else "cross_entropy"


def torch_forward(model: torch.nn.Module, x: np.ndarray, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """The eval-mode output of a copy of ``model`` in ``dtype`` (the model itself is not changed)."""
    clone = copy.deepcopy(model).to(dtype).eval()
    with torch.no_grad():
        return clone(torch.from_numpy(x).to(dtype)).numpy()


def eval_forward(model, x: np.ndarray) -> np.ndarray:
    """``model``'s eval-mode output, jitted (one compile instead of one per operation eagerly)."""
    model.eval()
    return np.asarray(nnx.jit(lambda m, batch: m(batch))(model, jnp.asarray(x)))


def relative_diff(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), np.finfo(np.float64).tiny))


def custom_classes(model: torch.nn.Module) -> set[str]:
    """Names of the classes in ``model`` that are not torch's own (the user's block classes)."""
    return {type(m).__name__ for m in model.modules() if not type(m).__module__.startswith("torch.")}


def source_classes(source: str) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ClassDef)}


def import_model_file(path: Path, unique: str):
    """``path`` imported as a fresh module (not left in sys.modules)."""
    name = "_ported_" + re.sub(r"\W", "_", unique)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


class Ported:
    """One port: the torch model, its example input, what ``port`` returned, and its folder."""

    def __init__(self, key: str, model: torch.nn.Module, x: np.ndarray, out_dir: Path):
        self.key, self.model, self.x, self.out_dir = key, model, x, out_dir
        self.result = port.port(model, x, out_dir=out_dir)

    @property
    def parity(self) -> dict:
        return json.loads((self.out_dir / "parity.json").read_text())


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    """``ported(key, build, chw)``: the port of ``build()`` at input ``chw``, made once per module
    (a failed port fails every test that asks for it, with its own error)."""
    cache: dict[str, Ported | Exception] = {}

    def get(key: str, build, chw: tuple[int, int, int]) -> Ported:
        if key not in cache:
            torch.manual_seed(0)
            model = build()
            try:
                cache[key] = Ported(key, model, example_input(chw), tmp_path_factory.mktemp("port") / key)
            except Exception as error:  # noqa: BLE001 -- re-raised for each test that needs it
                cache[key] = error
        if isinstance(cache[key], Exception):
            raise cache[key]
        return cache[key]

    return get


def zoo_small(ported, name: str) -> Ported:
    return ported(name, port_zoo.ZOO[name][0], port_zoo.INPUT_CHW)


def reference(ported, name: str) -> Ported:
    if name in UNREGISTERED_REFERENCES:
        cls, chw = UNREGISTERED_REFERENCES[name]
        return ported(name, cls, chw)
    spec = MODELS[name]
    return ported(name, spec.build_torch, spec.input_chw)


def assert_parity_file(parity: dict, *, has_buffers: bool) -> None:
    """parity.json holds the contract's keys, and every part is within the contract's tolerance."""
    for key in ("passed", "first_divergent_layer", "loss", "float32", "float64", "tolerances"):
        assert key in parity, f"parity.json lacks {key!r}: {sorted(parity)}"
    assert parity["passed"] is True and parity["first_divergent_layer"] is None
    for dtype, tolerances in TOLERANCES.items():
        for part, tol in tolerances.items():
            entry = parity[dtype][part]
            assert {"max_abs_diff", "max_abs_ref", "tensor"} <= set(entry), f"{dtype}.{part}: {entry}"
            if part == "buffers" and not has_buffers:
                continue  # nothing to compare (a model without BatchNorm)
            assert entry["tensor"], f"{dtype}.{part} names no tensor: {entry}"
            assert entry["max_abs_ref"] > 0, f"{dtype}.{part}: the reference tensor is all zeros: {entry}"
            ratio = entry["max_abs_diff"] / entry["max_abs_ref"]
            excused = entry.get("within_pytorch_error")  # float32 grads/steps within PyTorch's own float32 error
            if excused:
                assert dtype == "float32" and part in ("grads", "steps"), f"{dtype}.{part}: {excused}"
                assert excused["max_abs_diff"] <= PYTORCH_ERROR_FACTOR * excused["pytorch_error"], excused
                assert excused["share_of_allowance"] <= 1.0, excused
            else:
                assert ratio <= tol, f"{dtype}.{part}: {entry['tensor']} off by {ratio:.3g} of its size (tolerance {tol})"
            if "tol" in entry:
                assert entry["tol"] <= tol, f"{dtype}.{part}: the proof's tolerance {entry['tol']} is looser than {tol}"
            floored = entry.get("noise_floor")  # tensors at rounding noise, measured against their layer's scale
            if floored:
                assert floored["ratio"] <= tol or (excused and floored["within_pytorch_error"]), \
                    f"{dtype}.{part}: {floored['tensor']} over its noise floor: {floored}"


def assert_port_folder(p: Ported, loss: str) -> None:
    """model.py imports and declares the input and loss; weights.npz is the torch state dict;
    ``flaxcnn.port.load`` gives the torch model's eval forward and exports the same state dict
    back, and in float64 holds every floating-point variable in float64 (the proof checks the
    float64 forward; an eager float64 forward here would only repeat it, slowly)."""
    files = {f.name for f in p.out_dir.iterdir()}
    assert {"model.py", "weights.npz", "parity.json"} <= files, files
    module = import_model_file(p.out_dir / "model.py", p.key)
    top = getattr(module, p.result.class_name)
    assert tuple(top.input_chw) == tuple(p.x.shape[1:]) and top.loss == loss, (top.input_chw, top.loss)

    state = p.model.state_dict()
    with np.load(p.out_dir / "weights.npz") as saved:
        assert list(saved.keys()) == list(state), "weights.npz keys differ from the torch state dict's"
        for key, value in state.items():
            np.testing.assert_array_equal(saved[key], value.numpy(), err_msg=key)

    loaded = port.load(p.out_dir)
    for key, value in convert.to_numpy_state_dict(loaded).items():
        np.testing.assert_array_equal(value, state[key].numpy(), err_msg=f"exported {key}")
    assert relative_diff(eval_forward(loaded, p.x), torch_forward(p.model, p.x)) <= FORWARD_TOL
    with jax.enable_x64(True):
        loaded64 = port.load(p.out_dir, dtype=jnp.float64)
        for key, value in convert.to_numpy_state_dict(loaded64).items():
            if np.issubdtype(state[key].numpy().dtype, np.floating):
                assert value.dtype == np.float64, f"{key} is {value.dtype} in the float64 port"
                np.testing.assert_array_equal(value, state[key].numpy().astype(np.float64), err_msg=key)


# --- the zoo, small ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(port_zoo.ZOO))
def test_zoo_port_passes_its_proof(ported, name):
    p = zoo_small(ported, name)
    assert p.result.proof is not None
    assert p.result.proof.passed, p.result.proof.format()
    assert p.result.proof.loss == zoo_loss(name)
    has_buffers = any(True for _ in p.model.buffers())
    assert_parity_file(p.parity, has_buffers=has_buffers)
    assert p.parity["loss"] == zoo_loss(name)


@pytest.mark.parametrize("name", list(port_zoo.ZOO))
def test_zoo_port_folder_loads_and_reproduces_torch(ported, name):
    assert_port_folder(zoo_small(ported, name), zoo_loss(name))


@pytest.mark.parametrize("name", list(port_zoo.ZOO))
def test_zoo_port_has_one_nnx_class_per_torch_class(ported, name):
    p = zoo_small(ported, name)
    classes = source_classes(p.result.source)
    top = type(p.model).__name__
    assert p.result.class_name == top and top in classes, (p.result.class_name, sorted(classes))
    for torch_class in custom_classes(p.model) - {top}:
        # a block whose instances trace to different graphs may get suffixed variants (BasicBlock2)
        variants = [c for c in classes if re.fullmatch(rf"{torch_class}(_?\w+)?", c)]
        assert variants, f"no NNX class for torch class {torch_class}: {sorted(classes)}"
        instances = sum(type(m).__name__ == torch_class for m in p.model.modules())
        assert len(variants) <= instances, f"{torch_class}: {len(variants)} variants for {instances} instances"
    assert (p.out_dir / "model.py").read_text() == p.result.source
    assert "from flaxcnn.models import nn as N" in p.result.source


def test_resnet18_port_has_a_basic_block_class(ported):
    p = zoo_small(ported, "resnet18")
    classes = source_classes(p.result.source)
    assert "BasicBlock" in classes and "ResNet18" in classes, sorted(classes)


def test_efficientnet_proof_replays_stochastic_depth_draws(ported):
    p = zoo_small(ported, "efficientnet_b0")
    dropping = [m for m in p.model.modules() if isinstance(m, port_zoo.MBConv) and m.use_residual and m.drop_rate > 0]
    assert dropping, "the small EfficientNet must have a residual block with stochastic depth"
    # the draws change the train-mode output, so a proof that did not replay them would fail
    model = copy.deepcopy(p.model).train()
    x = torch.from_numpy(p.x)
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        outs.append(model(x).detach())
    assert not torch.equal(*outs)
    assert "Bernoulli" in p.result.source
    train_forward = p.result.proof.parts["float32"]["train_forward"]
    steps = p.result.proof.parts["float32"]["steps"]
    assert train_forward["passed"] and steps["passed"], p.result.proof.format()
    assert p.result.proof.parts["float64"]["train_forward"]["passed"], p.result.proof.format()


# --- the labs' networks --------------------------------------------------------------------------

REFERENCE_NAMES = [*MODELS, *UNREGISTERED_REFERENCES]


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_reference_port_passes_its_proof(ported, name):
    p = reference(ported, name)
    assert p.result.proof.passed, p.result.proof.format()
    expected_loss = MODELS[name].loss if name in MODELS else "cross_entropy"
    assert p.result.proof.loss == expected_loss
    assert_parity_file(p.parity, has_buffers=any(True for _ in p.model.buffers()))
    assert_port_folder(p, expected_loss)


@pytest.mark.parametrize("name", list(MODELS))
def test_reference_port_loads_the_mirrors_state_dict(ported, name):
    spec = MODELS[name]
    p = reference(ported, name)
    mirror = spec.build(seed=0)
    mirror_state = convert.to_torch_state_dict(mirror)
    torch_state = p.model.state_dict()
    assert {k: tuple(v.shape) for k, v in mirror_state.items()} == {k: tuple(v.shape) for k, v in torch_state.items()}
    ported_model = port.build_from_source(p.result.source, p.result.class_name, jnp.float32, mirror_state)
    for key, value in convert.to_numpy_state_dict(ported_model).items():
        np.testing.assert_array_equal(value, mirror_state[key].numpy(), err_msg=key)
    assert relative_diff(eval_forward(ported_model, p.x), eval_forward(mirror, p.x)) <= FORWARD_TOL


# --- the zoo, full size (slow) -------------------------------------------------------------------

@pytest.mark.slow
@run_only_when_selected
@pytest.mark.parametrize("name", list(port_zoo.ZOO))
def test_zoo_full_size_port_passes_its_proof(tmp_path, name):
    model = port_zoo.build(name, "full")
    out_dir = tmp_path / name
    batch = FULL_BATCH_OVERRIDES.get(name, FULL_BATCH)
    result = port.port(model, example_input(port_zoo.INPUT_CHW, batch), out_dir=out_dir)
    assert (out_dir / "parity.json").exists(), "the port wrote no parity.json"
    target = FULL_RESULTS / name
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out_dir / "parity.json", target / "parity.json")
    assert result.proof.passed, result.proof.format()
    assert_parity_file(json.loads((out_dir / "parity.json").read_text()),
                       has_buffers=any(True for _ in model.buffers()))
