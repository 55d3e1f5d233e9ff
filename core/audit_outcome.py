"""Trust by outcome: do wrong calls come with worse maps?

The audit's trust measures (heat in the lungs, ROAD, the pointing game) are split by the
outcome of each film at the run's operating point (its validation-chosen threshold on
P(explained class), 0.5 without one): true and false positives and negatives, and the
right (TP + TN) and wrong (FP + FN) calls pooled. Per method and outcome: ``n`` and, per
measure, the mean with a patient-grouped bootstrap CI (:func:`core.audit_steps.mean_ci`).

Everything is read from the audit's per-image table (``audit.csv``: one row per image and
method), so the step also runs on its own over an audited run, without the images::

    python -m core.audit_outcome --run assets/model [--json]

which recomputes ``by_outcome`` from ``audit.csv`` and stores it in the run's ``audit.json``.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pandas as pd

from core import runs
from core.audit_steps import mean_ci

OUTCOMES = ("TP", "FP", "TN", "FN")
POOLED = {"right": ("TP", "TN"), "wrong": ("FP", "FN")}
# audit.csv column -> what it measures; a column the table lacks (an audit without ROAD) is left out
MEASURES = {
    "in_lung_share": "share of the heat in the lungs",
    "road_combined": "ROAD combined (higher = more faithful)",
    "lungs_hit": "pointing game: peak in the lung mask",
    "boxes_hit": "pointing game: peak in the expert lung boxes",
}
SCORE = "p_covid_original"  # P(explained class) of the unaltered film, as audit.csv stores it


def outcomes(y, p, threshold: float) -> np.ndarray:
    """'TP', 'FP', 'TN' or 'FN' per film: ``y`` 1 = the explained class, called positive when ``p >= threshold``."""
    y = np.asarray(y, int) == 1
    called = np.asarray(p, float) >= threshold
    return np.where(called, np.where(y, "TP", "FP"), np.where(y, "FN", "TN"))


def _measures(sub: pd.DataFrame, columns, n_boot: int) -> dict:
    """n, and per measure the mean with a patient-grouped CI over the films where it is defined."""
    out = {"n": int(len(sub))}
    for col in columns:
        v = sub[col].to_numpy(float)
        ok = np.isfinite(v)
        out[col] = mean_ci(v[ok], sub["group"].astype(str).to_numpy()[ok], n_boot) if ok.any() else \
            mean_ci([], None, n_boot)
    return out


def by_outcome(table: pd.DataFrame, threshold: float | None, explained: str, n_boot: int = 1000) -> dict:
    """The trust measures per method and outcome from the audit's per-image ``table`` (audit.csv).

    ``explained`` is the explained (positive) class; films of it are positives. Returns
    ``{"threshold", "score", "measures", "counts", "methods": {method: {outcome: {"n", measure: ci}}},
    "sentence"}``; outcomes with no film are left out.
    """
    threshold = 0.5 if threshold is None else float(threshold)
    columns = [c for c in MEASURES if c in table and table[c].notna().any()]
    t = table.assign(outcome=outcomes((table["class"].astype(str) == explained).astype(int), table[SCORE], threshold))
    methods = {}
    for method, sub in t.groupby("method", sort=False):
        per = {}
        for name, members in [(o, (o,)) for o in OUTCOMES] + list(POOLED.items()):
            rows = sub[sub["outcome"].isin(members)]
            if len(rows):
                per[name] = _measures(rows, columns, n_boot)
        methods[str(method)] = per
    first = t[t["method"] == t["method"].iloc[0]] if len(t) else t
    counts = {o: int((first["outcome"] == o).sum()) for o in OUTCOMES}
    out = {"threshold": threshold, "score": f"P({explained})", "measures": {c: MEASURES[c] for c in columns},
           "counts": counts, "methods": methods}
    out["sentence"] = sentence(out)
    return out


def sentence(res: dict) -> str:
    """One plain sentence: are the maps of wrong calls worse than those of right calls (first method, heat in lungs)?"""
    if not res["methods"]:
        return "No film to split by outcome."
    method, per = next(iter(res["methods"].items()))
    right, wrong = (per.get(k, {}).get("in_lung_share") for k in ("right", "wrong"))
    if not right or not wrong or not right["n"] or not wrong["n"]:
        return f"Every call at threshold {res['threshold']:.2f} was right: there are no wrong calls to compare."
    if wrong["ci_high"] < right["ci_low"]:
        how = "less of their heat in the lungs than right calls"
    elif wrong["ci_low"] > right["ci_high"]:
        how = "more of their heat in the lungs than right calls"
    else:
        how = "about as much of their heat in the lungs as right calls (the 95% CIs overlap)"
    return (f"{method}: the {wrong['n']} wrong calls put {wrong['value']:.0%} of their heat in the lungs against "
            f"{right['value']:.0%} for the {right['n']} right ones: wrong calls come with {how}.")


def outcome_step(ctx: dict, table: pd.DataFrame, n_boot: int = 1000) -> dict:
    """Step 10 of :func:`core.audit.run_audit`: :func:`by_outcome` at the run's threshold."""
    return by_outcome(table, ctx["handle"].threshold, ctx["classes"][ctx.get("ci", 0)], n_boot)


def update_run(run=None, n_boot: int = 1000) -> dict:
    """Recompute ``by_outcome`` from an audited run's ``audit.csv`` and store it in its ``audit.json``."""
    handle = runs.open_run(run)
    summary = handle.audit()
    table = handle.audit_table()
    if summary is None or table is None:
        raise runs.RunError(f"{handle.label} has not been audited (no audit.json / audit.csv): run python -m core.audit")
    missing = [c for c in ("method", "class", "group", SCORE) if c not in table]
    if missing:
        raise runs.RunError(f"{handle.file('audit.csv')}: no column {', '.join(missing)} (rerun python -m core.audit)")
    explained = summary.get("explained_class") or handle.positive
    summary["by_outcome"] = by_outcome(table, handle.threshold, explained, n_boot)
    runs.write_json(handle.file("audit.json"), summary)
    return summary["by_outcome"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.audit_outcome",
        description="Trust by outcome: split an audited run's trust measures (heat in lungs, ROAD, pointing game) "
                    "by true/false positives and negatives at its threshold, from audit.csv, and store the result "
                    "under by_outcome in its audit.json (no images needed).")
    parser.add_argument("--run", help="run folder or name (default: the shipped model, assets/model)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print by_outcome as one JSON object")
    args = parser.parse_args(argv)
    try:
        res = update_run(args.run, args.n_boot)
    except (FileNotFoundError, ValueError, runs.RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, default=float) if args.json else res["sentence"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
