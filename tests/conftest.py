"""Shared fixtures: where the real data is, and small subsets of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core import config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _find_cxr() -> Path | None:
    env = os.environ.get("CXR_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(config.REPO_ROOT.parent / "shared" / "cxr")
    for c in candidates:
        if (c / "ieee8023" / "metadata.csv").exists():
            return c.resolve()
    return None


CXR = _find_cxr()


@pytest.fixture(scope="session")
def cxr_root() -> Path:
    """The real data root (../shared/cxr or $CXR_DATA_DIR); tests needing it skip without it."""
    if CXR is None:
        pytest.skip("real chest X-ray data not found: set CXR_DATA_DIR or place it at ../shared/cxr")
    return CXR
