"""A map of the model's features: every scored film of a run as a point in 2-D, so that a reader
sees whether the collections form islands.

One pass over the run's films (predictions.csv: test and development films, or an adopted run's
scored films) reads their penultimate features (:func:`core.neighbours.film_features`); the same
pass writes the neighbour index (:func:`core.neighbours.write_index`, development films). The
features are standardised and scaled to unit length (as the neighbours see them) and embedded in
2-D by t-SNE (:data:`METHOD`; chosen over PCA and UMAP by ``tests/benchmarks/bench_neighbours.py``:
time against how well the map keeps each film's nearest neighbours,
:func:`sklearn.manifold.trustworthiness` at :data:`TRUST_K` neighbours; on the shipped run's 1,112
films t-SNE keeps 0.964, UMAP 0.951 (and needs numba), PCA 0.921).

Written into the run: ``feature_map.csv`` (path, split, source, label, p, call, outcome, x, y) and
the summary under ``feature_map`` in ``audit.json`` (:func:`audit_step` inside ``core.audit``; the
CLI adds it to an existing audit.json without running the whole audit).

CLI::

    python -m core.feature_map [--run RUN] [--data DIR] [--method tsne|pca] [--json]
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE, trustworthiness

from core import config, images, neighbours, runs

MAP_FILE = "feature_map.csv"
METHOD = "tsne"
METHODS = ("tsne", "pca")
TRUST_K = 10  # neighbours whose keeping the trustworthiness score measures
PERPLEXITY = 30.0
TSNE_ITER = 500  # half sklearn's default: the same trustworthiness on the shipped run's films (0.964), half the time
PCA_FIRST = 50  # t-SNE runs on the first 50 principal components (its usual speed-up; little is lost)
OUTCOMES = {(True, True): "true positive", (False, True): "false positive", (True, False): "false negative",
            (False, False): "true negative"}


def embed(unit: np.ndarray, method: str = METHOD, seed: int = config.SEED, max_iter: int = TSNE_ITER) -> np.ndarray:
    """2-D coordinates (n, 2) of unit-length features (n, d) by ``method`` (tsne or pca; ``max_iter``:
    t-SNE's iterations)."""
    x = np.asarray(unit, np.float32)
    if method not in METHODS:
        raise ValueError(f"unknown map method {method!r}; choose from {METHODS}")
    if len(x) < 5:  # too few films for t-SNE (an audit under --limit): a row of points
        return np.c_[np.arange(len(x), dtype=np.float32), np.zeros(len(x), np.float32)]
    if method == "pca":
        return PCA(2, random_state=seed).fit_transform(x)
    if x.shape[1] > PCA_FIRST and len(x) > PCA_FIRST:
        x = PCA(PCA_FIRST, random_state=seed).fit_transform(x)
    perplexity = min(PERPLEXITY, max(2.0, (len(x) - 1) / 3.0))  # t-SNE needs perplexity < n
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed, max_iter=max_iter).fit_transform(x)


def keeps_neighbours(unit: np.ndarray, xy: np.ndarray, k: int = TRUST_K) -> float:
    """How well the map keeps each film's ``k`` nearest neighbours (trustworthiness, 1 = all kept)."""
    k = int(min(k, (len(xy) - 1) // 2 - 1))
    return float(trustworthiness(unit, xy, n_neighbors=k)) if k >= 1 else float("nan")


def outcomes(run, rows: pd.DataFrame) -> pd.DataFrame:
    """``p`` (P of the positive class), ``call`` and ``outcome`` (true/false positive/negative at the
    run's operating point; empty without one) of each row of predictions.csv."""
    run = runs.open_run(run)
    col = f"p_{run.positive}"
    p = rows[col].to_numpy(float) if col in rows else np.full(len(rows), np.nan)
    truth = rows["label"].astype(str).isin(neighbours.positive_labels(run)).to_numpy()
    if run.threshold is None:
        return pd.DataFrame({"p": p, "call": "", "outcome": ""})
    called = p >= run.threshold
    return pd.DataFrame({"p": p, "call": np.where(called, run.positive, f"not {run.positive}"),
                         "outcome": [OUTCOMES[(bool(c), bool(t))] for c, t in zip(called, truth, strict=True)]})


def compute(run, rows: pd.DataFrame, data=None, method: str = METHOD, progress: bool = True,
            index: bool = True) -> tuple[pd.DataFrame, dict]:
    """The map of the films ``rows`` (predictions.csv rows), and its summary.

    With ``index``, the neighbour index of the run is written from the same features (its
    development rows among ``rows``, else all of them). Returns ``(table, summary)``: the table
    has one row per film that could be read (path, split, source, label, p, call, outcome, x, y).
    """
    run = runs.open_run(run)
    t0 = time.perf_counter()
    feats, kept = neighbours.film_features(run, rows, run.data_root(data), progress)
    summary = {"file": MAP_FILE, "method": method, "n": int(len(kept)), "n_unreadable": int(len(rows) - len(kept))}
    rows = rows.iloc[kept].reset_index(drop=True)
    t_feat = time.perf_counter() - t0
    if index:
        ref = neighbours.reference_rows(rows)
        pick = rows.index[rows["path"].isin(ref["path"])]
        neighbours.write_index(run, feats[pick], rows.iloc[pick].reset_index(drop=True))
        summary["neighbours"] = {"file": neighbours.INDEX_FILE, "n": int(len(pick))}
    unit = neighbours.standardise(feats, feats.mean(axis=0), np.maximum(feats.std(axis=0), 1e-6))
    t1 = time.perf_counter()
    xy = embed(unit, method)
    t_map = time.perf_counter() - t1
    table = rows[["path", "split", "source", "label"]].astype(str).join(outcomes(run, rows))
    table["x"], table["y"] = xy[:, 0], xy[:, 1]
    summary.update({"n_by_split": {str(k): int(v) for k, v in table["split"].value_counts().items()},
                    "trustworthiness": keeps_neighbours(unit, xy), "trust_k": TRUST_K,
                    "seconds": {"features": round(t_feat, 2), "map": round(t_map, 2)}})
    return table, summary


def write(run, table: pd.DataFrame, summary: dict) -> None:
    """feature_map.csv into the run, and the summary under ``feature_map`` of an existing audit.json."""
    run = runs.open_run(run)
    runs.write_csv(run.file(MAP_FILE), table.round({"x": 4, "y": 4, "p": 5}))
    audit = run.audit()
    if audit is not None:
        audit["feature_map"] = summary
        runs.write_json(run.file("audit.json"), audit)


def audit_step(ctx: dict, progress: bool = True, write_files: bool = True) -> dict:
    """The feature-map step of :func:`core.audit.run_audit`: every scored film of the run (only the
    audited test films under ``--limit``, and then no neighbour index), written as feature_map.csv
    and the neighbour index; returns the summary for audit.json. A model without reachable
    penultimate features (a black box) gets ``reason`` instead."""
    handle = ctx["handle"]
    rows = ctx["test"] if ctx.get("limit") else handle.predictions()
    try:
        table, summary = compute(handle, rows, ctx["root"], progress=progress,
                                 index=write_files and not ctx.get("limit"))
    except (runs.RunError, FileNotFoundError) as exc:
        return {"reason": str(exc)}
    if write_files:
        runs.write_csv(handle.file(MAP_FILE), table.round({"x": 4, "y": 4, "p": 5}))
    return summary


def load(run) -> pd.DataFrame | None:
    """The run's feature_map.csv; None when absent, RunError when corrupt."""
    run = runs.open_run(run)
    if not run.has(MAP_FILE):
        return None
    try:
        table = pd.read_csv(run.file(MAP_FILE), dtype={"path": str})
    except Exception as exc:  # pandas raises many parser errors
        raise runs.RunError(f"{run.label} has a corrupt {MAP_FILE} ({exc}).") from None
    if not {"path", "x", "y"} <= set(table.columns):
        raise runs.RunError(f"{run.label} has a {MAP_FILE} without the columns path, x and y.")
    return table


def main(argv=None) -> int:
    p = neighbours.cli_parser(
        "python -m core.feature_map",
        f"Map of the model's features: every scored film of a run in 2-D ({MAP_FILE}), and the "
        f"neighbour index ({neighbours.INDEX_FILE}) from the same features; the summary goes under "
        "'feature_map' in the run's audit.json when it has one. The step of core.audit, alone.",
    )
    p.add_argument("--method", default=METHOD, choices=METHODS, help="2-D embedding (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        run = runs.open_run(args.run)
        table, summary = compute(run, run.predictions(), args.data, args.method, progress=not args.json)
        write(run, table, summary)
    except (FileNotFoundError, runs.RunError, images.ImageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary) if args.json else
          f"wrote {run.file(MAP_FILE)} ({summary['n']} films, {summary['method']}, trustworthiness "
          f"{summary['trustworthiness']:.3f} at k={TRUST_K}; features {summary['seconds']['features']} s, "
          f"map {summary['seconds']['map']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
