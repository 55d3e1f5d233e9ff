"""The data of a training run: the split and folds, the ``--limit`` subset, sample weights, the pixels.

:func:`prepare_table` turns the data root into the development table (with its cross-validation
folds) and the external table; :func:`load_data` adds the prepared pixels
(:func:`core.image_cache.prepare_images`); :func:`sample_weights` balances classes and sources.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core import config, inputs, splits
from core.image_cache import prepare_images

# The development set is the whole non-test part of the split: validation comes from the folds.
SPLIT_FRACTIONS = (0.8, 0.0, 0.2)


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def subset(table: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """At most ``limit`` images per (split, source, label) cell, sampled with ``seed`` (quick runs)."""
    if not limit or table.empty:
        return table
    parts = []
    for _, g in table.groupby(["split", "source", "label"], sort=True):
        parts.append(g.sample(n=min(limit, len(g)), random_state=seed))
    return pd.concat(parts).sort_index()


def sample_weights(table: pd.DataFrame, classes: tuple[str, ...], balance: str) -> np.ndarray:
    """Per-image weights with mean 1.

    ``class``: every class has the same total weight. ``source``: also, within a class, every
    source has the same share, so a source rare in one class (ieee8023 pneumonia) counts as much
    as the others: the model gains nothing by learning the source.
    ``none``: all ones.
    """
    n = len(table)
    if balance == "none" or n == 0:
        return np.ones(n, np.float32)
    w = np.zeros(n, np.float64)
    cls = table["class"].to_numpy()
    src = table["source"].to_numpy()
    present = [c for c in classes if (cls == c).any()]
    for c in present:
        in_c = cls == c
        if balance == "class":
            w[in_c] = 1.0 / (len(present) * in_c.sum())
        elif balance == "source":
            srcs = sorted(set(src[in_c]))
            for s in srcs:
                cell = in_c & (src == s)
                w[cell] = 1.0 / (len(present) * len(srcs) * cell.sum())
        else:
            raise ValueError(f"unknown balance {balance!r}; choose class, source or none")
    return (w * n / w.sum()).astype(np.float32)


def prepare_table(cfg: dict, root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(development + test table with a ``fold`` column, external table) for a config.

    The split (dev/test by patient), the held-out source, the ``--limit`` subset, class indices
    and the cross-validation folds of the development set (``fold`` -1 on test rows).
    """
    table = splits.prepare(root, seed=cfg["split_seed"], split_file=cfg.get("split_file"),
                           fractions=SPLIT_FRACTIONS).copy()
    excluded = set(cfg.get("exclude_sources") or [])
    if excluded - set(table["source"]):
        raise ValueError(f"excluded source(s) {sorted(excluded - set(table['source']))} not in the data; "
                         f"sources: {sorted(set(table['source']))}")
    # dropped after the split is made, so every other image keeps the split it has in the full data
    table = table[~table["source"].isin(excluded)].copy()
    hold = cfg.get("holdout_source")
    if hold:
        if hold not in set(table["source"]):
            raise ValueError(f"holdout source {hold!r} not in the data; sources: {sorted(set(table['source']))}")
        external = table[table["source"] == hold].copy()
        external["split"] = "external"
        table = table[table["source"] != hold].copy()
    else:
        external = table.iloc[:0].copy()
    # a split file made with a validation split: its val images join the development set
    table.loc[table["split"] == "val", "split"] = "train"
    table = subset(table, cfg.get("limit"), cfg["split_seed"])
    external = subset(external, cfg.get("limit"), cfg["split_seed"])
    classes = config.classes(cfg["task"])
    for t in (table, external):
        t["class"] = [config.label_to_class(lab, cfg["task"]) for lab in t["label"]]
        t["y"] = np.array([classes.index(c) for c in t["class"]], dtype=np.int64)
    table = table.reset_index(drop=True)
    table["fold"] = splits.assign_folds(table, int(cfg["folds"]), int(cfg["split_seed"]))
    external["fold"] = -1
    return table, external.reset_index(drop=True)


def load_data(cfg: dict, root: Path, cache_dir: Path | None) -> dict:
    """The tables and prepared pixels of a run: ``dev``/``x_dev`` (with folds), ``rest``/``x_rest`` (test, external)."""
    table, external = prepare_table(cfg, root)
    both = pd.concat([table, external], ignore_index=True)
    t0 = time.time()
    x, boxes, fell_back, kept, errors = prepare_images(
        root, both["path"].tolist(), int(cfg["size"]), inputs.settings(cfg), cache_dir, progress=cfg["verbose"] > 0)
    for err in errors:
        log(f"skipped {err}")
    both = both.iloc[kept].reset_index(drop=True)
    both[["box_y0", "box_x0", "box_y1", "box_x1"]] = boxes
    both["crop_fell_back"] = fell_back
    is_dev = (both["split"] == "train").to_numpy()
    dev, rest = both[is_dev].reset_index(drop=True), both[~is_dev].reset_index(drop=True)
    if len(dev) == 0:
        raise ValueError("the split has no development (training) images")
    return {"dev": dev, "x_dev": x[is_dev], "rest": rest, "x_rest": x[~is_dev], "errors": errors,
            "prepare_seconds": time.time() - t0}
