"""Summarise runs: headline metrics per run and mean ± sd over runs (seed spread).

    .venv/bin/python tests/benchmarks/bench_seeds.py RUN [RUN ...] [--val-only]

Reads each run's config.json and metrics.json (written by core.evaluate) and prints ONE JSON
object: ``runs`` (one row per run: seed, best epoch, validation scores, test metrics with CIs)
and ``summary`` (mean, sd, n of every headline metric). ``--val-only`` prints validation numbers
only, which is what configurations and the shipped seed are selected on (never test numbers).
This is how the seed-spread table of assets/MODEL_CARD.md is produced.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HEADLINE = ("roc_auc", "pr_auc", "sensitivity", "specificity", "accuracy", "f1", "ece", "brier")


def _v(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    if isinstance(d, dict):
        d = d.get("value")
    return d if isinstance(d, (int, float)) and not (isinstance(d, float) and math.isnan(d)) else None


def row(run: Path, val_only: bool) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    best = cfg.get("best_val", {})
    out = {
        "run": run.name,
        "seed": cfg.get("seed"),
        "holdout_source": cfg.get("holdout_source"),
        "best_epoch": cfg.get("best_epoch"),
        "val_auc": best.get("val_auc"),
        "val_ws_auc": best.get("val_ws_auc"),
        "val_loss": best.get("val_loss"),
    }
    if val_only:
        return out
    m = json.loads((run / "metrics.json").read_text())
    for k in HEADLINE:
        out[k] = _v(m, k)
        if isinstance(m.get(k), dict):
            out[k + "_ci"] = [m[k].get("ci_low"), m[k].get("ci_high")]
    out["threshold"] = _v(m, "threshold")
    out["within_ieee8023_auc"] = _v(m, "within_source", "ieee8023", "roc_auc")
    out["within_ieee8023_auc_ci"] = [
        (m.get("within_source", {}).get("ieee8023", {}).get("roc_auc") or {}).get(b) for b in ("ci_low", "ci_high")
    ]
    for src, d in (m.get("per_source") or {}).items():
        out[f"{src}_specificity"] = _v(d, "specificity")
        out[f"{src}_sensitivity"] = _v(d, "sensitivity")
    ext = m.get("external")
    if ext:
        out["external_specificity"] = _v(ext, "specificity")
        out["external_roc_auc"] = _v(ext, "roc_auc")
        out["external_n"] = ext.get("n")
    return out


def summary(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if all(isinstance(r.get(k), (int, float)) and r.get(k) is not None for r in rows)]
    out = {}
    for k in keys:
        if k in ("seed",):
            continue
        vals = [float(r[k]) for r in rows]
        mean = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        out[k] = {"mean": round(mean, 4), "sd": round(sd, 4), "n": len(vals)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Seed spread of runs (mean ± sd of headline metrics).")
    p.add_argument("runs", nargs="+")
    p.add_argument("--val-only", action="store_true", help="validation numbers only (for selection)")
    a = p.parse_args(argv)
    rows = [row(Path(r), a.val_only) for r in a.runs]
    print(json.dumps({"runs": rows, "summary": summary(rows)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
