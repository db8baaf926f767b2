"""Max-pool windows decided by rounding: the two largest values of a window within tolerance.

A max pool passes its gradient to the largest value of each window. Where the two largest are
within rounding of each other, two correct forwards can pick different ones and the gradient
upstream moves by that element's whole contribution: the same phenomenon as a ReLU input
within rounding of zero (:mod:`parity.relu_decisions`), which the proof replays. Pool choices
are not replayed; :func:`count_max_pool_near_ties` finds them so that a failed proof can say
where they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class PoolTies:
    """One ``F.max_pool2d`` call (``nn.MaxPool2d`` calls it): its windows and the near ties among them."""

    call: int
    windows: int
    ties: int


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def near_ties(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False, *,
              rtol: float) -> tuple[int, int]:
    """(windows, windows whose two largest values differ by at most ``rtol * max|x|``) of a max pool
    of the NCHW ``x`` with these settings (PyTorch's, ``ceil_mode`` included)."""
    k, s = _pair(kernel_size), _pair(stride if stride not in (None, []) else kernel_size)
    p, d = _pair(padding), _pair(dilation)
    x = x.detach()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if k[0] * k[1] < 2 or x.numel() == 0:
        return 0, 0
    extra = []
    for axis in (0, 1):
        size = x.shape[2 + axis]
        span = size + 2 * p[axis] - d[axis] * (k[axis] - 1) - 1
        out = (math.ceil(span / s[axis]) if ceil_mode else span // s[axis]) + 1
        if ceil_mode and (out - 1) * s[axis] >= size + p[axis]:
            out -= 1  # PyTorch's rule: the last window starts inside the input or its left padding
        extra.append(max(0, (out - 1) * s[axis] + d[axis] * (k[axis] - 1) + 1 - (size + 2 * p[axis])))
    padded = F.pad(x, (p[1], p[1] + extra[1], p[0], p[0] + extra[0]), value=-math.inf)
    n, c = x.shape[:2]
    cols = F.unfold(padded.reshape(n * c, 1, *padded.shape[2:]), k, dilation=d, stride=s)  # (n*c, k*k, L)
    top = torch.topk(cols, 2, dim=1).values
    gap = top[:, 0] - top[:, 1]
    band = rtol * float(x.abs().max())
    return int(gap.numel()), int(((gap <= band) & torch.isfinite(top[:, 1])).sum())


class _PoolMode(TorchFunctionMode):
    def __init__(self, rtol: float):
        super().__init__()
        self.rtol, self.found = rtol, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.max_pool2d:
            names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
            given = dict(zip(names, args[1:]), **{k: v for k, v in kwargs.items() if k in names})
            windows, ties = near_ties(args[0], rtol=self.rtol, **given)
            self.found.append(PoolTies(len(self.found), windows, ties))
        return func(*args, **kwargs)


@contextmanager
def count_max_pool_near_ties(*, rtol: float) -> Iterator[list[PoolTies]]:
    """For the block: every ``F.max_pool2d`` call of PyTorch, in call order, with its near ties."""
    mode = _PoolMode(rtol)
    with mode:
        yield mode.found


__all__ = ["PoolTies", "count_max_pool_near_ties", "near_ties"]
