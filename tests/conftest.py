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


# Files the repository ships: their tests FAIL when one is missing (a skip would hide the loss).
SHIPPED_RUN_FILES = ("model.keras", "config.json", "split.csv", "history.csv", "predictions.csv", "metrics.json",
                     "env.json")
SHIPPED_LUNG_FILES = ("lungs.keras", "training.json")


def require_shipped(folder: Path, names) -> Path:
    """``folder`` after checking that every shipped file ``names`` is in it; pytest.fail otherwise."""
    missing = [n for n in names if not (Path(folder) / n).is_file()]
    if missing:
        pytest.fail(f"shipped file(s) missing from {folder}: {', '.join(missing)} (they are part of the "
                    "repository, so their tests fail instead of skipping)", pytrace=False)
    return Path(folder)


@pytest.fixture(scope="session")
def shipped_run() -> Path:
    """The shipped model's run folder ``assets/model``; a missing file fails the test, never skips it."""
    return require_shipped(config.DEFAULT_RUN, SHIPPED_RUN_FILES)


@pytest.fixture(scope="session")
def shipped_lungs() -> Path:
    """The shipped lung U-Net folder ``assets/lungs``; a missing file fails the test, never skips it."""
    return require_shipped(config.ASSETS_DIR / "lungs", SHIPPED_LUNG_FILES)


# Settings of the tiny training run shared by tests (model, train, predict, evaluate, explain...).
TINY_RUN = dict(size=64, limit=5, epochs=2, batch_size=16, name="tiny", seed=7, patience=5)


@pytest.fixture(scope="session")
def tiny_run(cxr_root, tmp_path_factory) -> Path:
    """A complete run folder of a tiny model (64 px, ~90 real images, 2 epochs; ~15-30 s).

    Trained once per test session in a temporary runs folder by ``core.train.train``; it has
    model.keras, config.json, split.csv, history.csv, predictions.csv, env.json and, when
    core.evaluate is available, metrics.json. Its metrics are meaningless (tiny data).
    """
    from core import train

    runs_root = tmp_path_factory.mktemp("runs")
    return train.train(data=str(cxr_root), runs=str(runs_root), verbose=0, **TINY_RUN)


@pytest.fixture(scope="session")
def cxr_prepared(cxr_root):
    """The real pool as training sees it: ``core.splits.prepare(cxr_root)`` (default seed).

    Fingerprints are cached on disk (``$CXR_CACHE_DIR`` or ``runs/.cache``): the first call
    decodes every image once (~8 s CPU), later ones take about a second.
    """
    from core import splits

    return splits.prepare(cxr_root)
