"""Full-precision arithmetic for the duration of a parity check, on both sides.

Parity at 1e-6 needs full float32 matmuls and convolutions: TF32 on a GPU, or a reduced-pass
default on an accelerator, moves results by 1e-3. The setting is scoped: JAX's
``default_matmul_precision`` context (thread-local, restored on exit) and PyTorch's TF32 flags,
put back to what they were. Nothing stays changed after a check: a process that trains after
running one trains as it would have. On CPUs the setting changes nothing (XLA's CPU matmuls are
full float32 whatever it says); it is what makes the same checks hold on GPUs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import jax
import torch


@contextmanager
def full_precision() -> Iterator[None]:
    """Highest matmul precision in JAX and no TF32 in PyTorch, for the block only."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def is_full_precision() -> bool:
    """Whether the caller runs inside :func:`full_precision` (what the checks assert)."""
    return jax.config.jax_default_matmul_precision == "highest"
