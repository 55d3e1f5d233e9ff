"""Ensembling the fold members: out-of-fold logits, the averaged and calibrated model, predictions.csv.

Member k of a run is trained on every development fold but k, so it scores fold k "out of fold";
these logits (never the test split) are what the calibration is fitted on (:func:`assemble`),
and they are the ``val`` rows of predictions.csv (:func:`predictions_table`). The members are
averaged into one saved model by :func:`core.model.ensemble`.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from core import config
from core import model as model_lib
from core.calibration import apply_calibration, calibration_params, method_of, raw_logits, with_calibration


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def out_of_fold_logits(nets: list, x: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Pre-calibration logits of each image from the member that did not train on it.

    Row ``i`` is scored by ``nets[fold[i]]`` (member k left fold k out); rows whose fold names no
    member (a fold beyond ``members``, or -1) stay NaN. Training and ``--recalibrate`` both fit
    the calibration on these.
    """
    fold = np.asarray(fold)
    out = np.full((len(x), int(nets[0].output_shape[-1])), np.nan, np.float32)
    for k, net in enumerate(nets):
        own = fold == k
        if own.any():
            out[own] = raw_logits(net, x[own])
    return out


def assemble(nets: list, oof_logits: np.ndarray, dev: pd.DataFrame, cfg: dict):
    """The saved model (members averaged, calibration fitted on out-of-fold logits) and its calibration."""
    model = model_lib.ensemble(nets) if len(nets) > 1 else nets[0]
    method = method_of(cfg)
    ok = np.isfinite(oof_logits).all(axis=1)
    if method == "none" or not ok.any():
        return model, {"method": "none"}
    params = calibration_params(oof_logits[ok], dev["y"].to_numpy()[ok], method)
    params["fitted_on"] = f"out-of-fold predictions of {int(ok.sum())} development images"
    log(f"calibration {params['method']} fitted on {int(ok.sum())} out-of-fold predictions")
    return with_calibration(model, params), params


def predictions_table(model, oof_logits: np.ndarray, calibration: dict, data: dict, classes) -> pd.DataFrame:
    """predictions.csv: out-of-fold rows (split ``val``) and test/external rows from the saved model."""
    dev, rest = data["dev"], data["rest"]
    ok = np.isfinite(oof_logits).all(axis=1)
    oof = dev[ok].assign(split="val")
    p_oof = apply_calibration(oof_logits[ok], calibration)
    p_rest = model_lib.probabilities(model, data["x_rest"], batch_size=64)
    nets = model_lib.members(model)
    cols = ["path", "source", "patient_id", "label", "class", "split"]
    extra = ["fold", "box_y0", "box_x0", "box_y1", "box_x1", "crop_fell_back"]
    both = pd.concat([oof, rest], ignore_index=True)
    out = both[cols].copy()
    probs = np.concatenate([p_oof, p_rest]) if len(p_rest) else p_oof
    for j, c in enumerate(classes):
        out[f"p_{c}"] = probs[:, j].astype(float)
    out[extra] = both[extra].to_numpy()
    # Each member's own (calibrated) P(covid) on the test/external rows: what one network alone
    # would have said, so that the ensemble's gain can be read from one run.
    for k, net in enumerate(nets):
        p_k = apply_calibration(raw_logits(net, data["x_rest"]), calibration) if len(rest) else np.zeros((0, 2))
        out[f"p_covid_member{k}"] = np.r_[np.full(len(oof), np.nan), p_k[:, config.COVID_INDEX]]
    return out
