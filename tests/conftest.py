"""Shared test settings. Nothing here changes library state: the parity checks scope their own
precision (:mod:`parity.precision`), and a check that forgets to fails tests/test_parity_precision.py."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("FLAXCNN_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set FLAXCNN_SHARED_DATA to run real-data checks)")
    return SHARED_DATA
