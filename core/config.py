"""Project settings: where the data and the runs live, class names, defaults.

Every CLI takes ``--data DIR``; without it the ``CXR_DATA_DIR`` environment variable is used,
and without that the git-ignored ``data/`` folder of the repository. Runs are written under
``--runs DIR`` / ``CXR_RUNS_DIR`` / ``runs/``. The model shipped in ``assets/model`` is the
default run wherever a run can be named.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / "assets"
DEFAULT_RUN = ASSETS_DIR / "model"

# Class order is fixed so that index 0 is always COVID-19: P(covid) == probs[..., 0].
TASKS = {
    "binary": ("covid", "other"),
    "multiclass": ("covid", "normal", "pneumonia"),
}
COVID_INDEX = 0

# Input side in pixels of a model built by ``core.model.build`` when no size is given. Training's default
# (``core.train.DEFAULTS["size"]``) and the shipped model (``assets/model/config.json``) are 128 px;
# images are decoded at whatever size the run asks for, never at this one.
BUILD_SIZE = 224
SEED = 1337


def _root(arg: str | os.PathLike | None, env: str, default: str) -> Path:
    """``arg`` if given, else the environment variable ``env``, else ``<repo>/<default>``."""
    chosen = arg or os.environ.get(env)
    return Path(chosen).expanduser().resolve() if chosen else REPO_ROOT / default


def data_dir(arg: str | os.PathLike | None = None) -> Path:
    """The data root: ``arg`` if given, else ``$CXR_DATA_DIR``, else ``<repo>/data``."""
    return _root(arg, "CXR_DATA_DIR", "data")


def runs_dir(arg: str | os.PathLike | None = None) -> Path:
    """The runs root: ``arg`` if given, else ``$CXR_RUNS_DIR``, else ``<repo>/runs``."""
    return _root(arg, "CXR_RUNS_DIR", "runs")


def classes(task: str) -> tuple[str, ...]:
    """Class names of a task, COVID-19 first."""
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}") from None


def label_to_class(label: str, task: str) -> str:
    """Map a dataset label (covid/normal/pneumonia) to the task's class name."""
    if task == "binary":
        return "covid" if label == "covid" else "other"
    return label


def cache_dir(runs_root: str | os.PathLike | None = None) -> Path:
    """Where derived data (fingerprints, prepared pixels) is cached: ``$CXR_CACHE_DIR``, else ``<runs>/.cache``."""
    env = os.environ.get("CXR_CACHE_DIR")
    return Path(env).expanduser().resolve() if env else runs_dir(runs_root) / ".cache"
