"""The labs' training settings, shared by both frameworks so the comparison is like for like."""

from __future__ import annotations

from flaxcnn.models.registry import ModelSpec

LR = 1e-2  # both labs


def lab_momentum(spec: ModelSpec) -> float:
    """Lab 8 uses plain SGD; the speech lab ``SGD(momentum=0.9)``."""
    return 0.9 if spec.domain == "speech" else 0.0


def lab_batch_size(spec: ModelSpec) -> int:
    """Lab 8 trains with batch 64, the speech lab with 256."""
    return 256 if spec.domain == "speech" else 64
