"""Shared test settings: float32 parity needs full-precision matmuls on every backend."""

import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = Path(os.environ.get("FLAXCNN_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set FLAXCNN_SHARED_DATA to run real-data checks)")
    return SHARED_DATA
