"""Ensembles built after the fact from finished ``core.crossval`` folders, scored like one recipe.

    python tests/benchmarks/mix_ensemble.py "crop + no crop=A1+B1;A2+B2;A3+B3" [--json]

Each argument is ``LABEL=COMBO[;COMBO...]``; a combo is ``DIR+DIR[+DIR...]``, crossval folders
(each holding ``crossval.json`` and ``folds/``) trained on the same split (same ``--split-seed``:
same development folds, same test and held-out images). For every held-out source the combo's
fold runs are joined on image and split, their calibrated P(covid) averaged, and the average
scored by :func:`core.evaluate.evaluate_predictions`, so the threshold is chosen again on the
averaged out-of-fold (``val``) rows, as a trained run would. This measures, without training,
what an ensemble of differently prepared networks would give, e.g. lung-cropped and whole-film
networks as in DeepCOVID-XR (Wehbe et al., Radiology 2021). Each combo is one "seed" of the row:
the table prints mean ± sd over the combos, in the columns of ``loso_table.py``.

``DIR#K`` stands for member K of an ensemble's folds alone (its ``p_covid_member<K>`` column on
the test and held-out rows): "members alone=ENS#0;ENS#1;ENS#2" scores each network of an
ensemble by itself. The ``val`` rows of an ensemble are already out-of-fold single-member
outputs, so they are kept as they are (they set the threshold, never the AUC).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loso_table import markdown, within_ieee  # noqa: E402

from core import evaluate  # noqa: E402

KEYS = ["path", "split"]


def fold_runs(folder: Path) -> dict[str, Path]:
    """Held-out source -> that fold's run folder, from ``crossval.json``."""
    cv = json.loads((Path(folder) / "crossval.json").read_text())
    return {s: Path(folder) / "folds" / Path(f["run"]).name for s, f in cv["folds"].items()}


def _read(run: Path, member: int | None) -> pd.DataFrame:
    t = pd.read_csv(run / "predictions.csv")
    if member is not None:  # one network of an ensemble: its own column where the run wrote one
        own = t[f"p_covid_member{member}"]
        t["p_covid"] = own.where(own.notna(), t["p_covid"])
    return t


def averaged(runs: list[Path], members: list[int | None] | None = None) -> pd.DataFrame:
    """The runs' predictions.csv rows present in all of them, P(covid) averaged."""
    tables = [_read(r, m) for r, m in zip(runs, members or [None] * len(runs), strict=True)]
    base = tables[0].drop(columns=[c for c in tables[0].columns if c.startswith("p_")])
    p = [t[KEYS + ["p_covid"]].rename(columns={"p_covid": f"p{i}"}) for i, t in enumerate(tables)]
    out = base
    for t in p:
        out = out.merge(t, on=KEYS, how="inner")
    out["p_covid"] = out[[f"p{i}" for i in range(len(p))]].mean(axis=1)
    out["p_other"] = 1.0 - out["p_covid"]
    return out.drop(columns=[f"p{i}" for i in range(len(p))])


def combo_figures(folders: list, n_boot: int) -> dict:
    """The loso_table figures of one combo: AUC per held-out source, mean, worst, and the rest."""
    members = [int(str(f).split("#")[1]) if "#" in str(f) else None for f in folders]
    per = [fold_runs(Path(str(f).split("#")[0])) for f in folders]
    sources = sorted(set.intersection(*(set(p) for p in per)))
    out: dict = {}
    oof, internal, within = [], [], []
    for s in sources:
        pred = averaged([p[s] for p in per], members)
        m = evaluate.evaluate_predictions(pred, n_boot=n_boot)
        out[s] = float(m["external"]["roc_auc"]["value"])
        side = "specificity" if "specificity" in m["external"] else "sensitivity"
        out[f"{s}_{side[:4]}"] = float(m["external"][side]["value"])
        oof.append(within_ieee(pred[pred["split"] == "val"]))
        internal.append(float(m["roc_auc"]["value"]))
        within.append(within_ieee(pred[pred["split"] == "test"]))
    aucs = [out[s] for s in sources]
    out.update(mean=float(np.mean(aucs)), worst=float(np.min(aucs)), oof_within_ieee8023=float(np.nanmean(oof)),
               test_within_ieee8023=float(np.nanmean(within)), test_internal=float(np.nanmean(internal)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipes", nargs="+", help="LABEL=DIR+DIR[;DIR+DIR...]: combos of crossval folders")
    p.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples per evaluation (default 500)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    a = p.parse_args(argv)
    table = {}
    for arg in a.recipes:
        label, combos = arg.split("=", 1)
        table[label] = [combo_figures(c.split("+"), a.n_boot) for c in combos.split(";")]
    print(json.dumps(table, indent=2) if a.json else markdown(table, count="combos"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
