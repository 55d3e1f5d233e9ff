"""Choose the calibration method on VALIDATION data only: temperature vs Platt scaling.

    .venv/bin/python tests/benchmarks/bench_calibration.py RUN [RUN ...]

For each run, the validation rows of predictions.csv are turned back into logit differences
(log(p_covid / p_other)), and temperature scaling, Platt scaling and no calibration are compared
by repeated 5-fold cross-validation on those validation images (log loss, ECE). Prints ONE JSON
object. This is the evidence for the Platt scaling of the shipped model (assets/MODEL_CARD.md).
Run it on runs trained with ``--calibrate temperature`` (or ``none``): on a run that is already
Platt-calibrated the three columns coincide, because its "none" already is Platt scaling.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold


def ece(y, p, n=10):
    b = np.minimum((p * n).astype(int), n - 1)
    return float(sum((b == i).mean() * abs(y[b == i].mean() - p[b == i].mean()) for i in range(n) if (b == i).any()))


def compare(run: Path, repeats: int = 20) -> dict:
    v = pd.read_csv(run / "predictions.csv")
    v = v[v["split"] == "val"]
    y = (v["class"] == "covid").to_numpy().astype(int)
    p = np.clip(v["p_covid"].to_numpy(), 1e-6, 1 - 1e-6)
    z = np.log(p / (1 - p))  # any monotone affine calibration already applied is refitted below
    res = {"temperature": [], "platt": [], "none": []}
    ts = np.exp(np.linspace(np.log(0.25), np.log(8), 241))
    for rep in range(repeats):
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=rep).split(z, y):
            nll = [np.mean(np.log1p(np.exp(-(2 * y[tr] - 1) * z[tr] / t))) for t in ts]
            t = ts[int(np.argmin(nll))]
            lr = LogisticRegression(C=1e6).fit(z[tr, None], y[tr])
            for k, q in (
                ("temperature", 1 / (1 + np.exp(-z[te] / t))),
                ("platt", lr.predict_proba(z[te, None])[:, 1]),
                ("none", 1 / (1 + np.exp(-z[te]))),
            ):
                q = np.clip(q, 1e-6, 1 - 1e-6)
                res[k].append((-np.mean(y[te] * np.log(q) + (1 - y[te]) * np.log(1 - q)), ece(y[te], q)))
    return {k: {"log_loss": round(float(np.mean(v, 0)[0]), 4), "ece": round(float(np.mean(v, 0)[1]), 4)} for k, v in res.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Temperature vs Platt scaling, cross-validated on validation rows.")
    p.add_argument("runs", nargs="+")
    a = p.parse_args(argv)
    print(json.dumps({Path(r).name: compare(Path(r)) for r in a.runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
