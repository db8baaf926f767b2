"""The PyTorch side: the lab's loop and two faster ways to feed the same model.

``lab-loop``       lab 8's ``training_loop``: ``DataLoader`` over a list of ``(image, label)``
                   pairs, ``batch_size``, ``shuffle=True``; per batch ``model(imgs)``, loss,
                   ``zero_grad``, ``backward``, ``step``, ``loss_train += loss.item()``.
``torch-sliced``   the same loop body on pre-built tensors, each batch gathered with a slice
                   of the epoch's permutation (the one flaxcnn uses) instead of collated.
``torch-compile``  ``torch-sliced`` with ``torch.compile(model)``.

Only this module (and the processes that run it) imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data import BenchData
from benchmarks.timing import EVAL_BATCH
from flaxcnn.data.batching import epoch_permutation
from flaxcnn.errors import ConfigError
from flaxcnn.models.registry import ModelSpec

PATHS = ("lab-loop", "torch-sliced", "torch-compile")


def torch_device(device: str):
    """``cpu`` or ``gpu`` (CUDA, TF32 off so float32 means float32 on both sides)."""
    import torch

    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device gpu: torch {torch.__version__} sees no CUDA device; use --device cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda")


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` only when asked (``--torch-threads``); None leaves torch's default."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def torch_info(device: str) -> dict[str, Any]:
    import torch

    info = {"torch": torch.__version__, "torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads()}
    if device == "gpu" and torch.cuda.is_available():
        info["torch_gpu"] = torch.cuda.get_device_name()
        info["torch_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    return info


def build_model(spec: ModelSpec, seed: int, device, init_dir: Path | None):
    """The lab's class with torch's own init under ``manual_seed(seed)``; the init is saved to
    ``init_dir/<model>.npz`` (once) for the flaxcnn process to start from the same weights."""
    import torch

    torch.manual_seed(seed)
    model = spec.build_torch()
    if init_dir is not None:
        target = Path(init_dir) / f"{spec.name}.npz"
        if not target.exists():
            np.savez(target, **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    return model.to(device)


def loss_function(spec: ModelSpec):
    import torch.nn as nn

    return nn.NLLLoss() if spec.loss == "nll" else nn.CrossEntropyLoss()


class TorchTrainer:
    """One model trained by one of :data:`PATHS`."""

    def __init__(self, spec: ModelSpec, path: str, data: BenchData, batch_size: int, *, lr: float,
                 momentum: float, seed: int, device: str = "cpu", init_dir: Path | None = None):
        import torch

        if path not in PATHS:
            raise ConfigError(f"unknown PyTorch path {path!r}; accepted: {', '.join(PATHS)}")
        self.torch, self.path, self.batch_size, self.seed = torch, path, batch_size, seed
        self.device = torch_device(device)
        self.model = build_model(spec, seed, self.device, init_dir)
        self.loss_fn = loss_function(spec)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)
        self.forward = torch.compile(self.model) if path == "torch-compile" else self.model
        x, y = torch.from_numpy(data.x), torch.from_numpy(data.y.astype(np.int64))
        if path == "lab-loop":
            generator = torch.Generator().manual_seed(seed)
            pairs = [(img, int(label)) for img, label in zip(x, y)]  # the lab's list of (tensor, int)
            self.loader = torch.utils.data.DataLoader(pairs, batch_size=batch_size, shuffle=True,
                                                      generator=generator)
        else:
            self.x, self.y = x.to(self.device), y.to(self.device)

    def _batches(self, epoch: int):
        if self.path == "lab-loop":
            for imgs, labels in self.loader:
                yield imgs.to(self.device), labels.to(self.device)
            return
        n = len(self.y)
        order = self.torch.from_numpy(epoch_permutation(self.seed, epoch, n)).to(self.device)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.x[idx], self.y[idx]

    def train_epoch(self, epoch: int) -> float:
        self.model.train()
        loss_train = 0.0
        for imgs, labels in self._batches(epoch):
            outputs = self.forward(imgs)
            loss = self.loss_fn(outputs, labels)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            loss_train += loss.item()
        return loss_train

    def evaluate(self, x, y) -> dict[str, float]:
        """Forward only in evaluation mode, batches of ``EVAL_BATCH``: summed loss and accuracy."""
        torch = self.torch
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        with torch.no_grad():
            for start in range(0, len(y), EVAL_BATCH):
                out = self.forward(x[start:start + EVAL_BATCH])
                labels = y[start:start + EVAL_BATCH]
                loss_sum += self.loss_fn(out, labels) * len(labels)
                correct += (out.argmax(dim=1) == labels).sum()
        self.model.train()
        count = len(y)
        return {"loss": loss_sum.item() / count, "accuracy": correct.item() / count, "count": count}

    def eval_arrays(self, data: BenchData):
        """The eval split as tensors on this trainer's device."""
        torch = self.torch
        return (torch.from_numpy(data.eval_x).to(self.device),
                torch.from_numpy(data.eval_y.astype(np.int64)).to(self.device))
