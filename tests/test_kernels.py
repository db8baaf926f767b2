"""The C++ CPU convolution kernels (flaxcnn/kernels) against PyTorch in float64, and their build."""

import sys
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from flaxcnn import kernels
from flaxcnn.models import ops

needs_kernels = pytest.mark.skipif(jax.default_backend() != "cpu" or not kernels.available(),
                                   reason="the C++ kernels run on the CPU backend and need a C++ compiler")


def _torch_conv(x, w, padding, grad_out):
    """PyTorch's conv2d of an NHWC batch with an HWIO kernel: output, input and kernel gradients."""
    (t, b), (l, r) = padding
    tx = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
    tw = torch.tensor(w.transpose(3, 2, 0, 1), dtype=torch.float64, requires_grad=True)
    out = torch.nn.functional.conv2d(torch.nn.functional.pad(tx, (l, r, t, b)), tw)
    (out * torch.tensor(grad_out.transpose(0, 3, 1, 2), dtype=torch.float64)).sum().backward()
    return (out.detach().numpy().transpose(0, 2, 3, 1), tx.grad.numpy().transpose(0, 2, 3, 1),
            tw.grad.numpy().transpose(2, 3, 1, 0))


def _check_against_torch(n, hw, c, o, k, padding):
    rng = np.random.default_rng(c * 100 + o)
    x = rng.standard_normal((n, *hw, c)).astype(np.float32)
    w = (rng.standard_normal((k, k, c, o)) / (k * np.sqrt(c))).astype(np.float32)
    (t, b), (l, r) = padding
    out_hw = (hw[0] + t + b - k + 1, hw[1] + l + r - k + 1)
    grad_out = rng.standard_normal((n, *out_hw, o)).astype(np.float32)
    ref, ref_dx, ref_dw = _torch_conv(x, w, padding, grad_out)
    out, vjp = jax.vjp(lambda a, b_: kernels.conv2d(a, b_, padding), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(grad_out))
    assert out.shape == ref.shape and dx.shape == x.shape and dw.shape == w.shape
    scale = lambda a: np.abs(a).max()
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-6 * scale(ref))
    np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=0, atol=2e-6 * scale(ref_dx))
    np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=0, atol=2e-6 * scale(ref_dw))


# every lab layer (Net, NetWidth, NetDepth/NetDropout/NetBatchNorm, ConvNet, SpeechNet), then edges:
# register blocks that do not divide the width, channel counts that fill part of a vector (10)
# or have no kernel (5, 7, 33: XLA's convolution takes over), padding larger than the kernel's
# reach, asymmetric padding, and a 1-wide map
LAYERS = [(4, (32, 32), 3, 16, 3, 1), (4, (16, 16), 16, 8, 3, 1), (2, (32, 32), 3, 32, 3, 1),
          (2, (16, 16), 32, 64, 3, 1), (2, (16, 16), 32, 32, 3, 1), (2, (8, 8), 32, 32, 3, 1),
          (3, (99, 26), 1, 10, 10, 0), (2, (99, 26), 1, 8, 3, 1), (2, (49, 13), 8, 16, 3, 1),
          (2, (24, 6), 16, 32, 3, 1), (2, (12, 3), 32, 64, 3, 1)]
EDGES = [(2, (8, 8), 5, 7, 3, ((2, 2), (2, 2))), (2, (9, 7), 12, 33, 2, ((0, 0), (0, 0))),
         (1, (7, 19), 10, 10, 3, ((0, 1), (2, 0))), (3, (5, 1), 16, 24, 3, ((1, 1), (1, 1))),
         (2, (6, 21), 48, 8, 5, ((2, 2), (2, 2)))]


@needs_kernels
@pytest.mark.parametrize("n, hw, c, o, k, pad", LAYERS)
def test_lab_layers_equal_torch(n, hw, c, o, k, pad):
    _check_against_torch(n, hw, c, o, k, ((pad, pad), (pad, pad)))


@needs_kernels
@pytest.mark.parametrize("n, hw, c, o, k, padding", EDGES)
def test_edge_shapes_equal_torch(n, hw, c, o, k, padding):
    _check_against_torch(n, hw, c, o, k, padding)


@needs_kernels
def test_kernels_split_work_between_threads_without_changing_the_result():
    # a batch large enough for several chunks per worker; the same sums in any split
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((37, 12, 12, 16)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 16)).astype(np.float32))
    pads = ((1, 1), (1, 1))
    whole = kernels.conv2d(x, w, pads)
    rows = jnp.concatenate([kernels.conv2d(x[i:i + 1], w, pads) for i in range(37)])
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(rows))


@needs_kernels
def test_kernels_run_under_vmap():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((3, 2, 8, 8, 8)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 8, 16)).astype(np.float32))
    pads = ((1, 1), (1, 1))
    batched = jax.vmap(lambda a, b: kernels.conv2d(a, b, pads))(x, w)
    one_by_one = jnp.stack([kernels.conv2d(x[i], w[i], pads) for i in range(3)])
    np.testing.assert_array_equal(np.asarray(batched), np.asarray(one_by_one))


@needs_kernels
def test_cpu_convolutions_with_a_kernel_take_it():
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 16))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ops.NHWC_HWIO)
    with mock.patch.object(kernels, "conv2d", wraps=kernels.conv2d) as ffi:
        ops.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
        ops.conv_general_dilated(x, w[..., :5], (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)  # 5: none
        ops.conv_general_dilated(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=dn)  # float32 only
    assert ffi.call_count == 1


def test_a_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="no-such-compiler"):
        kernels.build(tmp_path / "lib.so")
    assert not (tmp_path / "lib.so").exists()


def test_without_the_kernels_flaxcnn_warns_and_uses_xla(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FLAXCNN_CACHE_DIR", str(tmp_path))
    kernels.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="using XLA's convolutions"):
            assert kernels.available() is False
        x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 16))
        dn = lax.conv_dimension_numbers(x.shape, w.shape, ops.NHWC_HWIO)
        out = ops.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
        ref = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6)
    finally:
        kernels.available.cache_clear()


def test_the_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("FLAXCNN_FFI_CONV", "0")
    kernels.available.cache_clear()
    try:
        assert kernels.available() is False
    finally:
        kernels.available.cache_clear()


def test_the_library_is_keyed_by_source_flags_and_jax_version(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAXCNN_CACHE_DIR", str(tmp_path))
    path = kernels.library_path()
    assert path.parent == tmp_path and path.suffix == ".so"
    with mock.patch.object(kernels, "CXXFLAGS", (*kernels.CXXFLAGS, "-DOTHER")):
        assert kernels.library_path() != path


@needs_kernels
def test_the_kernel_gradient_has_the_same_bits_on_every_run():
    # threads share its batch; a fixed split into sample groups keeps the sum's order fixed
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((64, 16, 16, 16)).astype(np.float32))
    g = jnp.asarray(rng.standard_normal((64, 16, 16, 32)).astype(np.float32))
    grad = jax.jit(lambda a, b: jax.vjp(lambda w: kernels.conv2d(a, w, ((1, 1), (1, 1))),
                                        jnp.zeros((3, 3, 16, 32)))[1](b)[0])
    first = np.asarray(grad(x, g))
    for _ in range(10):
        np.testing.assert_array_equal(np.asarray(grad(x, g)), first)


def test_switched_off_inside_the_block_only():
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 16))
    with kernels.switched_off():
        assert not kernels.supports(x, w)
    assert kernels.supports(x, w) == (jax.default_backend() == "cpu" and kernels.available())


@needs_kernels
def test_the_sharded_step_is_traced_with_xla_convolutions():
    # XLA's partitioner cannot split a custom call: over a mesh it would gather the whole batch
    from jax.sharding import Mesh

    from flaxcnn.train.distributed import DATA_AXIS, Placement, ShardedEpochRunner
    seen = []

    def step(state, x, y):
        seen.append(kernels.supports(x, jnp.ones((3, 3, 3, 16))))
        return state

    placement = Placement(Mesh(np.array(jax.devices()[:1]), (DATA_AXIS,)))
    runner = ShardedEpochRunner(step, "step", placement)
    x = jnp.ones((4, 8, 8, 3))
    runner.step_fn(jnp.zeros(()), x, jnp.zeros((4,), jnp.int32), np.arange(2, dtype=np.int32))
    assert seen == [False]
    assert kernels.supports(x, jnp.ones((3, 3, 3, 16)))  # outside the sharded step: on again


@needs_kernels
def test_max_pool_follows_torch_on_nans():
    # PyTorch's CPU max-pool takes a NaN as the window's maximum (the last NaN of the window)
    x = np.arange(2 * 6 * 6 * 3, dtype=np.float32).reshape(2, 6, 6, 3) % 7
    x[0, 0, 1, 0] = x[0, 1, 0, 0] = np.nan
    x[1, 4, 4, 2] = np.nan
    g = np.random.default_rng(8).standard_normal((2, 3, 3, 3)).astype(np.float32)
    y, vjp = jax.vjp(lambda a: kernels.max_pool(a, 2), jnp.asarray(x))
    t = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    out = torch.nn.functional.max_pool2d(t, 2)
    (out * torch.tensor(g.transpose(0, 3, 1, 2))).sum().backward()
    np.testing.assert_array_equal(np.asarray(y), out.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), t.grad.numpy().transpose(0, 2, 3, 1))


@needs_kernels
def test_pools_go_to_the_cpp_kernel_when_large_or_cropped():
    with mock.patch.object(kernels, "max_pool", wraps=kernels.max_pool) as cpp:
        ops.max_pool(jnp.ones((2, 8, 8, 3)), 2)  # 2x2, no crop: XLA's fused taps
        ops.max_pool(jnp.ones((2, 9, 8, 3)), 2)  # cropped row
        ops.max_pool(jnp.ones((2, 8, 8, 3)), 4)  # 4x4
    assert cpp.call_count == 2


def test_the_library_is_keyed_by_the_cpu(tmp_path, monkeypatch):
    # -march=native: a build for one CPU must not be loaded on another from a shared cache
    monkeypatch.setenv("FLAXCNN_CACHE_DIR", str(tmp_path))
    path = kernels.library_path()
    with mock.patch.object(kernels, "cpu_identity", return_value="another cpu"):
        assert kernels.library_path() != path


@needs_kernels
def test_an_empty_batch_gives_an_empty_output_and_a_zero_kernel_gradient():
    x, w = jnp.ones((0, 8, 8, 16)), jnp.ones((3, 3, 16, 8))
    out, vjp = jax.vjp(lambda a: kernels.conv2d(x, a, ((1, 1), (1, 1))), w)
    assert out.shape == (0, 8, 8, 8)
    np.testing.assert_array_equal(np.asarray(vjp(out)[0]), np.zeros(w.shape, np.float32))
