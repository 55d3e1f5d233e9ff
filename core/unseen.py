"""Which images of a data root a run never saw: the input of an external validation (core.evaluate).

Images are left out when the run trained, validated or tested on them, on a film of their
patient, or on a copy of them (byte-identical, or resized/re-encoded: the splitter's thumbnail
correlation); :func:`unseen_images` counts each reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core import datasets, runs, safepath, splits


def seen_images(run: runs.Run) -> pd.DataFrame | None:
    """The run's split.csv (all images it trained, validated or tested on), if present."""
    return run.split() if run.has("split.csv") else None


def unseen_images(run, data_root: Path, progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """Images of ``data_root`` the run never saw, for an external validation.

    On the run's own data root, images of the sources in its split.csv are left out (those the
    ``--limit`` skipped are not external either); on another root, the images listed in its
    split.csv (same source and path). Then, on either root, images of a patient the run saw (any
    single id of a joined patient id, so a hannover film of an ieee8023 patient the run trained on
    is excluded) and, when the run's own data root is readable, copies of an image it saw:
    byte-identical, or near-duplicates by the splitter's own check (32x32 thumbnail correlation
    >= ``splits.NEAR_THRESHOLD``), which is how a public film usually reappears in another
    collection (resized, re-encoded). Each image is counted under the first reason that applies.

    Returns ``(table, excluded)``: ``excluded`` counts left-out images by reason; the table has a
    ``group`` column (patients joined through copies among the unseen images, for the bootstrap),
    ``attrs["near_duplicates"]`` (path, run_path, score of every near-duplicate left out) and
    ``attrs["unchecked"]`` (why copies could not be looked for, else None).
    """
    run = runs.open_run(run)
    table = datasets.load_table(data_root)
    excluded: dict[str, int] = {}
    seen = seen_images(run)
    own_root = run.recorded_data_root

    def drop(mask, reason):
        nonlocal table
        mask = np.asarray(mask, bool)
        if mask.any():
            excluded[reason] = excluded.get(reason, 0) + int(mask.sum())
        table = table[~mask]

    near_pairs, unchecked, within = [], None, None
    if seen is not None and len(seen):
        # an adopted run's split lists the films it trained on, not whole sources (core.adopt --trained-on)
        if own_root is not None and own_root == data_root.resolve() and "source" in seen.columns and not run.adopted:
            drop(table["source"].isin(set(seen["source"])), "source the run trained on (same data root)")
        else:
            src = seen["source"].astype(str) if "source" in seen.columns else pd.Series("", index=seen.index)
            seen_keys = set(src + "|" + seen["path"].astype(str))
            key = (table["source"].astype(str) if "source" in seen.columns else "") + "|" + table["path"].astype(str)
            drop(key.isin(seen_keys), "listed in the run's split.csv")
        if "patient_id" in seen.columns and len(table):
            parts = {q for p in seen["patient_id"].astype(str) if p not in ("", "nan") for q in datasets.patient_parts(p)}
            drop([bool(parts.intersection(datasets.patient_parts(p))) for p in table["patient_id"].astype(str)],
                 "patient seen by the run")
        if len(table) and own_root is not None and own_root.is_dir():
            seen_rows = seen[[safepath.film_stamp(own_root, str(p)) is not None for p in seen["path"]]]
            byte, near_pairs, within = _copies_of_seen(table, data_root, seen_rows, own_root, progress)
            near = table["path"].isin({p["path"] for p in near_pairs}).to_numpy()
            drop(byte, "byte-identical to an image of the run")
            drop(near[~byte], f"near-duplicate of an image of the run (thumbnail r >= {splits.NEAR_THRESHOLD})")
        elif len(table):
            unchecked = (f"the run's data root {own_root or '(not recorded)'} is not readable here: copies of its "
                         "images (byte-identical or resized/re-encoded) could not be looked for")
    table = table.reset_index(drop=True)
    table["group"] = splits.split_groups(table, within).to_numpy()
    table.attrs["near_duplicates"] = near_pairs
    table.attrs["unchecked"] = unchecked
    return table, excluded


def _copies_of_seen(table: pd.DataFrame, root: Path, seen: pd.DataFrame, seen_root: Path,
                    progress: bool = False) -> tuple[np.ndarray, list[dict], pd.DataFrame]:
    """Which rows of ``table`` copy an image of ``seen``: ``(byte-identical mask, near pairs,
    duplicate pairs among the table's own rows)``, with the splitter's fingerprints and
    thumbnail correlation (one pass over seen + table)."""
    sha_t, th_t, _ = splits.fingerprints(table, root, progress=progress)
    sha_s, th_s, _ = splits.fingerprints(seen, seen_root, progress=progress) if len(seen) else ([], th_t[:0], {})
    byte = np.isin(np.asarray(sha_t, dtype=object), list(set(sha_s)))
    n, paths, run_paths = len(seen), table["path"].tolist(), seen["path"].tolist()
    best: dict[int, tuple[float, int]] = {}
    within = []
    for i, j, r in splits.thumbnail_correlation(np.concatenate([th_s, th_t])):
        if i < n <= j and not byte[j - n] and r > best.get(j - n, (-1.0, 0))[0]:
            best[j - n] = (r, i)
        elif i >= n:
            within.append({"path_a": paths[i - n], "path_b": paths[j - n], "kind": "near", "score": r})
    first: dict[str, str] = {}
    for p, h in zip(paths, sha_t, strict=True):
        if h in first:
            within.append({"path_a": first[h], "path_b": p, "kind": "exact", "score": 1.0})
        first.setdefault(h, p)
    near = [{"path": paths[k], "run_path": run_paths[i], "score": round(r, 4)} for k, (r, i) in sorted(best.items())]
    return byte, near, pd.DataFrame(within, columns=["path_a", "path_b", "kind", "score"])
