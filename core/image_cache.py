"""The training films, decoded and prepared once, and cached on disk.

:func:`prepare_images` decodes every film of a run through :func:`core.inputs.load_many` (the same
preparation as inference, optionally cropped to the lungs) and keeps the result in an ``.npz``
under ``<runs>/.cache``, keyed by path, file size and mtime, the crop settings and the lung
model's sha256, so that later runs (and ``--recalibrate``) skip the decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core import images, inputs, lungs


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def _cache_file(cache_dir: Path, root: Path, size: int, lung_crop: dict | None) -> Path:
    # films are decoded at the needed side and the lung net runs at its inference side: a change of
    # either is a different preparation, so a different cache
    key = str(Path(root).resolve()) + f"|need{inputs.needed_side(size, lung_crop)}"
    if lung_crop is not None:
        key += json.dumps(lung_crop, sort_keys=True) + lungs.model_sha256() + f"|lung{lungs.net_size()}"
    tag = "lungs" if lung_crop is not None else "pixels"
    return cache_dir / f"{tag}-{hashlib.sha1(key.encode()).hexdigest()[:10]}-{size}.npz"


def _read_cache(cfile: Path | None) -> dict:
    if not cfile or not cfile.exists():
        return {}
    try:
        with np.load(cfile, allow_pickle=False) as z:
            return {
                str(p): (int(s), int(m), img, box, bool(fb))
                for p, s, m, img, box, fb in zip(
                    z["paths"], z["sizes"], z["mtimes"], z["images"], z["boxes"], z["fell_back"], strict=True
                )
            }
    except Exception:  # a corrupt or old-format cache is rebuilt
        return {}


def _write_cache(cfile: Path, cached: dict) -> None:
    cfile.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted(cached)
    tmp = cfile.with_name(cfile.name + f".tmp{os.getpid()}.npz")
    np.savez(
        tmp,
        paths=np.array(keys),
        sizes=np.array([cached[k][0] for k in keys], np.int64),
        mtimes=np.array([cached[k][1] for k in keys], np.int64),
        images=np.stack([cached[k][2].astype(np.float32) for k in keys]),
        boxes=np.stack([np.asarray(cached[k][3], np.float64) for k in keys]),
        fell_back=np.array([cached[k][4] for k in keys], bool),
    )
    os.replace(tmp, cfile)


def prepare_images(root, paths: list[str], size: int, lung_crop: dict | None = None, cache_dir=None,
                   progress: bool = True):
    """Decode and prepare ``paths`` (relative to ``root``) once, through :func:`core.inputs.prepare`.

    Returns ``(x (n_ok, size, size), boxes (n_ok, 4), fell_back (n_ok,), kept, errors)``: ``kept``
    are the indices of the paths that loaded, ``errors`` one ImageError per path that did not.
    With ``cache_dir`` the prepared films are kept in an .npz there (keyed by path, file size and
    mtime, the crop settings and the lung model's sha256), so that later runs skip this step.
    """
    root = Path(root)
    cfile = _cache_file(Path(cache_dir), root, size, lung_crop) if cache_dir else None
    cached = _read_cache(cfile)
    out: list = [None] * len(paths)
    todo = []
    for i, rel in enumerate(paths):
        try:
            st = (root / rel).stat()
        except OSError:
            todo.append(i)
            continue
        hit = cached.get(rel)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            out[i] = hit[2:]
        else:
            todo.append(i)
    errors: list[images.ImageError] = []
    if todo:
        log(f"preparing {len(todo)} films at {size}x{size}{' (lung crop)' if lung_crop is not None else ''} "
            f"({len(paths) - len(todo)} cached)")
        chunks = [todo[k : k + 16] for k in range(0, len(todo), 16)]
        pbar = None
        if progress:
            pbar = tqdm(total=len(todo), desc="preparing", unit="img", file=sys.stderr)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            jobs = pool.map(lambda c: (c, inputs.load_many([root / paths[i] for i in c], size, lung_crop)), chunks)
            for chunk, (x, boxes, fb, ok, errs) in jobs:
                for j, k in enumerate(ok):
                    out[chunk[k]] = (x[j], boxes[j], bool(fb[j]))
                errors.extend(errs)
                if pbar:
                    pbar.update(len(chunk))
        if pbar:
            pbar.close()
        if cfile:
            for i in todo:
                if out[i] is not None:
                    st = (root / paths[i]).stat()
                    cached[paths[i]] = (st.st_size, st.st_mtime_ns, *out[i])
            _write_cache(cfile, cached)
    kept = [i for i, o in enumerate(out) if o is not None]
    x = np.stack([out[i][0] for i in kept]).astype(np.float32) if kept else np.zeros((0, size, size), np.float32)
    boxes = np.stack([out[i][1] for i in kept]) if kept else np.zeros((0, 4))
    fell_back = np.array([out[i][2] for i in kept], bool)
    return x, boxes, fell_back, kept, errors
