"""Shared check for the port tests: a torch module ported, exec'd, loaded and compared."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from flaxcnn import convert
from flaxcnn.port import PortResult, build_from_source, port

F32_TOL, F64_TOL = 1e-5, 1e-10


def example(shape=(2, 3, 8, 8), seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def _forward(model, x):
    """The model's forward, jitted: one compile instead of one per operation."""
    return nnx.jit(lambda m, v: m(v))(model, x)


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_ports(model: torch.nn.Module, x: np.ndarray, *, float64: bool = True) -> PortResult:
    """Port ``model`` on ``x``; the eval forward matches torch's in float32 (1e-5 of the output's
    scale) and in float64 (1e-10), with the same output shapes (4-D ones NCHW)."""
    result = port(model, x, prove=False)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref = _flat(reference(torch.from_numpy(x)))
    flax = result.module
    flax.eval()
    out = _flat(_forward(flax, jnp.asarray(x)))
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.shape == tuple(r.shape), (o.shape, r.shape)
        assert o.dtype == jnp.float32
        r = r.numpy()
        assert np.max(np.abs(np.asarray(o) - r)) <= F32_TOL * max(1.0, np.max(np.abs(r)))
    # the converted weights go back to torch's state dict unchanged
    back = convert.to_numpy_state_dict(flax)
    assert set(back) == set(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
    if float64:
        with jax.enable_x64(True):
            flax64 = build_from_source(result.source, result.class_name, jnp.float64, state)
            flax64.eval()
            out64 = _flat(_forward(flax64, jnp.asarray(x, jnp.float64)))
            with torch.no_grad():
                ref64 = _flat(copy.deepcopy(model).double().eval()(torch.from_numpy(x).double()))
            for o, r in zip(out64, ref64):
                assert o.dtype == jnp.float64
                r = r.numpy()
                assert np.max(np.abs(np.asarray(o) - r)) <= F64_TOL * max(1.0, np.max(np.abs(r)))
    return result
