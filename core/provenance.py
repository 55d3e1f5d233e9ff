"""Where a run came from: the file hash every part of the project uses, and the code and packages
that trained it (``env.json``, ``config.json``'s provenance keys). Split from :mod:`core.runs`, which
re-exports these names."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from core import config


class ProvenanceError(ValueError):
    """The code of a commit cannot be listed or read (no git, or an unknown commit)."""


def sha256(path) -> str:
    """Hex sha256 of a file (the project's one file hash: models, archives, images)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- provenance
PACKAGES = ("tensorflow", "tensorflow-cpu", "keras", "numpy", "pandas", "scikit-learn",
            "opencv-python-headless", "pillow", "pydicom", "tf-keras-vis")


def _git(root: Path, *args: str) -> subprocess.CompletedProcess | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out if out.returncode == 0 else None


def source_files(root=None, commit: str | None = None) -> list[str]:
    """The code that trains and evaluates a model: every ``core/**/*.py``, as paths relative to ``root``.

    Without ``commit``: the files on disk, tracked or not (an untracked module trains a run as
    much as a committed one). With ``commit``: the files of that commit (``git ls-tree``).
    """
    root = Path(root or config.REPO_ROOT)
    if commit is None:
        return sorted(p.relative_to(root).as_posix() for p in (root / "core").rglob("*.py")
                      if "__pycache__" not in p.parts)
    out = _git(root, "ls-tree", "-r", "--name-only", commit, "--", "core")
    if out is None:
        raise ProvenanceError(f"cannot list core/ at commit {commit!r} in {root}.")
    return sorted(n for n in out.stdout.decode().splitlines() if n.endswith(".py"))


def source_sha256(root=None, commit: str | None = None) -> str:
    """One sha256 over the :func:`source_files` and their bytes (on disk, or at ``commit``).

    The hash is over ``<path> NUL <sha256 of its bytes> LF`` per file in path order, so a
    reviewer can recompute it from any checkout (``source_sha256()``) or any commit
    (``source_sha256(commit=C)``) and compare it with the one a run recorded.
    """
    root = Path(root or config.REPO_ROOT)
    h = hashlib.sha256()
    for name in source_files(root, commit):
        if commit is None:
            data = (root / name).read_bytes()
        else:
            out = _git(root, "show", f"{commit}:{name}")
            if out is None:
                raise ProvenanceError(f"cannot read {name} at commit {commit!r} in {root}.")
            data = out.stdout
        h.update(f"{name}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return h.hexdigest()


def provenance(root=None) -> dict:
    """Which code trained a run: the git commit, whether the tree differed from it, and the code's hash.

    ``git_commit`` is HEAD (None outside a git checkout); ``git_dirty`` is True when tracked or
    untracked (not ignored) files differ from it; ``source_sha256`` hashes the ``core/`` files on
    disk (:func:`source_sha256`), listed in ``source_files``; ``source_matches_commit`` says whether
    HEAD holds exactly that code (None without git). A run is replayable from its commit only when
    that is True; otherwise ``source_sha256`` still identifies the code that ran.
    """
    root = Path(root or config.REPO_ROOT)
    head = _git(root, "rev-parse", "HEAD")
    commit = head.stdout.decode().strip() if head is not None else None
    status = _git(root, "status", "--porcelain", "--untracked-files=all") if commit else None
    files = source_files(root)
    digest = source_sha256(root)
    matches = None
    if commit:
        try:
            matches = source_sha256(root, commit) == digest
        except ProvenanceError:
            matches = False
    return {
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status.stdout.strip()),
        "source_sha256": digest,
        "source_matches_commit": matches,
        "source_files": files,
    }


def environment(root=None) -> dict:
    """Python, platform, package versions, command line and :func:`provenance`, for env.json."""
    pkgs = {}
    for name in PACKAGES:
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": pkgs,
        "argv": sys.argv,
        **provenance(root),
    }
