"""The C++ CPU kernels (flaxcnn/kernels), every ISA variant this CPU runs, against PyTorch in
float64; their build, variants and switches."""

import platform
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxcnn import kernels
from flaxcnn.models import ops
from flaxcnn.models.conv_policy import DEFAULT, ConvLayer


def _runnable_variants():
    return [isa for isa in kernels.runnable_isas() if kernels.available(isa)]


VARIANTS = _runnable_variants() if jax.default_backend() == "cpu" else []
needs_kernels = pytest.mark.skipif(not VARIANTS, reason="the C++ kernels run on the CPU backend and need a C++ compiler")


@pytest.fixture(params=VARIANTS or [None])
def isa(request):
    """Each kernel test runs on every variant this CPU can run (avx512, avx2, generic)."""
    if request.param is None:
        pytest.skip("the C++ kernels run on the CPU backend and need a C++ compiler")
    return request.param


def _layer(n, hw, c, o, k, padding, isa):
    return ConvLayer(n, hw[0], hw[1], (k, k, c, o), padding, None, isa)


def _torch_conv(x, w, padding, grad_out):
    """PyTorch's conv2d of an NHWC batch with an HWIO kernel: output, input and kernel gradients."""
    (t, b), (l, r) = padding
    tx = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
    tw = torch.tensor(w.transpose(3, 2, 0, 1), dtype=torch.float64, requires_grad=True)
    out = torch.nn.functional.conv2d(torch.nn.functional.pad(tx, (l, r, t, b)), tw)
    (out * torch.tensor(grad_out.transpose(0, 3, 1, 2), dtype=torch.float64)).sum().backward()
    return (out.detach().numpy().transpose(0, 2, 3, 1), tx.grad.numpy().transpose(0, 2, 3, 1),
            tw.grad.numpy().transpose(2, 3, 1, 0))


def _check_against_torch(n, hw, c, o, k, padding, isa):
    rng = np.random.default_rng(c * 100 + o)
    x = rng.standard_normal((n, *hw, c)).astype(np.float32)
    w = (rng.standard_normal((k, k, c, o)) / (k * np.sqrt(c))).astype(np.float32)
    layer = _layer(n, hw, c, o, k, padding, isa)
    grad_out = rng.standard_normal((n, *layer.out_hw, o)).astype(np.float32)
    ref, ref_dx, ref_dw = _torch_conv(x, w, padding, grad_out)
    scale = lambda a: np.abs(a).max()
    supported = kernels.supports_conv(c, o, jnp.float32)
    if supported["forward"]:
        out = ops.forward_cpp(jnp.asarray(x), jnp.asarray(w), layer)
        assert out.shape == ref.shape
        np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-6 * scale(ref))
    if supported["kernel_grad"]:
        dw = ops.kernel_grad_cpp(jnp.asarray(x), jnp.asarray(grad_out), layer)
        assert dw.shape == w.shape
        np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=0, atol=2e-6 * scale(ref_dw))
    if supported["input_grad"]:
        dx = ops.input_grad_cpp(jnp.asarray(grad_out), jnp.asarray(w), layer)
        assert dx.shape == x.shape
        np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=0, atol=2e-6 * scale(ref_dx))
    return supported


# every lab layer (Net, NetWidth, NetDepth/NetDropout/NetBatchNorm, ConvNet, SpeechNet), then edges:
# register blocks that do not divide the width, channel counts that fill part of a vector (10),
# channel counts cut into several register blocks (48, 64 on AVX2 and SSE/NEON), padding larger
# than the kernel's reach, asymmetric padding, and a 1-wide map
LAYERS = [(4, (32, 32), 3, 16, 3, 1), (4, (16, 16), 16, 8, 3, 1), (2, (32, 32), 3, 32, 3, 1),
          (2, (16, 16), 32, 64, 3, 1), (2, (16, 16), 32, 32, 3, 1), (2, (8, 8), 32, 32, 3, 1),
          (3, (99, 26), 1, 10, 10, 0), (2, (99, 26), 1, 8, 3, 1), (2, (49, 13), 8, 16, 3, 1),
          (2, (24, 6), 16, 32, 3, 1), (2, (12, 3), 32, 64, 3, 1)]
EDGES = [(2, (8, 8), 8, 10, 3, ((2, 2), (2, 2))), (2, (9, 7), 24, 48, 2, ((0, 0), (0, 0))),
         # one input channel, 10 outputs (the partial vector by positions): rows narrower than a
         # vector, a partial last vector, and more positions than one block
         (2, (5, 5), 1, 10, 3, ((0, 0), (0, 0))), (2, (6, 21), 1, 10, 3, ((1, 1), (1, 1))),
         (1, (6, 70), 1, 10, 5, ((0, 0), (2, 2))),
         (1, (7, 19), 10, 10, 3, ((0, 1), (2, 0))), (3, (5, 1), 16, 24, 3, ((1, 1), (1, 1))),
         (2, (6, 21), 48, 8, 5, ((2, 2), (2, 2))), (2, (5, 33), 64, 48, 3, ((1, 1), (1, 1)))]


@pytest.mark.parametrize("n, hw, c, o, k, pad", LAYERS)
def test_lab_layers_equal_torch(n, hw, c, o, k, pad, isa):
    supported = _check_against_torch(n, hw, c, o, k, ((pad, pad), (pad, pad)), isa)
    assert supported["forward"] and supported["kernel_grad"]


@pytest.mark.parametrize("n, hw, c, o, k, padding", EDGES)
def test_edge_shapes_equal_torch(n, hw, c, o, k, padding, isa):
    _check_against_torch(n, hw, c, o, k, padding, isa)


@pytest.mark.skipif(len(VARIANTS) < 2, reason="needs two kernel variants this CPU runs")
@pytest.mark.parametrize("n, hw, c, o, k, pad", [(3, (99, 26), 1, 10, 10, 0), (2, (6, 21), 1, 10, 3, 1)])
def test_every_variant_gives_the_forward_the_same_bits(n, hw, c, o, k, pad):
    """Each output is the same sum in the same order whatever the vector width and whichever of a
    channel's lanes or a position's lanes hold it (FMA variants; ``generic`` has no FMA)."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((n, *hw, c)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, c, o)).astype(np.float32))
    fused = [isa for isa in VARIANTS if isa != "generic"]
    if len(fused) < 2:
        pytest.skip("needs two FMA kernel variants (avx512, avx2) this CPU runs")
    outs = [np.asarray(ops.forward_cpp(x, w, _layer(n, hw, c, o, k, ((pad, pad), (pad, pad)), isa))) for isa in fused]
    assert all(np.array_equal(outs[0], other) for other in outs[1:])


def test_the_kernel_parts_run_where_their_channel_count_has_a_kernel():
    assert kernels.supports_conv(3, 16, jnp.float32) == {"forward": True, "kernel_grad": True, "input_grad": False}
    assert kernels.supports_conv(16, 7, jnp.float32) == {"forward": False, "kernel_grad": False, "input_grad": True}
    assert not any(kernels.supports_conv(16, 16, jnp.bfloat16).values())


def test_kernels_split_work_between_threads_without_changing_the_result(isa):
    # a batch large enough for several chunks per worker; the same sums in any split
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((37, 12, 12, 16)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 16)).astype(np.float32))
    layer = _layer(37, (12, 12), 16, 16, 3, ((1, 1), (1, 1)), isa)
    whole = ops.forward_cpp(x, w, layer)
    rows = jnp.concatenate([ops.forward_cpp(x[i:i + 1], w, layer) for i in range(37)])
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(rows))


def test_the_kernel_gradient_has_the_same_bits_on_every_run(isa):
    # threads share its batch; a fixed split into sample groups keeps the sum's order fixed
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((64, 16, 16, 16)).astype(np.float32))
    g = jnp.asarray(rng.standard_normal((64, 16, 16, 32)).astype(np.float32))
    layer = _layer(64, (16, 16), 16, 32, 3, ((1, 1), (1, 1)), isa)
    grad = jax.jit(lambda a, b: ops.kernel_grad_cpp(a, b, layer))
    first = np.asarray(grad(x, g))
    for _ in range(10):
        np.testing.assert_array_equal(np.asarray(grad(x, g)), first)


def test_kernels_work_under_vmap(isa):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((3, 2, 8, 8, 16)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 16, 8)).astype(np.float32))
    layer = _layer(2, (8, 8), 16, 8, 3, ((1, 1), (1, 1)), isa)
    batched = jax.vmap(lambda a, b: ops.forward_cpp(a, b, layer))(x, w)
    one_by_one = jnp.stack([ops.forward_cpp(x[i], w[i], layer) for i in range(3)])
    np.testing.assert_array_equal(np.asarray(batched), np.asarray(one_by_one))


def test_an_empty_batch_gives_an_empty_output_and_a_zero_kernel_gradient(isa):
    layer = _layer(0, (8, 8), 16, 8, 3, ((1, 1), (1, 1)), isa)
    out = ops.forward_cpp(jnp.ones((0, 8, 8, 16)), jnp.ones((3, 3, 16, 8)), layer)
    assert out.shape == (0, 8, 8, 8)
    dw = ops.kernel_grad_cpp(jnp.ones((0, 8, 8, 16)), out, layer)
    np.testing.assert_array_equal(np.asarray(dw), np.zeros((3, 3, 16, 8), np.float32))


def test_max_pool_follows_torch_on_nans(isa):
    # PyTorch's CPU max-pool takes a NaN as the window's maximum (the last NaN of the window)
    x = np.arange(2 * 6 * 6 * 3, dtype=np.float32).reshape(2, 6, 6, 3) % 7
    x[0, 0, 1, 0] = x[0, 1, 0, 0] = np.nan
    x[1, 4, 4, 2] = np.nan
    g = np.random.default_rng(8).standard_normal((2, 3, 3, 3)).astype(np.float32)
    y, first = kernels.max_pool_forward(jnp.asarray(x), 2, isa)
    dx = kernels.max_pool_backward(first, jnp.asarray(g), 2, x.shape, isa)
    t = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    out = torch.nn.functional.max_pool2d(t, 2)
    (out * torch.tensor(g.transpose(0, 3, 1, 2))).sum().backward()
    np.testing.assert_array_equal(np.asarray(y), out.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(dx), t.grad.numpy().transpose(0, 2, 3, 1))


def test_every_variant_builds_even_one_this_cpu_cannot_run(tmp_path):
    # -march=skylake-avx512 / haswell compile on any x86 machine: the code of each variant stays
    # compilable whatever CPU the tests run on (where it cannot run, it is not loaded)
    if kernels.compiler() is None:
        pytest.skip("no C++ compiler")
    wanted = [isa for isa in ("avx512", "avx2") if isa not in kernels.runnable_isas()]
    if not wanted or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("this CPU runs every x86 variant (they are built and checked above), or it is not x86")
    for isa in wanted:
        kernels.build_only(isa, tmp_path / f"{isa}.so")
        assert (tmp_path / f"{isa}.so").stat().st_size > 0


def test_the_variant_can_be_forced_and_a_wrong_one_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FLAXCNN_KERNEL_ISA", "generic")
    assert kernels.selected_isa() == "generic"
    monkeypatch.setenv("FLAXCNN_KERNEL_ISA", "sse9")
    with pytest.raises(kernels.KernelConfigError, match="accepted: auto, avx512, avx2, generic"):
        kernels.selected_isa()
    monkeypatch.setenv("FLAXCNN_KERNEL_ISA", "avx512")
    with mock.patch.object(kernels, "cpu_flags", return_value=frozenset({"avx2", "fma"})):
        with pytest.raises(kernels.KernelConfigError, match="cannot run that variant"):
            kernels.selected_isa()
    monkeypatch.delenv("FLAXCNN_KERNEL_ISA")
    with mock.patch.object(kernels, "cpu_flags", return_value=frozenset({"avx2", "fma"})), \
            mock.patch.object(kernels, "_x86", return_value=True):
        assert kernels.runnable_isas() == ("avx2", "generic")  # an AVX2 EPYC
        assert kernels.target_flags("avx512") == ("-march=skylake-avx512",)  # built, not run


def test_a_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="no-such-compiler"):
        kernels.build(tmp_path / "lib.so", "generic")
    assert not (tmp_path / "lib.so").exists()


def test_without_a_compiler_flaxcnn_warns_and_uses_xla(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FLAXCNN_CACHE_DIR", str(tmp_path))
    kernels.load.cache_clear()  # a cache of built libraries: this test wants an empty one
    try:
        with pytest.warns(RuntimeWarning, match="using XLA's convolutions"):
            assert kernels.available() is False
        assert DEFAULT.kernel_isa() is None
        x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 16))
        dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ops.NHWC_HWIO)
        out = ops.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
        ref = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6)
        layer = ConvLayer(2, 8, 8, (3, 3, 3, 16), ((1, 1), (1, 1)), None, DEFAULT.kernel_isa())
        assert DEFAULT.choose(layer, "forward", ops.FORWARD) == "xla"
    finally:
        kernels.load.cache_clear()


def test_each_library_is_keyed_by_variant_source_flags_jax_version_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAXCNN_CACHE_DIR", str(tmp_path))
    path = kernels.library_path("generic")
    assert path.parent == tmp_path and path.suffix == ".so" and "generic" in path.name
    assert kernels.library_path("avx2") != path
    with mock.patch.object(kernels, "CXXFLAGS", (*kernels.CXXFLAGS, "-DOTHER")):
        assert kernels.library_path("generic") != path
    with mock.patch.object(kernels, "cpu_identity", return_value="another cpu"):
        assert kernels.library_path("generic") != path
