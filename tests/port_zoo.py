"""Well-known CNN architectures in plain PyTorch, written after their papers, for ``flaxcnn port``.

torchvision's and timm's model code cannot be imported next to the local CPU torch, so each
network is written here by hand, in the idioms those libraries use (custom block classes,
``nn.Sequential`` containers, ``torch.cat`` growth, ``chunk`` splits, in-forward random draws).
Every network takes a CIFAR-sized input (:data:`INPUT_CHW`) and gives :data:`NUM_CLASSES`
logits (the U-Net: a per-pixel map of :data:`SEGMENT_CLASSES` channels); stems that the papers
write for 224x224 ImageNet inputs are the usual CIFAR adaptation (a 3x3 stride-1 convolution,
no stem max-pool), said per class.

:data:`ZOO` maps a name to ``(small, full)`` factories: ``full`` is the paper's configuration,
``small`` the same classes and the same kinds of blocks (every branch the full model takes:
projection and identity shortcuts, channel splits, residual stochastic depth) at a reduced
width and depth, so that a port and its proof run in seconds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_CHW = (3, 32, 32)
NUM_CLASSES = 10
SEGMENT_CLASSES = 3


def make_divisible(value: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: the nearest multiple of ``divisor``, never below 90% of ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


# --- ResNet-18 (He et al. 2016, "Deep Residual Learning for Image Recognition") ---------------

class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut: identity, or a 1x1 conv-BN projection where the
    stride or the width changes (the paper's option B)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """ResNet-18: four stages of two basic blocks each (64-128-256-512 channels times ``width``),
    global average pool, fc. CIFAR stem: one 3x3 stride-1 conv, no max-pool."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: float = 1.0,
                 blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        planes = [max(1, int(64 * width * 2 ** i)) for i in range(4)]
        self.in_planes = planes[0]
        self.conv1 = nn.Conv2d(3, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(planes[0], blocks[0], stride=1)
        self.layer2 = self._make_layer(planes[1], blocks[1], stride=2)
        self.layer3 = self._make_layer(planes[2], blocks[2], stride=2)
        self.layer4 = self._make_layer(planes[3], blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[3] * BasicBlock.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, block_stride))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# --- VGG-11 with BatchNorm (Simonyan & Zisserman 2015, configuration "A") ---------------------

VGG11_CONFIG: tuple = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG with BatchNorm after every conv. On 32x32 inputs the five max-pools leave a 1x1 map,
    so the classifier is the paper's three fc layers with dropout at ``hidden`` units (4096 in the
    paper, sized for its 7x7x512 map; 512 is the CIFAR custom)."""

    def __init__(self, config: Sequence = VGG11_CONFIG, num_classes: int = NUM_CLASSES, width: float = 1.0,
                 hidden: int = 512, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = max(1, int(item * width))
            layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --- MobileNetV2 (Sandler et al. 2018) ---------------------------------------------------------

#: expansion t, output channels c, repeats n, first stride s (Table 2; CIFAR: the second stage at stride 1)
MOBILENETV2_SETTINGS: tuple = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                               (6, 160, 3, 2), (6, 320, 1, 1))


class ConvBNReLU6(nn.Sequential):
    """conv-BN-ReLU6, the building unit of MobileNetV2 (torchvision's ``Conv2dNormActivation``)."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped at t = 1), 3x3 depthwise conv, linear 1x1 projection; a residual
    connection where the stride is 1 and the width is kept."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2: stem conv, inverted-residual stages, a 1x1 conv to ``last_channel``, global
    average pool, dropout, fc. CIFAR stem: stride 1 (and the second stage at stride 1)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width_mult: float = 1.0,
                 settings: Sequence[tuple[int, int, int, int]] = MOBILENETV2_SETTINGS,
                 last_channel: int = 1280, dropout: float = 0.2):
        super().__init__()
        input_channel = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(last_channel * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(3, input_channel, stride=1)]
        for t, c, n, s in settings:
            output_channel = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU6(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --- SqueezeNet 1.1 (Iandola et al. 2016; the 1.1 variant of the reference implementation) -----

class Fire(nn.Module):
    """Squeeze 1x1 conv, then 1x1 and 3x3 expand convs side by side, concatenated."""

    def __init__(self, inplanes: int, squeeze_planes: int, expand1x1_planes: int, expand3x3_planes: int):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet11(nn.Module):
    """SqueezeNet 1.1: 3x3 stem conv, fire modules between three ceil-mode 3x3/2 max-pools, a 1x1
    conv classifier after dropout, global average pool. CIFAR stem: stride 1 with padding 1, so
    the pools see 32, 16 and 8 pixels and each ceil-mode window count differs from floor mode's."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: float = 1.0, dropout: float = 0.5):
        super().__init__()

        def w(channels: int) -> int:
            return max(1, int(channels * width))

        def fire(inplanes: int, squeeze: int, expand: int) -> Fire:
            return Fire(inplanes, w(squeeze), w(expand), w(expand))

        self.features = nn.Sequential(
            nn.Conv2d(3, w(64), kernel_size=3, stride=1, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            fire(w(64), 16, 64),
            fire(2 * w(64), 16, 64),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            fire(2 * w(64), 32, 128),
            fire(2 * w(128), 32, 128),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            fire(2 * w(128), 48, 192),
            fire(2 * w(192), 48, 192),
            fire(2 * w(192), 64, 256),
            fire(2 * w(256), 64, 256),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Conv2d(2 * w(256), num_classes, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d((1, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.classifier(self.features(x))
        return torch.flatten(x, 1)


# --- ShuffleNetV2 0.5x (Ma et al. 2018) ---------------------------------------------------------

def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: view as (groups, C/groups), transpose, flatten."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.reshape(batch, -1, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit. Stride 1: split the channels in half (``chunk``), transform one half,
    concatenate; stride 2: both branches transform (and downsample) the whole input. Then a
    channel shuffle."""

    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__()
        self.stride = stride
        branch_features = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, 1, 1, 0, bias=False),
                nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch_features, branch_features, 1, 1, 0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch_features, branch_features, 3, stride, 1, groups=branch_features, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, 1, 1, 0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 (0.5x: stage widths 48-96-192, 1024 final): stem conv, three stages of shuffle
    units (the first of each at stride 2), 1x1 conv, global average pool, fc. CIFAR stem: a 3x3
    stride-1 conv and no max-pool."""

    def __init__(self, num_classes: int = NUM_CLASSES, stages_repeats: Sequence[int] = (4, 8, 4),
                 stages_out_channels: Sequence[int] = (24, 48, 96, 192, 1024)):
        super().__init__()
        input_channels = stages_out_channels[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, input_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(input_channels),
            nn.ReLU(inplace=True),
        )
        for name, repeats, output_channels in zip(("stage2", "stage3", "stage4"), stages_repeats,
                                                  stages_out_channels[1:4]):
            units = [ShuffleUnit(input_channels, output_channels, 2)]
            units += [ShuffleUnit(output_channels, output_channels, 1) for _ in range(repeats - 1)]
            setattr(self, name, nn.Sequential(*units))
            input_channels = output_channels
        output_channels = stages_out_channels[-1]
        self.conv5 = nn.Sequential(
            nn.Conv2d(input_channels, output_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(output_channels),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(output_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.conv5(x)
        x = x.mean([2, 3])  # global average pool
        return self.fc(x)


# --- DenseNet-121 (Huang et al. 2017), DenseNet-BC --------------------------------------------

class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (``bn_size * growth_rate`` channels) - BN-ReLU-3x3 conv (``growth_rate``)."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(out)))


class DenseBlock(nn.Module):
    """Each layer sees the concatenation of the block's input and every earlier layer's output."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int):
        super().__init__()
        self.layers = nn.ModuleDict({
            f"denselayer{i + 1}": DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            for i in range(num_layers)
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (compression) - 2x2 average pool, between dense blocks."""

    def __init__(self, num_input_features: int, num_output_features: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """DenseNet-BC: stem conv, dense blocks with transitions (compression 0.5) between them, final
    BN-ReLU, global average pool, fc; ``block_config=(6, 12, 24, 16)``, ``growth_rate=32`` is
    DenseNet-121. CIFAR stem: a 3x3 stride-1 conv, no max-pool. ``features`` is a named
    ``nn.Sequential`` (``OrderedDict``), as in the reference implementation."""

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, num_classes: int = NUM_CLASSES):
        super().__init__()
        stem = [("conv0", nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True))]
        self.features = nn.Sequential(OrderedDict(stem))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(num_layers, num_features, bn_size, growth_rate))
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(num_features, num_features // 2))
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))


# --- EfficientNet-B0 (Tan & Le 2019) -------------------------------------------------------------

#: expansion, kernel, stride, input channels, output channels, layers (Table 1; CIFAR: stem at stride 1)
EFFICIENTNET_B0_SETTINGS: tuple = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
                                   (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
                                   (6, 3, 1, 192, 320, 1))


class SqueezeExcite(nn.Module):
    """Channel attention: the spatial mean, a 1x1 conv bottleneck with SiLU, a sigmoid gate that
    scales the input's channels."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = nn.SiLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        scale = torch.sigmoid(self.fc2(self.act(self.fc1(scale))))
        return x * scale


class MBConv(nn.Module):
    """Mobile inverted bottleneck: 1x1 expansion (skipped at expansion 1), kxk depthwise conv,
    squeeze-excite (a quarter of the block's input width), linear 1x1 projection, and where the
    stride is 1 and the width is kept a residual with stochastic depth: in training each example's
    branch is kept with probability ``1 - drop_rate`` and scaled by its inverse."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int, stride: int,
                 drop_rate: float, se_ratio: float = 0.25):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_rate = drop_rate
        if expand_ratio != 1:
            self.expand = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                        nn.SiLU(inplace=True))
        else:
            self.expand = nn.Identity()
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel_size, stride, kernel_size // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.SiLU(inplace=True),
        )
        self.se = SqueezeExcite(hidden, max(1, int(in_channels * se_ratio)))
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def stochastic_depth(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_rate == 0.0:
            return x
        keep = 1.0 - self.drop_rate
        mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
        return x.div(keep) * mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        if self.use_residual:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNet(nn.Module):
    """EfficientNet-B0: stem conv-BN-SiLU, MBConv stages, 1x1 head conv-BN-SiLU, global average
    pool, dropout, fc. Stochastic depth grows linearly with the block index up to
    ``drop_path_rate``. CIFAR stem: stride 1."""

    def __init__(self, num_classes: int = NUM_CLASSES,
                 settings: Sequence[tuple[int, int, int, int, int, int]] = EFFICIENTNET_B0_SETTINGS,
                 stem_channels: int = 32, head_channels: int = 1280, dropout: float = 0.2,
                 drop_path_rate: float = 0.2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_channels),
                                  nn.SiLU(inplace=True))
        total = sum(layers for *_, layers in settings)
        blocks: list[nn.Module] = []
        index = 0
        for expand, kernel, stride, c_in, c_out, layers in settings:
            stage = []
            for i in range(layers):
                stage.append(MBConv(c_in if i == 0 else c_out, c_out, expand, kernel, stride if i == 0 else 1,
                                    drop_rate=drop_path_rate * index / total))
                index += 1
            blocks.append(nn.Sequential(*stage))
        self.blocks = nn.Sequential(*blocks)
        c_last = settings[-1][4]
        self.head = nn.Sequential(nn.Conv2d(c_last, head_channels, 1, bias=False), nn.BatchNorm2d(head_channels),
                                  nn.SiLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(self.dropout(x))


# --- U-Net (Ronneberger et al. 2015), small ------------------------------------------------------

class DoubleConv(nn.Module):
    """(3x3 conv, padding 1 - BN - ReLU) twice; padded, so the skip maps need no cropping."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Down(nn.Module):
    """2x2 max-pool, then a double conv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """2x2 stride-2 transposed conv halving the channels, concatenated with the encoder's skip map,
    then a double conv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """Encoder of ``depth`` downsamplings from ``base`` channels (doubling), decoder of as many
    up-steps with skip concatenations, 1x1 conv to a per-pixel map of ``num_classes`` channels
    at the input's resolution."""

    def __init__(self, num_classes: int = SEGMENT_CLASSES, base: int = 16, depth: int = 3):
        super().__init__()
        widths = [base * 2 ** i for i in range(depth + 1)]
        self.inc = DoubleConv(3, widths[0])
        self.downs = nn.ModuleList([Down(widths[i], widths[i + 1]) for i in range(depth)])
        self.ups = nn.ModuleList([Up(widths[i + 1], widths[i]) for i in reversed(range(depth))])
        self.outc = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)


# --- the zoo -----------------------------------------------------------------------------------

Factory = Callable[[], nn.Module]

ZOO: dict[str, tuple[Factory, Factory]] = {
    "resnet18": (lambda: ResNet18(width=0.125, blocks=(1, 1, 1, 1)),
                 lambda: ResNet18()),
    "vgg11_bn": (lambda: VGG(width=0.0625, hidden=16),
                 lambda: VGG()),
    "mobilenet_v2": (lambda: MobileNetV2(width_mult=0.25, last_channel=64,
                                         settings=((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2))),
                     lambda: MobileNetV2()),
    "squeezenet1_1": (lambda: SqueezeNet11(width=0.125),
                      lambda: SqueezeNet11()),
    "shufflenet_v2_x0_5": (lambda: ShuffleNetV2(stages_repeats=(2, 1, 1), stages_out_channels=(8, 16, 32, 64, 64)),
                           lambda: ShuffleNetV2()),
    "densenet121": (lambda: DenseNet(growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=8, bn_size=2),
                    lambda: DenseNet()),
    "efficientnet_b0": (lambda: EfficientNet(settings=((1, 3, 1, 8, 8, 1), (4, 3, 2, 8, 16, 2), (4, 5, 2, 16, 24, 1)),
                                             stem_channels=8, head_channels=32, drop_path_rate=0.5),
                        lambda: EfficientNet()),
    "unet": (lambda: UNet(base=4, depth=2),
             lambda: UNet()),
}
"""name -> (small factory, full factory); every model takes (N, *INPUT_CHW) inputs."""


def build(name: str, size: str = "small", seed: int = 0) -> nn.Module:
    """The zoo's ``name`` at ``size`` (``"small"`` or ``"full"``) with torch's own init under ``seed``."""
    if size not in ("small", "full"):
        raise ValueError(f"size must be 'small' or 'full', got {size!r}")
    small, full = ZOO[name]
    torch.manual_seed(seed)
    return (small if size == "small" else full)()
