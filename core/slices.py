"""Where does the model fail? AUC, sensitivity and specificity per slice of the test split.

A slice is a set of test images that share values of metadata columns: ``source``, ``view``,
``age_group``, ``label`` and any of :data:`COLUMNS` the data table has (``sex`` when the reader
provides it). :func:`slice_metrics` scores every one-column and two-column slice and every
full cell (all columns fixed), with 95% patient-bootstrap CIs (``core.metrics.bootstrap``); a
slice with exactly the same images as a simpler one is listed once, under the simpler name.

**Flag rule** (:func:`flag`): a metric of a slice is flagged when the slice has at least
:data:`MIN_N` images, at least :data:`MIN_CLASS` images of each class the metric needs
(positives for sensitivity, negatives for specificity, both for AUC), and its 95% CI lies
entirely below the same metric on the *rest* of the test split (the images outside the slice)
with a gap of at least :data:`MIN_GAP` between the two point values.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from core import config, metrics

COLUMNS = ("source", "view", "age_group", "sex", "label")
METRICS = ("roc_auc", "sensitivity", "specificity")
MIN_N = 10
MIN_CLASS = 5
MIN_GAP = 0.10
MAX_PATHS = 200  # misclassified images kept per flagged slice


def _needs(metric: str, n_pos: int, n_neg: int) -> bool:
    if metric == "sensitivity":
        return n_pos >= MIN_CLASS
    if metric == "specificity":
        return n_neg >= MIN_CLASS
    return n_pos >= MIN_CLASS and n_neg >= MIN_CLASS


def _slices(table: pd.DataFrame, columns: list[str]):
    """(name, {column: value}, bool mask) for 1- and 2-column slices and the full cells."""
    depths = sorted({1, min(2, len(columns)), len(columns)})
    for depth in depths:
        for cols in itertools.combinations(columns, depth):
            for values, idx in table.groupby(list(cols), sort=True, dropna=False).groups.items():
                values = values if isinstance(values, tuple) else (values,)
                spec = {c: str(v) for c, v in zip(cols, values, strict=True)}
                mask = table.index.isin(idx)
                yield " & ".join(f"{c}={v}" for c, v in spec.items()), spec, mask


def slice_metrics(table: pd.DataFrame, y, p, groups, threshold: float, columns=None, n_boot: int = 1000,
                  seed: int = config.SEED) -> dict:
    """Metrics per slice of ``table`` (one row per test image, with the metadata columns).

    ``y`` (1 = COVID-19), ``p`` (P(covid)), ``groups`` (patients) align with ``table``'s rows;
    ``threshold`` decides sensitivity and specificity (the run's validation-chosen one).
    Returns ``{threshold, columns, rule, slices: [...], flagged: [...]}``; each slice holds
    ``name``, ``columns``, ``n``, ``n_pos``, ``n_neg``, ``metrics`` (value/ci_low/ci_high),
    ``rest`` (point values on the other images), ``flags`` and, when flagged, ``paths`` (its
    misclassified images), ``false_positives`` and ``false_negatives``.
    """
    table = table.reset_index(drop=True)
    y = np.asarray(y, int)
    p = np.asarray(p, float)
    groups = np.asarray(groups, dtype=object)
    cols = [c for c in (columns or COLUMNS) if c in table.columns and table[c].notna().any()]
    table = table.assign(**{c: table[c].fillna("unknown").astype(str) for c in cols})
    seen: dict[bytes, str] = {}
    out = []
    for name, spec, mask in _slices(table, cols):
        key = np.packbits(mask).tobytes()
        if key in seen or mask.all():
            continue
        seen[key] = name
        n_pos, n_neg = int(y[mask].sum()), int((1 - y[mask]).sum())
        m = metrics.bootstrap(y[mask], p[mask], groups[mask], threshold, METRICS, n_boot, seed)
        rest = metrics.bootstrap(y[~mask], p[~mask], groups[~mask], threshold, METRICS, 0, seed)
        s = {"name": name, "columns": spec, "n": int(mask.sum()), "n_pos": n_pos, "n_neg": n_neg,
             "metrics": m, "rest": {k: v["value"] for k, v in rest.items()}}
        s["flags"] = flag(s)
        if s["flags"] and "path" in table:
            called = p >= threshold
            fp, fn = mask & called & (y == 0), mask & ~called & (y == 1)
            s["false_positives"] = table.loc[fp, "path"].astype(str).tolist()[:MAX_PATHS]
            s["false_negatives"] = table.loc[fn, "path"].astype(str).tolist()[:MAX_PATHS]
            s["paths"] = table.loc[fp | fn, "path"].astype(str).tolist()[:MAX_PATHS]
        out.append(s)
    return {"threshold": float(threshold), "columns": cols, "rule": RULE,
            "slices": out, "flagged": [s["name"] for s in out if s["flags"]]}


RULE = (f"a slice's metric is flagged when the slice has >= {MIN_N} images and >= {MIN_CLASS} of each class "
        f"the metric needs, its 95% CI lies entirely below the value on the rest of the test split, and the "
        f"gap between the two is >= {MIN_GAP:.2f}")


def flag(s: dict) -> list[str]:
    """The metrics of slice ``s`` that fail the flag rule (module docstring)."""
    if s["n"] < MIN_N:
        return []
    out = []
    for k in METRICS:
        v, rest = s["metrics"][k], s["rest"].get(k)
        if not _needs(k, s["n_pos"], s["n_neg"]) or rest is None or not np.isfinite(rest):
            continue
        hi = v.get("ci_high")
        if hi is not None and np.isfinite(hi) and hi < rest and rest - v["value"] >= MIN_GAP:
            out.append(k)
    return out
