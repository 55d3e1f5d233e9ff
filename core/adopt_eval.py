"""Metrics of a run made by :mod:`core.adopt` (``core.evaluate.evaluate_run`` hands such runs here).

An adopted model comes without development data: its threshold is the one given with
``--threshold`` or 0.5, never one tuned on the films it is evaluated on. The films it scored are
read in the binary view of :mod:`core.evaluate` (P(positive class) against the data labels
counted positive) and get the same patient-bootstrap CIs, per-source and within-source blocks.
TensorFlow-free, like core.evaluate.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core import config, datasets, evaluate, runs

NO_TUNING = ("0.5: an adopted model comes with no development data to choose a threshold on, and one tuned "
             "on the films it is evaluated on would flatter it")


def adopted_view(pred: pd.DataFrame, positive: str, positive_labels) -> pd.DataFrame:
    """An adopted run's predictions in the binary view the metrics read: ``p_covid`` = P(``positive``),
    ``label`` ``covid`` for the data labels counted positive (a label ``covid`` not counted positive
    becomes ``covid (not positive)``), every scored film in ``split`` test."""
    pos = {str(v).lower() for v in positive_labels}
    view = pred.copy()
    lab = view["label"].astype(str)
    view["label"] = np.where(lab.str.lower().isin(pos), "covid", np.where(lab == "covid", "covid (not positive)", lab))
    view["p_covid"] = view[f"p_{positive}"].astype(float)
    view["split"] = "test"
    return view


def evaluate_adopted(run: runs.Run, data=None, n_boot: int = 1000, write: bool = True,
                     seed: int = config.SEED) -> dict:
    """metrics.json of a run made by core.adopt: the films it scored (predictions.csv, ``test`` or
    ``external``) at its ``--threshold`` or 0.5 (:data:`NO_TUNING`), patient-bootstrap CIs."""
    if data is not None:
        raise ValueError(f"{run.label} is an adopted run: it is evaluated on the films it was adopted on; "
                         "to score other films adopt it again with --data DIR")
    a = run.adopted
    given = a.get("threshold")
    thr = {"value": float(given if given is not None else 0.5), "target": None, "chosen_on": None,
           "source": "given with --threshold" if given is not None else NO_TUNING}
    thr["ci_low"] = thr["ci_high"] = thr["value"]
    pred = run.predictions()
    labelled = pred[pred["label"].astype(str).isin(datasets.LABELS)]  # an archive's films may carry none
    if labelled.empty:
        out = {"threshold": thr, "n_test": 0, "n_unlabelled": len(pred), "task": "binary",
               "classes": [run.positive, "other"], "warnings": [f"None of the {len(pred)} scored films has a label "
                                                               "(covid, normal, pneumonia): there is nothing to measure."]}
    else:
        view = adopted_view(labelled, run.positive, a.get("positive_labels") or ["covid"])
        out = evaluate.evaluate_predictions(view, "binary", [run.positive, "other"], n_boot, seed=seed, threshold=thr)
        out["n_unlabelled"] = len(pred) - len(labelled)
    out.update(run=str(run.path), mode="adopted", positive_labels=a.get("positive_labels"),
               scored_as=sorted(map(str, pred["split"].unique())), training_data_known=run.training_data_known)
    if not run.training_data_known:
        out["warnings"].insert(0, "The films this model was trained on are unknown (no --trained-on): some scored "
                                  "films may be its own training films, which flatters every figure.")
    if write:
        runs.write_json(run.file("metrics.json"), evaluate.jsonable(out))
    return out
