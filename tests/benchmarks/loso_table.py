"""The ablation table of the model card from finished ``core.crossval`` folders, over seeds.

    python tests/benchmarks/loso_table.py "crop, local=runs/crossval-a,runs/crossval-b" "no crop=runs/crossval-c"

Each argument is ``LABEL=DIR[,DIR...]``: one recipe and the crossval folders of its seeds (each
holding ``crossval.json``). For every recipe it prints one markdown row: the number of seeds, the
leave-one-source-out AUC of each held-out source, their mean and worst, and the out-of-fold
within-ieee8023 AUC (the ``val`` rows of the folds' runs that trained on ieee8023: development data
only, never a test split), each as mean ± sd over the seeds (the value alone for one seed; "–"
for a source the recipe could not hold out). Mean and worst are over the sources each recipe held out.
``test_internal`` and ``test_within_ieee8023`` are the fold runs' internal test-split AUCs (all
sources / ieee8023 alone, mean over the folds that have them): reported, not for choosing.
``--json`` prints the same figures as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def within_ieee(rows: pd.DataFrame) -> float:
    """AUC of ieee8023's COVID-19 against its other pneumonias among ``rows`` (NaN without both)."""
    v = rows[rows["source"] == "ieee8023"]
    y = (v["label"] == "covid").astype(int)
    return float(roc_auc_score(y, v["p_covid"])) if y.nunique() == 2 else float("nan")


def oof_within_ieee(run: Path) -> float:
    """Out-of-fold within-ieee8023 AUC of one fold run (NaN when ieee8023 was held out)."""
    p = pd.read_csv(Path(run) / "predictions.csv")
    return within_ieee(p[p["split"] == "val"])


def seed_figures(folder: Path) -> dict:
    """The figures of one seed: AUC per held-out source, mean, worst, out-of-fold within-ieee8023."""
    cv = json.loads((Path(folder) / "crossval.json").read_text())
    out = {s: f["roc_auc"]["value"] for s, f in cv["folds"].items()}
    out["mean"], out["worst"] = cv["mean_roc_auc"], cv["worst_roc_auc"]
    ws = [oof_within_ieee(Path(folder) / "folds" / Path(f["run"]).name) for f in cv["folds"].values()]
    out["oof_within_ieee8023"] = float(np.nanmean(ws))
    # reported, never used to choose: the fold runs' own internal test splits
    internal = [_value(f.get("internal_roc_auc")) for f in cv["folds"].values()]
    within = [_value(f.get("internal_within_ieee8023_auc")) for f in cv["folds"].values()]
    out["test_internal"] = float(np.nanmean(internal))
    out["test_within_ieee8023"] = float(np.nanmean(within))
    return out


def _value(cell) -> float:
    return float(cell["value"]) if isinstance(cell, dict) and cell.get("value") is not None else float("nan")


def _cell(values: list[float]) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return "–"  # a source this recipe could not hold out (e.g. excluded from its data)
    return f"{v.mean():.3f}" if len(v) == 1 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipes", nargs="+", help="LABEL=DIR[,DIR...]: a recipe and the crossval folders of its seeds")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    a = p.parse_args(argv)
    table = {}
    for arg in a.recipes:
        label, dirs = arg.split("=", 1)
        table[label] = [seed_figures(Path(d)) for d in dirs.split(",")]
    print(json.dumps(table, indent=2) if a.json else markdown(table))
    return 0


def markdown(table: dict[str, list[dict]], count: str = "seeds") -> str:
    """``{label: [figures of one seed, ...]}`` as the markdown table of the model card (mean ± sd)."""
    last = ("mean", "worst", "oof_within_ieee8023", "test_within_ieee8023", "test_internal")
    cols = sorted({c for seeds in table.values() for s in seeds for c in s} - set(last)) + list(last)
    lines = [f"| recipe | {count} | " + " | ".join(cols) + " |", "|---|---:|" + "---|" * len(cols)]
    for label, seeds in table.items():
        lines.append(f"| {label} | {len(seeds)} | " + " | ".join(_cell([s.get(c) for s in seeds]) for c in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
