"""The labs' PyTorch classes, as the notebooks define them (plus ``num_classes``).

These are the references the Flax modules are proven equal to. Quirks are kept on purpose:
``NetDropout`` applies ``nn.Dropout2d`` to the 2-D ``fc1`` output (PyTorch 2.x warns and does
element-wise dropout); ``ConvNet`` has no activation after ``fc1``. The one exception is
``NetDepth``, whose lab text cannot train (see ``NetDepthAsWritten``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# NetDropout's Dropout2d on a 2-D tensor is the lab's own code; its warning is expected.
warnings.filterwarnings("ignore", message=".*dropout2d.*", category=UserWarning)


class Net(nn.Module):
    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(8 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        out = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
        out = F.max_pool2d(torch.tanh(self.conv2(out)), 2)
        out = out.view(-1, 8 * 8 * 8)
        out = torch.tanh(self.fc1(out))
        out = self.fc2(out)
        return out


class NetWidth(nn.Module):
    def __init__(self, n_chans1: int = 32, num_classes: int = 2):
        super().__init__()
        self.n_chans1 = n_chans1
        self.conv1 = nn.Conv2d(3, n_chans1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(n_chans1, n_chans1 * 2, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(n_chans1 * 2 * 8 * 8, n_chans1 * 4)
        self.fc2 = nn.Linear(n_chans1 * 4, num_classes)

    def forward(self, x):
        out = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
        out = F.max_pool2d(torch.tanh(self.conv2(out)), 2)
        out = out.view(-1, self.n_chans1 * 2 * 8 * 8)
        out = torch.tanh(self.fc1(out))
        out = self.fc2(out)
        return out


class NetDepthAsWritten(nn.Module):
    """Lab 8's NetDepth verbatim: no pool after conv2, so ``view`` folds each image into 4 rows."""

    def __init__(self, n_chans1: int = 32, num_classes: int = 2):
        super().__init__()
        self.n_chans1 = n_chans1
        self.conv1 = nn.Conv2d(3, n_chans1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(n_chans1, n_chans1, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(n_chans1, n_chans1, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(n_chans1 * 4 * 4, n_chans1 * 4)
        self.fc2 = nn.Linear(n_chans1 * 4, num_classes)

    def forward(self, x):
        out = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
        out = torch.tanh(self.conv2(out))
        out = F.max_pool2d(torch.tanh(self.conv3(out)), 2)
        out = out.view(-1, self.n_chans1 * 4 * 4)
        out = torch.tanh(self.fc1(out))
        out = self.fc2(out)
        return out


class NetDepth(NetDepthAsWritten):
    """Lab 8's NetDepth with the max-pool after conv2 that its ``fc1`` size implies."""

    def forward(self, x):
        out = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
        out = F.max_pool2d(torch.tanh(self.conv2(out)), 2)
        out = F.max_pool2d(torch.tanh(self.conv3(out)), 2)
        out = out.view(-1, self.n_chans1 * 4 * 4)
        out = torch.tanh(self.fc1(out))
        out = self.fc2(out)
        return out


class NetDropout(nn.Module):
    def __init__(self, n_chans1: int = 32, num_classes: int = 2):
        super().__init__()
        self.n_chans1 = n_chans1
        self.conv1 = nn.Conv2d(3, n_chans1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(n_chans1, n_chans1, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(n_chans1 * 8 * 8, n_chans1 * 4)
        self.fc2 = nn.Linear(n_chans1 * 4, num_classes)
        self.dropout = nn.Dropout2d(p=0.5)

    def forward(self, x):
        out = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
        out = self.dropout(out)
        out = F.max_pool2d(torch.tanh(self.conv2(out)), 2)
        out = out.view(-1, self.n_chans1 * 8 * 8)
        out = torch.tanh(self.fc1(out))
        out = self.dropout(out)
        out = self.fc2(out)
        return out


class NetBatchNorm(nn.Module):
    def __init__(self, n_chans1: int = 32, num_classes: int = 2):
        super().__init__()
        self.n_chans1 = n_chans1
        self.conv1 = nn.Conv2d(3, n_chans1, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(n_chans1)
        self.conv2 = nn.Conv2d(n_chans1, n_chans1, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(n_chans1)
        self.fc1 = nn.Linear(n_chans1 * 8 * 8, n_chans1 * 4)
        self.fc2 = nn.Linear(n_chans1 * 4, num_classes)
        self.dropout = nn.Dropout(p=0.5)

    def forward(self, x):
        out = self.conv1(x)
        out = self.bn1(out)
        out = torch.tanh(out)
        out = F.max_pool2d(out, 2)

        out = self.conv2(out)
        out = self.bn2(out)
        out = torch.tanh(out)
        out = F.max_pool2d(out, 2)

        out = out.view(-1, self.n_chans1 * 8 * 8)
        out = self.fc1(out)
        out = torch.tanh(out)
        out = self.dropout(out)
        out = self.fc2(out)
        return out


class ConvNet(nn.Module):
    def __init__(self, num_classes: int = 35):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels=1, out_channels=10, kernel_size=10, stride=1, padding=0)
        self.pooling = nn.MaxPool2d(4)
        self.conv1_drop = nn.Dropout2d(p=0.2)
        self.drop1 = nn.Dropout(p=0.2)
        self.fc1 = nn.Linear(880, 100)
        self.fc2 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.conv1(x)
        x = self.relu(self.pooling(x))
        x = self.conv1_drop(x)
        x = x.view(-1, 880)
        x = self.fc1(x)
        x = self.drop1(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


class SpeechNet(nn.Module):
    """The speech lab's exercise answer (``flaxcnn.models.speech.SpeechNet``): input BatchNorm,
    conv3x3-BN-ReLU blocks with max-pool 2 between them, average pooling over all positions, dropout, fc,
    log_softmax."""

    def __init__(self, num_classes: int = 35, channels: tuple[int, ...] = (8, 16, 32, 64),
                 dropout: float = 0.3):
        super().__init__()
        self.num_blocks = len(channels)
        self.bn0 = nn.BatchNorm2d(1)
        for i, (c_in, c_out) in enumerate(zip((1, *channels[:-1]), channels), start=1):
            setattr(self, f"conv{i}", nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c_out))
        self.drop = nn.Dropout(p=dropout)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        x = self.bn0(x)
        for i in range(1, self.num_blocks + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            if i < self.num_blocks:
                x = F.max_pool2d(x, 2)
        x = self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return F.log_softmax(self.fc(x), dim=1)


class SpeechResNet(nn.Module):
    """``flaxcnn.models.speech.SpeechResNet``: input BatchNorm, stem conv3x3-BN-ReLU, residual
    stages (2x2 max-pool, then blocks of conv3x3-BN-ReLU-conv3x3-BN plus an identity or
    1x1 conv-BN shortcut, ReLU), average pooling over all positions, dropout, fc, log_softmax."""

    def __init__(self, num_classes: int = 35, channels: tuple[int, ...] = (16, 32, 64), blocks: int = 1,
                 dropout: float = 0.3):
        super().__init__()
        self.names = [(f"s{s}b{b}", c) for s, c in enumerate(channels, start=1) for b in range(1, blocks + 1)]
        self.bn_in = nn.BatchNorm2d(1)
        self.stem = nn.Conv2d(1, channels[0], kernel_size=3, padding=1)
        self.stem_bn = nn.BatchNorm2d(channels[0])
        c_in = channels[0]
        for name, c_out in self.names:
            setattr(self, f"{name}_conv1", nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
            setattr(self, f"{name}_bn1", nn.BatchNorm2d(c_out))
            setattr(self, f"{name}_conv2", nn.Conv2d(c_out, c_out, kernel_size=3, padding=1))
            setattr(self, f"{name}_bn2", nn.BatchNorm2d(c_out))
            if c_in != c_out:
                setattr(self, f"{name}_proj", nn.Conv2d(c_in, c_out, kernel_size=1))
                setattr(self, f"{name}_proj_bn", nn.BatchNorm2d(c_out))
            c_in = c_out
        self.drop = nn.Dropout(p=dropout)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(self.bn_in(x))))
        for name, _ in self.names:
            if name.rsplit("b", 1)[1] == "1":  # first block of a stage
                x = F.max_pool2d(x, 2)
            out = F.relu(getattr(self, f"{name}_bn1")(getattr(self, f"{name}_conv1")(x)))
            out = getattr(self, f"{name}_bn2")(getattr(self, f"{name}_conv2")(out))
            shortcut = (getattr(self, f"{name}_proj_bn")(getattr(self, f"{name}_proj")(x))
                        if hasattr(self, f"{name}_proj") else x)
            x = F.relu(out + shortcut)
        x = self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return F.log_softmax(self.fc(x), dim=1)
