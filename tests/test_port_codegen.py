"""flaxcnn.port code generation: small torch models ported, exec'd and compared with torch
(float32 and float64), and the shape of the generated source (classes, arguments, variants)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.port_check import assert_ports, example
from tests.port_zoo import BasicBlock  # the zoo's ResNet block, ported here at toy widths


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 4))
        self.layer2 = nn.Sequential(BasicBlock(4, 8, 2), BasicBlock(8, 8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


def _trained_stats(model: nn.Module, shape) -> nn.Module:
    """Non-trivial BatchNorm statistics, so eval mode is not the identity."""
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(torch.from_numpy(example(shape, seed + 10)))
    return model.eval()


def test_residual_blocks_with_projection_shortcut_and_variants():
    torch.manual_seed(0)
    model = _trained_stats(TinyResNet(), (4, 3, 8, 8))
    result = assert_ports(model, example((2, 3, 8, 8)))
    src = result.source
    # one block class used three times (4 and 8 channels: an argument), one variant with the downsample
    assert src.count("class BasicBlock(nnx.Module)") == 1 and src.count("class BasicBlock2(nnx.Module)") == 1
    assert "BasicBlock(4, dtype=dtype, rngs=rngs)" in src and "BasicBlock(8, dtype=dtype, rngs=rngs)" in src
    # named after the torch __init__ parameter passed to the layers (read from its source)
    assert "def __init__(self, in_planes, dtype=jnp.float32, *, rngs: nnx.Rngs):" in src
    assert "self.downsample = nnx.Sequential(" in src
    assert "x = self.stem(x)" in src  # a Sequential called as a chain is one call
    assert "input_chw = (3, 8, 8)" in src and 'loss = "cross_entropy"' in src


class Stage(nn.Module):
    """One class, instances differ only in widths: lifted into named arguments."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cin, self.cout = cin, cout
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class TwoStages(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Stage(3, 6)
        self.b = Stage(6, 5)

    def forward(self, x):
        return self.b(self.a(x))


def test_class_used_twice_with_different_channels_is_one_class_with_arguments():
    torch.manual_seed(1)
    model = _trained_stats(TwoStages(), (4, 3, 6, 6))
    result = assert_ports(model, example((2, 3, 6, 6)))
    src = result.source
    assert src.count("class Stage") == 1
    assert "def __init__(self, cin, cout, dtype=jnp.float32, *, rngs: nnx.Rngs):" in src
    assert "self.a = Stage(3, 6, dtype=dtype, rngs=rngs)" in src and "self.b = Stage(6, 5, dtype=dtype" in src
    assert "N.BatchNorm2d(cout, dtype=dtype)" in src
    assert "return N.nhwc_to_nchw(" in src  # a 4-D output comes back NCHW


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 2):
        super().__init__()
        self.fc1 = nn.Linear(c, c // r)
        self.fc2 = nn.Linear(c // r, c)

    def forward(self, x):
        b, c, _, _ = x.size()
        s = x.mean((2, 3))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        gate = x * s.view(b, c, 1, 1)
        return gate + 0.5 * x * s[:, :, None, None] - x.mean(dim=1, keepdim=True)


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.se = SqueezeExcite(8)
        self.head = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        x = self.se(self.conv(x))
        return self.head(x.view(x.size(0), -1))


def test_squeeze_excite_mean_sigmoid_broadcast_mul_and_flatten_linear():
    torch.manual_seed(2)
    result = assert_ports(SENet().eval(), example((3, 3, 6, 6)))
    assert "jnp.mean(x, axis=(1, 2))" in result.source


class ShuffleUnit(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c // 2, c // 2, 1), nn.BatchNorm2d(c // 2), nn.ReLU(),
                                    nn.Conv2d(c // 2, c // 2, 3, padding=1, groups=c // 2))

    @staticmethod
    def shuffle(x, groups: int):
        b, c, h, w = x.size()
        x = x.view(b, groups, c // groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(b, -1, h, w)

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, self.branch(x2)), dim=1)
        out = self.shuffle(out, 2)
        left, right = torch.split(out, [2, 6], dim=1)
        return torch.cat([right, left], 1).permute(0, 1, 3, 2)


def test_channel_split_and_shuffle():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), ShuffleUnit(8))
    model = _trained_stats(model, (4, 3, 5, 7))
    assert_ports(model, example((2, 3, 5, 7)))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        y = F.max_pool2d(x, 2, ceil_mode=True)
        y = F.interpolate(y, scale_factor=2, mode="nearest")[:, :, :x.shape[2], : x.size(3)]
        z = torch.tanh(x) + F.silu(y) * torch.sigmoid(x) - F.leaky_relu(x, 0.1) / 2
        z = F.avg_pool2d(z, 2) + F.adaptive_max_pool2d(z, (3, 3)) + F.avg_pool2d(z, z.size()[2:])
        z = torch.softmax(z, dim=1)[:, 1:5] + z[:, 2:, 1:2, :].sum(dim=2, keepdim=True)
        return z.transpose(2, 3).flatten(2), F.log_softmax(z.mean((2, 3)), dim=1)


def test_functional_forms_slicing_and_two_outputs():
    torch.manual_seed(4)
    result = assert_ports(Functional().eval(), example((2, 3, 6, 6)))
    assert "N.interpolate(" in result.source and "self.max_pool_fn0 = N.MaxPool2d(2, ceil_mode=True)" in result.source


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 3, 3, padding=1) for _ in range(2)])
        self.heads = nn.ModuleDict({"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)})
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x)) + x
        f = self.flat(self.pool(x))
        return self.heads["a"](f) - self.heads["b"](f)


def test_module_list_and_dict():
    torch.manual_seed(5)
    result = assert_ports(Heads().eval(), example((2, 3, 5, 5)))
    assert "nnx.List([" in result.source and "nnx.Dict({" in result.source
    assert "self.convs[1](" in result.source and "self.heads['a'](" in result.source


class DropBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return F.dropout(self.conv(x), 0.5, self.training)


class StochasticDepth(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = 1.0 - self.p
        noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
        noise = noise.bernoulli_(keep)
        noise.div_(keep)
        return x * noise


class FullDraw(nn.Module):
    """Stochastic depth drawn as torch.bernoulli(torch.full(...)), in training mode only."""

    def forward(self, x):
        if self.training:
            keep = torch.bernoulli(torch.full((x.size(0), 1, 1, 1), 0.5, dtype=x.dtype))
            x = x * keep / 0.5
        return x


class Modes(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = DropBlock(3)
        self.sd = StochasticDepth(0.25)
        self.full = FullDraw()
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        x = self.full(self.sd(self.block(x))) + x
        return self.fc(x.reshape(x.shape[0], -1))


def test_train_eval_difference_becomes_deterministic_branch():
    torch.manual_seed(6)
    model = Modes().eval()
    x = example((4, 3, 4, 4))
    result = assert_ports(model, x)
    src = result.source
    assert src.count("if self.deterministic:") == 3 and src.count("self.deterministic = False") == 3
    assert "self.dropout_fn0(" in src and src.count("self.bernoulli_fn0 = N.Bernoulli(rngs=rngs)") == 2
    flax = result.module
    flax.train()
    train_out = np.asarray(flax(x))
    flax.eval()
    assert not np.allclose(train_out, np.asarray(flax(x)))  # masks drawn in training mode


class FullyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.norm = nn.GroupNorm(2, 2)

    def forward(self, x):
        return self.norm(self.up(F.relu(self.down(x))))


def test_four_d_output_is_nchw():
    torch.manual_seed(7)
    result = assert_ports(FullyConv().eval(), example((2, 3, 8, 8)))
    assert 'loss = "mse"' in result.source
    assert result.module(example((2, 3, 8, 8))).shape == (2, 2, 8, 8)


def test_class_name_and_port_out_dir(tmp_path):
    from flaxcnn.port import load, port

    torch.manual_seed(8)
    model = _trained_stats(TwoStages(), (4, 3, 6, 6))
    x = example((2, 3, 6, 6))
    result = port(model, x, out_dir=tmp_path / "out", class_name="Ported", prove=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.py", "parity.json", "weights.npz"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    assert "class Ported(nnx.Module):" in result.source
    loaded = load(tmp_path / "out")
    loaded.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(loaded(x)), ref, atol=1e-5)


@pytest.mark.parametrize("bad", ["conv", "out"])
def test_unknown_class_name_is_refused(bad):
    from flaxcnn.errors import ConfigError
    from flaxcnn.port import port

    with pytest.raises(ConfigError, match="identifier"):
        port(TwoStages(), example((2, 3, 6, 6)), class_name=f"{bad}-x", prove=False)


def test_port_with_proof_replays_every_draw():
    pytest.importorskip("flaxcnn.port.proof")
    from flaxcnn.port import port

    torch.manual_seed(9)
    result = port(Modes(), example((4, 3, 4, 4)))
    assert result.proof is not None and result.proof.passed, result.proof.format()
