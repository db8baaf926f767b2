"""The conv policy: a rule, explicit and immutable; policy files; what a run records; tune."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from flaxcnn import kernels
from flaxcnn.errors import ConfigError
from flaxcnn.models import conv_policy, ops
from flaxcnn.models.conv_policy import DEFAULT, XLA_ONLY, ConvLayer, ConvPolicy, DepthwiseLayer, PoolLayer
from flaxcnn.models.registry import get_model

on_cpu_with_kernels = pytest.mark.skipif(jax.default_backend() != "cpu" or not kernels.available(),
                                         reason="the C++ kernels run on the CPU backend and need a C++ compiler")


def _layer(c: int, o: int, isa) -> ConvLayer:
    return ConvLayer(64, 8, 8, (3, 3, c, o), ((1, 1), (1, 1)), None, isa)


def test_the_rule_is_kernels_where_they_apply_and_xla_elsewhere():
    with_kernels = _layer(16, 8, "avx2")
    assert [DEFAULT.choose(with_kernels, part, ops.PARTS[part]) for part in conv_policy.CONV_PARTS] == ["cpp"] * 3
    odd = _layer(3, 5, "avx2")  # no kernel for 5 output channels, nor for 3 input channels
    assert [DEFAULT.choose(odd, part, ops.PARTS[part]) for part in conv_policy.CONV_PARTS] == ["xla"] * 3
    assert DEFAULT.choose(_layer(16, 8, None), "forward", ops.FORWARD) == "xla"  # kernels not used
    assert DEFAULT.choose(PoolLayer(64, 8, 8, 16, 2, None), "pool", ops.POOLS) == "taps"  # no kernels
    assert DEFAULT.choose(PoolLayer(64, 8, 8, 16, 2, "avx2"), "pool", ops.POOLS) == "taps"  # windows tile 8x8
    assert DEFAULT.choose(PoolLayer(64, 9, 8, 16, 2, "avx2"), "pool", ops.POOLS) == "cpp"  # a cropped row


def test_a_map_smaller_than_the_kernel_runs_forward_and_input_grad_as_one_matmul():
    small = ConvLayer(64, 2, 2, (3, 3, 512, 512), ((1, 1), (1, 1)), None, "avx2")  # VGG-11's last convolutions
    assert [DEFAULT.choose(small, part, ops.PARTS[part]) for part in conv_policy.CONV_PARTS] == ["banded", "xla", "banded"]
    assert DEFAULT.choose(ConvLayer(64, 4, 4, (3, 3, 512, 512), ((1, 1), (1, 1)), None, "avx2"), "forward",
                          ops.FORWARD) == "xla"
    with_kernel = ConvLayer(64, 2, 2, (3, 3, 16, 16), ((1, 1), (1, 1)), None, "avx2")
    assert DEFAULT.choose(with_kernel, "forward", ops.FORWARD) == "cpp"  # a kernel still wins


def _depthwise(multiplier=1, kernel=(3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1)):
    return DepthwiseLayer(2, 9, 8, 6, multiplier, kernel, strides, padding, dilation, None)


def test_depthwise_convolutions_run_per_tap_and_an_override_can_send_them_to_xla():
    layer = _depthwise()
    assert DEFAULT.choose(layer, "depthwise", ops.DEPTHWISE) == "taps"
    assert XLA_ONLY.choose(layer, "depthwise", ops.DEPTHWISE) == "taps"  # an XLA program, no C++ kernel
    assert layer.key() == "depthwise 6x1 3x3 stride 1,1 dilation 1,1 pad 1,1,1,1 on 9x8"
    to_xla = ConvPolicy(overrides=((layer.key(), "depthwise", "xla"),), source="t.json")
    assert to_xla.choose(layer, "depthwise", ops.DEPTHWISE) == "xla"
    with pytest.raises(ConfigError, match="'cpp' cannot run depthwise"):
        ConvPolicy(overrides=((layer.key(), "depthwise", "cpp"),), source="t.json").choose(layer, "depthwise",
                                                                                           ops.DEPTHWISE)


@pytest.mark.parametrize("layer", [
    _depthwise(), _depthwise(strides=(2, 2)), _depthwise(kernel=(5, 5), padding=((2, 2), (2, 2)), strides=(2, 1)),
    _depthwise(multiplier=2), _depthwise(dilation=(2, 2), padding=((2, 2), (2, 2))),
    _depthwise(padding=((0, 1), (1, 0)))], ids=lambda layer: layer.key())
def test_depthwise_taps_compute_xla_s_grouped_convolution_forward_and_backward(layer):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((layer.n, layer.h, layer.w, layer.c)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(layer.kernel_shape), jnp.float32)
    outs = {}
    for name, impl in ops.DEPTHWISE.items():
        y, pullback = jax.vjp(lambda x, w: impl(x, w, layer), x, w)
        outs[name] = (y, *pullback(jnp.cos(y)))  # a cotangent that varies over the output
    assert outs["taps"][0].shape == (layer.n, *layer.out_hw, layer.c * layer.multiplier)
    for got, want in zip(outs["taps"], outs["xla"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the model-level path: a grouped nnx.Conv through ops.Convolution lowers to no convolution on CPU
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ops.NHWC_HWIO)
    conv = jax.jit(lambda x, w: ops.conv_general_dilated(x, w, layer.strides, layer.padding, rhs_dilation=layer.dilation,
                                                         dimension_numbers=dn, feature_group_count=layer.c))
    np.testing.assert_allclose(conv(x, w), outs["xla"][0], rtol=1e-5, atol=1e-5)
    if jax.default_backend() == "cpu":
        assert not re.search(r" convolution\(", conv.lower(x, w).compile().as_text())


def test_the_banded_input_gradient_is_xla_s():
    rng = np.random.default_rng(1)
    for padding in (((1, 1), (1, 1)), ((0, 2), (2, 0)), ((3, 3), (0, 0))):  # the last crops the gradient's pad
        layer = ConvLayer(3, 2, 3, (3, 3, 5, 7), padding, lax.Precision.HIGHEST, None)
        w = jnp.asarray(rng.standard_normal(layer.kernel_shape), jnp.float32)
        g = jnp.asarray(rng.standard_normal((3, *layer.out_hw, 7)), jnp.float32)
        np.testing.assert_allclose(ops.input_grad_banded(g, w, layer), ops.input_grad_xla(g, w, layer),
                                   rtol=1e-5, atol=1e-5)


def test_an_override_replaces_the_rule_for_its_shape_and_part_only():
    layer = _layer(16, 8, "avx2")
    policy = ConvPolicy(overrides=((layer.key(), "kernel_grad", "rows"),), source="t.json")
    assert policy.choose(layer, "kernel_grad", ops.KERNEL_GRAD) == "rows"
    assert policy.choose(layer, "forward", ops.FORWARD) == "cpp"
    assert policy.choose(_layer(16, 16, "avx2"), "kernel_grad", ops.KERNEL_GRAD) == "cpp"
    wrong = ConvPolicy(overrides=((layer.key(), "forward", "fastest"),), source="t.json")
    with pytest.raises(ConfigError, match="'fastest' cannot run forward of conv 16->8"):
        wrong.choose(layer, "forward", ops.FORWARD)


def test_a_policy_is_immutable_and_hashable():
    with pytest.raises(AttributeError):
        DEFAULT.kernels = False  # type: ignore[misc]
    assert hash(DEFAULT) == hash(ConvPolicy()) and DEFAULT != XLA_ONLY


@on_cpu_with_kernels
def test_a_model_traces_what_its_policy_says_and_nothing_else_decides():
    text = {}
    for name in ("net", "speechnet"):  # 2x2 pools tiling 32x32 and 16x16; SpeechNet's crop 99x26
        spec = get_model(name)
        for label, policy in (("default", DEFAULT), ("xla", XLA_ONLY)):
            model = spec.build(conv_policy=policy)
            graph, state = nnx.split(model)
            x = jnp.zeros((4, *spec.input_chw))
            text[name, label] = jax.jit(lambda s, x: nnx.merge(graph, s)(x)).lower(state, x).as_text()
    assert "flaxcnn_conv_forward" in text["net", "default"] and "flaxcnn_max_pool" not in text["net", "default"]
    assert "flaxcnn_max_pool_forward" in text["speechnet", "default"]
    assert "flaxcnn_" not in text["net", "xla"] and "flaxcnn_" not in text["speechnet", "xla"]
    assert conv_policy.of(spec.build(conv_policy=XLA_ONLY)) == XLA_ONLY


@on_cpu_with_kernels
def test_explain_names_each_layer_part_of_a_training_step():
    layers = conv_policy.explain(get_model("net").build(), (64, 3, 32, 32))
    assert [entry["layer"] for entry in layers] == [
        "conv 3->16 3x3 pad 1,1,1,1 on 32x32", "max_pool 2x2 on 32x32x16",
        "conv 16->8 3x3 pad 1,1,1,1 on 16x16", "max_pool 2x2 on 16x16x8"]
    assert layers[2] == {"layer": layers[2]["layer"], "forward": "cpp", "kernel_grad": "cpp", "input_grad": "cpp"}
    assert all(v == "xla" or v == "taps" for e in conv_policy.explain(get_model("net").build(), (8, 3, 32, 32),
                                                                      XLA_ONLY) for k, v in e.items() if k != "layer")


def test_float64_and_strided_convolutions_are_xla_s_own():
    x64 = jnp.ones((2, 8, 8, 3), jnp.float32)
    w = jnp.ones((3, 3, 3, 16), jnp.float32)
    dn = lax.conv_dimension_numbers(x64.shape, w.shape, ops.NHWC_HWIO)
    strided = jax.jit(lambda a, b: ops.conv_general_dilated(a, b, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn))
    assert "flaxcnn_" not in strided.lower(x64, w).as_text()
    with jax.enable_x64(True):
        a, b = jnp.ones((2, 8, 8, 3), jnp.float64), jnp.ones((3, 3, 3, 16), jnp.float64)
        text = jax.jit(lambda a, b: ops.conv_general_dilated(a, b, (1, 1), ((1, 1), (1, 1)),
                                                             dimension_numbers=dn)).lower(a, b).as_text()
    assert "flaxcnn_" not in text and "f64" in text


def test_policy_files_round_trip_and_bad_ones_are_refused(tmp_path):
    layer = _layer(16, 8, None)
    policy = ConvPolicy(overrides=((layer.key(), "forward", "banded"),), source="x")
    path = conv_policy.save(policy, tmp_path / "p.json", measured="now")
    loaded = conv_policy.from_setting(path)
    assert loaded.overrides == policy.overrides and loaded.source == str(path)
    assert conv_policy.from_setting("default") == DEFAULT and conv_policy.from_setting("xla") == XLA_ONLY
    with pytest.raises(ConfigError, match="cannot be read.*accepted: default, xla"):
        conv_policy.from_setting(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ConfigError, match="not a flaxcnn conv policy"):
        conv_policy.load(tmp_path / "other.json")
    body = json.loads(path.read_text())
    body["kernel_isa"] = "an-isa-no-cpu-runs"
    (tmp_path / "foreign.json").write_text(json.dumps(body))
    with pytest.raises(ConfigError, match="tuned for the an-isa-no-cpu-runs kernels"):
        conv_policy.load(tmp_path / "foreign.json")
    body = json.loads(path.read_text())
    body["overrides"][0]["part"] = "backward"
    (tmp_path / "part.json").write_text(json.dumps(body))
    with pytest.raises(ConfigError, match="part 'backward'; accepted: forward"):
        conv_policy.load(tmp_path / "part.json")


def test_the_sharded_step_is_traced_with_xla_convolutions():
    # XLA's partitioner cannot split a custom call: over a mesh it would gather the whole batch
    from flaxcnn.train import distributed

    assert distributed.conv_policy_for(None, DEFAULT) == DEFAULT or jax.device_count() > 1
    policy = distributed.conv_policy_for(jax.device_count() + 1, DEFAULT) if jax.device_count() > 1 else XLA_ONLY
    assert policy == XLA_ONLY


@on_cpu_with_kernels
def test_tune_measures_every_part_and_writes_a_policy_the_engine_reads(tmp_path):
    from flaxcnn import tune

    model = get_model("net").build()
    result = tune.tune({"net": (model, (8, 3, 32, 32))}, tmp_path / "policy.json", say=lambda _: None)
    written = json.loads((tmp_path / "policy.json").read_text())
    assert written["format"] == conv_policy.FILE_FORMAT and written["models"] == ["net"]
    parts = {(p["layer"], p["part"]) for p in written["parts"]}
    assert ("conv 16->8 3x3 pad 1,1,1,1 on 16x16", "kernel_grad") in parts and len(parts) == 10
    assert all("cpp" in p["ms"] and "xla" in p["ms"] for p in written["parts"] if p["part"] == "forward")
    loaded = conv_policy.load(tmp_path / "policy.json")
    assert loaded.overrides == result["policy"].overrides
    if loaded.overrides:
        assert set(written["step_ms"]["net"]) == {"default", "tuned"}
    out = np.asarray(conv_policy.apply(get_model("net").build(), loaded)(jnp.ones((2, 3, 32, 32))))
    ref = np.asarray(get_model("net").build()(jnp.ones((2, 3, 32, 32))))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_a_depthwise_convolution_exported_for_cuda_is_xla_s_grouped_convolution():
    from jax import export

    layer = _depthwise(strides=(2, 2))
    x = jnp.ones((layer.n, layer.h, layer.w, layer.c), jnp.float32)
    w = jnp.ones(layer.kernel_shape, jnp.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ops.NHWC_HWIO)

    def train_pass(x, w):
        y, pullback = jax.vjp(lambda x, w: ops.conv_general_dilated(x, w, layer.strides, layer.padding,
                                                                     dimension_numbers=dn,
                                                                     feature_group_count=layer.c), x, w)
        return y, pullback(y)

    texts = {p: export.export(jax.jit(train_pass), platforms=[p])(x, w).mlir_module() for p in ("cuda", "cpu")}
    assert "stablehlo.convolution" in texts["cuda"] and f"feature_group_count = {layer.c}" in texts["cuda"]
    assert "stablehlo.convolution" not in texts["cpu"]  # the taps: slices, products and sums
