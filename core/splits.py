"""Duplicates, patient-level stratified splits and split files.

Leakage is the usual way a chest X-ray classifier looks better than it is, so:

* exact duplicates (same file bytes, sha256) are found across all sources and dropped;
* near-duplicates (Pearson correlation of 32x32 thumbnails >= :data:`NEAR_THRESHOLD`) are
  reported and forced into one split;
* the split is by patient: every image of a patient (and of any patient linked to it by a shared
  file or a duplicate) lands in the same split, and labels are stratified per source.

:func:`prepare` is what training and evaluation call. Hashes and thumbnails are cached on disk
(``<runs root>/.cache/fingerprints.npz``, keyed by absolute path, size and mtime) so that only
the first call decodes every image (~8 s for the 946 images of ../shared/cxr).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from core import config, images, runs
from core.datasets import _UnionFind, abspath, load_table

SPLITS = ("train", "val", "test")
FRACTIONS = (0.7, 0.1, 0.2)
NEAR_THRESHOLD = 0.97
THUMB_SIZE = 32
SPLIT_COLUMNS = ["path", "split", "label", "source", "patient_id", "group"]


# ----------------------------------------------------------------------------- fingerprints
def cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where fingerprints are cached: ``cache_dir``, else ``$CXR_CACHE_DIR``, else ``<runs>/.cache``."""
    return (Path(cache_dir) if cache_dir else config.cache_dir()) / "fingerprints.npz"


def _stat_key(p: Path) -> tuple[int, int]:
    st = p.stat()
    return int(st.st_size), int(st.st_mtime_ns)


def _read_cache(path: Path) -> dict[str, tuple]:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys, sizes, mtimes, shas, thumbs = z["keys"], z["sizes"], z["mtimes"], z["shas"], z["thumbs"]
    except (OSError, KeyError, ValueError):
        return {}
    if thumbs.shape[1:] != (THUMB_SIZE, THUMB_SIZE):
        return {}
    return {str(k): (int(s), int(m), str(h), t) for k, s, m, h, t in zip(keys, sizes, mtimes, shas, thumbs, strict=True)}


def _write_cache(path: Path, entries: dict[str, tuple]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(k for k in entries if os.path.exists(k))  # forget files that are gone (temp trees)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                keys=np.array(keys, dtype=str),
                sizes=np.array([entries[k][0] for k in keys], dtype=np.int64),
                mtimes=np.array([entries[k][1] for k in keys], dtype=np.int64),
                shas=np.array([entries[k][2] for k in keys], dtype=str),
                thumbs=np.stack([entries[k][3] for k in keys]).astype(np.float32)
                if keys else np.zeros((0, THUMB_SIZE, THUMB_SIZE), np.float32),
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only runs folder must not stop training
        print(f"note: could not write fingerprint cache {path}: {exc}", file=sys.stderr)


def fingerprints(
    table: pd.DataFrame,
    root: str | os.PathLike,
    thumbs: bool = True,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[list[str], np.ndarray, dict[int, str]]:
    """sha256 and a 32x32 thumbnail of every row of ``table``.

    Returns ``(shas, thumbs (n, 32, 32) float32, errors)``; ``errors`` maps a row position to the
    decoding error of an unreadable image (its thumbnail is NaN). With ``thumbs=False`` no image
    is decoded. Results are cached on disk by absolute path, size and mtime.
    """
    root = Path(root)
    cpath = cache_path(cache_dir)
    stored = _read_cache(cpath) if cache else {}
    n = len(table)
    shas: list[str] = [""] * n
    out = np.full((n, THUMB_SIZE, THUMB_SIZE), np.nan, np.float32)
    errors: dict[int, str] = {}
    changed = False
    iterator = enumerate(table["path"])
    if progress:
        iterator = tqdm(iterator, total=n, desc="fingerprints", unit="img", file=sys.stderr)
    for i, rel in iterator:
        p = abspath(root, rel)
        key = str(p.resolve())
        try:
            size, mtime = _stat_key(p)
        except OSError as exc:  # vanished or unreadable since the table was made
            shas[i], errors[i] = f"unreadable:{i}", f"cannot read file ({exc.strerror or exc})"
            continue
        hit = stored.get(key)
        if hit and hit[0] == size and hit[1] == mtime:
            shas[i] = hit[2]
            out[i] = hit[3]
            if thumbs and np.isnan(hit[3]).all():
                errors[i] = "unreadable image (cached)"
            continue
        try:
            shas[i] = runs.sha256(p)
        except OSError as exc:
            shas[i], errors[i] = f"unreadable:{i}", f"cannot read file ({exc.strerror or exc})"
            continue
        if thumbs:
            try:
                out[i] = images.load(p, THUMB_SIZE)
            except images.ImageError as err:
                errors[i] = err.reason
            stored[key] = (size, mtime, shas[i], out[i])
            changed = True
    if cache and changed:
        _write_cache(cpath, stored)
    return shas, out, errors


def file_hashes(table: pd.DataFrame, root: str | os.PathLike, cache: bool = True) -> pd.Series:
    """sha256 hex digest of every file of ``table`` (a Series aligned with the table's index).

    Digests already in the fingerprint cache (same path, size and mtime) are not recomputed.
    """
    shas, _, _ = fingerprints(table, root, thumbs=False, cache=cache)
    return pd.Series(shas, index=table.index, name="sha256", dtype=object)


def thumbnail_correlation(thumbs: np.ndarray, threshold: float = NEAR_THRESHOLD) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, r)`` with i < j whose thumbnails correlate at ``r >= threshold``.

    Pearson correlation over the flattened thumbnails; rows with NaN (unreadable) or constant
    thumbnails never match. Computed in blocks so memory stays small for large pools.
    """
    n = len(thumbs)
    x = thumbs.reshape(n, -1).astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    bad = ~np.isfinite(norm[:, 0]) | (norm[:, 0] == 0)
    x = np.where(bad[:, None], 0.0, x / np.where(norm == 0, 1.0, norm))
    x = np.nan_to_num(x).astype(np.float32)
    pairs = []
    block = 1024
    for start in range(0, n, block):
        c = x[start:start + block] @ x.T
        ii, jj = np.nonzero(c >= threshold)
        for i, j in zip(ii + start, jj, strict=True):
            if i < j:
                pairs.append((int(i), int(j), float(c[i - start, j])))
    return pairs


def find_duplicates(
    table: pd.DataFrame,
    root: str | os.PathLike,
    near: bool = True,
    threshold: float = NEAR_THRESHOLD,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Exact (same sha256) and near (thumbnail correlation >= ``threshold``) duplicate pairs.

    Returns a DataFrame ``path_a, path_b, kind (exact|near), score`` where ``path_a`` comes first
    in the table (the copy that :func:`drop_exact_duplicates` keeps). Exact pairs have score 1.0.
    ``attrs["unreadable"]`` maps paths that could not be decoded to the reason.
    """
    shas, thumbs, errors = fingerprints(table, root, thumbs=near, cache=cache, cache_dir=cache_dir, progress=progress)
    paths = table["path"].tolist()
    rows = []
    first: dict[str, int] = {}
    exact = set()
    for i, h in enumerate(shas):
        if h in first:
            rows.append({"path_a": paths[first[h]], "path_b": paths[i], "kind": "exact", "score": 1.0})
            exact.add((first[h], i))
        else:
            first[h] = i
    if near:
        for i, j, r in thumbnail_correlation(thumbs, threshold):
            if shas[i] != shas[j]:
                rows.append({"path_a": paths[i], "path_b": paths[j], "kind": "near", "score": round(r, 5)})
    dups = pd.DataFrame(rows, columns=["path_a", "path_b", "kind", "score"])
    dups.attrs["unreadable"] = {paths[i]: reason for i, reason in errors.items()}
    return dups


def drop_exact_duplicates(table: pd.DataFrame, duplicates: pd.DataFrame) -> pd.DataFrame:
    """The table without the second copy (``path_b``) of every exact duplicate pair."""
    gone = set(duplicates.loc[duplicates["kind"] == "exact", "path_b"])
    out = table[~table["path"].isin(gone)].reset_index(drop=True)
    out.attrs = dict(table.attrs)
    dropped = dict(out.attrs.get("dropped", {}))
    if len(table) - len(out):
        dropped["exact duplicate"] = dropped.get("exact duplicate", 0) + len(table) - len(out)
    out.attrs["dropped"] = dropped
    return out


# ----------------------------------------------------------------------------- splitting
def split_groups(table: pd.DataFrame, duplicates: pd.DataFrame | None = None) -> pd.Series:
    """Group key of every row: patients linked by duplicate images are merged (union-find).

    Two rows share a group when they share a patient, or when their images are exact or near
    duplicates (then both patients' images are merged). The key is the smallest patient id of the
    group.
    """
    uf = _UnionFind()
    pid = dict(zip(table["path"], table["patient_id"].astype(str), strict=True))
    for p in pid.values():
        uf.find(p)
    if duplicates is not None:
        for a, b in zip(duplicates["path_a"], duplicates["path_b"], strict=True):
            if a in pid and b in pid:
                uf.union(pid[a], pid[b])
    return pd.Series([uf.find(p) for p in table["patient_id"].astype(str)], index=table.index, name="group")


def make_split(
    table: pd.DataFrame,
    seed: int = config.SEED,
    fractions: Sequence[float] = FRACTIONS,
    groups: Sequence | pd.Series | None = None,
    duplicates: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Add a ``split`` (train|val|test) and a ``group`` column: patient-level, label-stratified.

    Whole groups (default: :func:`split_groups`, i.e. patients merged through ``duplicates``) are
    assigned greedily, in seeded random order, to the split that brings the
    per-(source, label) counts closest to ``fractions``. Deterministic for a given seed.
    """
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test), not {fractions}")
    fr = fr / fr.sum()
    out = table.copy()
    out.attrs = dict(table.attrs)
    if groups is None:
        groups = split_groups(table, duplicates)
    out["group"] = np.asarray(groups, dtype=object) if not isinstance(groups, pd.Series) else groups.values
    if not len(out):
        out["split"] = pd.Series(dtype=object)
        return out
    strata = (out["source"].astype(str) + "/" + out["label"].astype(str)).values
    names, sidx = np.unique(strata, return_inverse=True)
    gnames, gidx = np.unique(out["group"].astype(str).values, return_inverse=True)
    counts = np.zeros((len(gnames), len(names)))
    np.add.at(counts, (gidx, sidx), 1)
    total = counts.sum(axis=0)
    target = fr[:, None] * total[None, :]  # (3, strata)
    weight = 1.0 / np.maximum(total, 1.0)  # small strata matter as much as large ones
    rng = np.random.default_rng(seed)
    # Random order, not largest first: largest-first packing sends every multi-image patient to
    # train (the split with most room) and leaves val/test with single-film patients only.
    order = rng.permutation(len(gnames))
    have = np.zeros_like(target)
    assign = np.empty(len(gnames), dtype=int)
    for g in order:
        best, best_cost = 0, np.inf
        for s in range(3):
            if fr[s] == 0:
                continue
            trial = have.copy()
            trial[s] += counts[g]
            # squared shortfall/excess per stratum + the same for split sizes
            cost = (((trial - target) ** 2) * weight).sum()
            cost += ((trial.sum(axis=1) - fr * total.sum()) ** 2).sum() / max(total.sum(), 1.0)
            if cost < best_cost - 1e-12:
                best, best_cost = s, cost
        assign[g] = best
        have[best] += counts[g]
    out["split"] = np.array(SPLITS, dtype=object)[assign[gidx]]
    return out


def save_split(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the split file (CSV ``path,split,label,source,patient_id,group``) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = [c for c in SPLIT_COLUMNS + ["fold"] if c in table.columns]  # fold: cross-validated runs
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".csv.tmp")
    with os.fdopen(fd, "w", newline="") as f:
        table[cols].sort_values("path").to_csv(f, index=False)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def load_split(path: str | os.PathLike) -> pd.DataFrame:
    """Read a split file; raises ValueError naming the file when it is not a valid split file."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"split file {path} does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"split file {path} is not a readable CSV ({exc})") from None
    missing = {"path", "split"} - set(df.columns)
    if missing:
        raise ValueError(f"split file {path} lacks column(s) {sorted(missing)}")
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        raise ValueError(f"split file {path} has unknown split name(s) {bad}; expected {list(SPLITS)}")
    if df["path"].duplicated().any():
        raise ValueError(f"split file {path} lists {int(df['path'].duplicated().sum())} path(s) twice")
    return df


def apply_split(table: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    """Give ``table`` the splits of a split file; rows the file does not list are dropped (counted)."""
    cols = ["path", "split"] + (["group"] if "group" in split.columns else [])
    merged = table.drop(columns=[c for c in ("split", "group") if c in table.columns]).merge(
        split[cols], on="path", how="inner"
    )
    if "group" not in merged.columns:
        merged["group"] = merged["patient_id"]
    merged.attrs = dict(table.attrs)
    dropped = dict(merged.attrs.get("dropped", {}))
    if len(table) - len(merged):
        dropped["not in split file"] = len(table) - len(merged)
    merged.attrs["dropped"] = dropped
    merged.attrs["split_missing"] = int(len(split) - len(merged))  # listed but absent from the data
    return merged


def prepare(
    root: str | os.PathLike,
    seed: int = config.SEED,
    split_file: str | os.PathLike | None = None,
    near: bool = True,
    fractions: Sequence[float] = FRACTIONS,
    sources: Sequence[str] | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    label_map: dict[str, str] | None = None,
) -> pd.DataFrame:
    """The table training and evaluation use: images, labels and a ``split`` column.

    :func:`core.datasets.load_table`, then, if ``split_file`` exists, its splits are applied
    (rows it does not list are dropped). Otherwise patients are grouped through exact and near
    duplicates on the full table (:func:`split_groups`), then exact duplicates and unreadable
    images are dropped (with ``near=True``, the default, every image is decoded once for the
    near-duplicate check), and a fresh seeded split of those groups is made; when
    ``split_file`` is given but absent, the new split is written there.

    ``sources`` and ``label_map`` are passed to :func:`core.datasets.load_table`. ``attrs``:
    ``dropped`` (counts by reason), ``duplicates`` (list of pair dicts; fresh splits only),
    ``unreadable`` (path -> reason), ``sources``.
    """
    table = load_table(root, sources=sources, label_map=label_map)
    if split_file is not None and Path(split_file).exists():
        out = apply_split(table, load_split(split_file))
        if len(table) and not len(out):
            raise ValueError(f"split file {split_file} lists none of the {len(table)} images under {root}")
        return out
    dups = find_duplicates(table, root, near=near, cache=cache, cache_dir=cache_dir, progress=progress)
    # Group on the full table, then drop: two patients joined only by an exact copy stay one group
    # even though the copy itself is dropped.
    table = table.assign(group=split_groups(table, dups).to_numpy())
    table = drop_exact_duplicates(table, dups)
    unreadable = dups.attrs.get("unreadable", {})
    if unreadable:
        attrs = dict(table.attrs)
        table = table[~table["path"].isin(unreadable)].reset_index(drop=True)
        table.attrs = attrs
        table.attrs["dropped"] = {**attrs.get("dropped", {}), "unreadable image": len(unreadable)}
    out = make_split(table, seed=seed, fractions=fractions, groups=table["group"])
    out.attrs["duplicates"] = dups.to_dict("records")
    out.attrs["unreadable"] = dict(unreadable)
    out.attrs["seed"] = int(seed)
    if split_file is not None:
        save_split(out, split_file)
    return out


def assign_folds(table: pd.DataFrame, k: int, seed: int = config.SEED) -> np.ndarray:
    """Cross-validation fold (0..k-1) of every development row (``split`` != test); -1 for test rows.

    Folds are patient-grouped (the ``group`` column, else ``patient_id``: a patient, and every
    patient linked to it, lies in one fold) and stratified by source and label
    (``StratifiedGroupKFold``), so that each fold holds every source x label cell in about the
    same share. Deterministic for a given seed.
    """
    # lazy: sklearn costs ~1.1 s; `python -m core.data` (which imports this module) needs none of it
    from sklearn.model_selection import StratifiedGroupKFold

    folds = np.full(len(table), -1, dtype=int)
    dev = np.flatnonzero((table["split"] != "test").to_numpy())
    if len(dev) == 0:
        return folds
    d = table.iloc[dev]
    strata = (d["source"].astype(str) + "/" + d["label"].astype(str)).to_numpy()
    groups = (d["group"] if "group" in d.columns else d["patient_id"]).astype(str).to_numpy()
    if len(np.unique(groups)) < k:
        raise ValueError(f"{len(np.unique(groups))} patient groups cannot fill {k} folds")
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, held) in enumerate(cv.split(np.zeros(len(d)), strata, groups)):
        folds[dev[held]] = f
    return folds
