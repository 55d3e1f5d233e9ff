"""The one way to open a film named by a run file (predictions.csv, split.csv, audit.csv) or a table.

A run folder may come from someone else, so a ``path`` in it is untrusted: it may be absolute,
climb out with ``..``, be a symlink that points out of the data root, or name a device or FIFO.
:func:`film_path` resolves it (symlinks included) and accepts it only inside the data root;
:func:`read_film` and :func:`load_film` then read it through :func:`core.images.read_bytes`, which
opens regular files only and never reads more than ``MAX_BYTES + 1`` bytes.

Every path outside the root gets the same sentence (:data:`OUTSIDE`), whether or not a file is
there, so the answer never tells whether a file exists outside the root.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from core import images

OUTSIDE = "not a film under the data root"


def film_path(root: str | os.PathLike, rel: str) -> Path:
    """The real path of ``rel`` (a run file's or table's ``path``) inside ``root``.

    Raises :class:`core.images.ImageError` with :data:`OUTSIDE` when it resolves outside the
    root (absolute paths, ``..``, symlinks pointing out, odd strings).
    """
    name = str(rel)
    try:
        base = Path(root).resolve()
        path = (base / name).resolve()  # follows every symlink on the way
    except (OSError, RuntimeError, ValueError):  # symlink loops, NUL bytes
        raise images.ImageError(name, OUTSIDE) from None
    if path == base or not path.is_relative_to(base):
        raise images.ImageError(name, OUTSIDE)
    return path


def read_film(root: str | os.PathLike, rel: str) -> bytes:
    """The bytes of a film under ``root`` (:func:`film_path`, then :func:`core.images.read_bytes`)."""
    return images.read_bytes(film_path(root, rel), name=str(rel))[0]


def load_film(root: str | os.PathLike, rel: str, size: int | None = None) -> np.ndarray:
    """A film under ``root`` decoded by :func:`core.images.load` (resized to ``size`` when given)."""
    return images.load(read_film(root, rel), size, name=str(rel))


def film_stamp(root: str | os.PathLike, rel: str) -> tuple[int, int, int] | None:
    """What a cache keys a film under ``root`` on, as :func:`core.runs.file_stamp`: (size, mtime in
    ns, inode); None when refused or missing (stat only: a FIFO or device is never opened)."""
    try:
        st = film_path(root, rel).stat()
    except (images.ImageError, OSError):
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino
