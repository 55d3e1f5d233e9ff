"""Do the model's features know which collection a film came from? A linear source probe.

A cross-validated logistic regression reads the network's penultimate features
(``core.model.features``: the pooled ``gap`` output, members side by side for an ensemble) and
predicts each image's **source**. Overall, a high score is expected (the sources differ in
label mix too). **Within one label** it is the shortcut test: if the features of, say, the
pneumonia films tell ieee8023 from Kermany from NIH, the network encodes the collection beyond
what the diagnosis explains, and anything correlated with the collection (every COVID-19 film
here) can be read off it. Zech et al. (PLOS Medicine 2018) found that a CNN's features
identified the hospital almost perfectly, and that the hospital alone sorted cases with AUC
0.86.

The same probe on a **random-weights network of the same architecture** is the floor: what the
architecture and the input statistics give away before any training (a random CNN already
separates collections by contrast and texture). The trained model's excess over that floor is
what training added.

Rules: folds are grouped by patient (``StratifiedGroupKFold``, no patient in both the fitting
and the scored fold), features are standardised inside each fold, sources with fewer than
:data:`MIN_IMAGES` images are left out, and the score is the out-of-fold macro one-vs-rest ROC
AUC (0.5 = chance) and accuracy (chance = the largest source's share), each with a 95%
patient-bootstrap CI over the out-of-fold predictions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from core import config, metrics

MIN_IMAGES = 5  # a source needs this many images (within the group probed) to be probed
FOLDS = 5
C = 0.1  # inverse L2 strength of the logistic regression (a few hundred images, 100+ features)


def macro_auc(codes: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray | float:
    """Macro one-vs-rest ROC AUC (Mann-Whitney, ties count 1/2) of classes ``codes`` (n,) from ``probs`` (n, k).

    With ``weights`` (B, n) (bootstrap counts per image) it returns the B weighted AUCs at once
    (NaN where a resample lacks a class); without, one float.
    """
    codes = np.asarray(codes)
    single = weights is None
    w = np.ones((1, len(codes))) if single else np.asarray(weights, float)
    aucs = []
    for c in range(probs.shape[1]):
        pos = codes == c
        if pos.all() or not pos.any():
            continue
        s = probs[:, c]
        uniq, inv = np.unique(s, return_inverse=True)
        onehot = np.zeros((len(s), len(uniq)))
        onehot[np.arange(len(s)), inv] = 1.0
        pos_u = (w * pos) @ onehot  # (B, U): weight of positives at each distinct score
        neg_u = (w * ~pos) @ onehot
        below = np.cumsum(neg_u, axis=1) - neg_u
        num = (pos_u * (below + 0.5 * neg_u)).sum(axis=1)
        den = pos_u.sum(axis=1) * neg_u.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs.append(np.where(den > 0, num / np.where(den > 0, den, 1), np.nan))
    if not aucs:
        if single:
            raise ValueError("macro AUC needs at least two classes present")
        return np.full(len(w), np.nan)
    out = np.nanmean(np.stack(aucs), axis=0) if len(aucs) > 1 else aucs[0]
    return float(out[0]) if single else out


def _ci(value: float, boots: np.ndarray) -> dict:
    """Percentile 95% CI of bootstrap values (NaN when fewer than half of them are defined)."""
    finite = boots[np.isfinite(boots)]
    if boots.size and finite.size < 0.5 * boots.size:
        return {"value": value, "ci_low": float("nan"), "ci_high": float("nan"),
                "reason": f"CI undefined: only {finite.size} of {boots.size} resamples held two sources"}
    if not finite.size:
        return {"value": value, "ci_low": value, "ci_high": value}
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return {"value": value, "ci_low": float(min(lo, value)), "ci_high": float(max(hi, value))}


def out_of_fold(features: np.ndarray, codes: np.ndarray, groups, folds: int = FOLDS,
                seed: int = config.SEED) -> np.ndarray:
    """Out-of-fold class probabilities (n, k) of a standardised logistic regression, patient-grouped folds."""
    x = np.asarray(features, np.float64)
    k = int(codes.max()) + 1
    n_groups = len(pd.unique(pd.Series(groups)))
    splits = max(2, min(folds, n_groups))
    cv = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed)
    out = np.full((len(x), k), 1.0 / k)
    for fit, score in cv.split(x, codes, groups):
        if len(np.unique(codes[fit])) < 2:
            continue  # a fold without two sources to fit: leave its rows at chance
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
        clf.fit(x[fit], codes[fit])
        p = np.zeros((len(score), k))
        p[:, clf.classes_] = clf.predict_proba(x[score])
        out[score] = p
    return out


def probe(features: np.ndarray, sources, groups, n_boot: int = 1000, seed: int = config.SEED,
          folds: int = FOLDS) -> dict:
    """The source probe over one set of images.

    Returns ``{n, sources: {name: n}, left_out: {name: n}, auc, accuracy (each value/ci_low/
    ci_high), chance_accuracy, above_chance (AUC CI above 0.5), "_p_true"}`` where ``_p_true``
    (n,) is each image's out-of-fold probability of its own source (NaN for left-out images; the
    caller removes it before writing JSON). With fewer than two probe-able sources it returns
    ``{"n", "reason"}``.
    """
    src = pd.Series(np.asarray(sources, dtype=object)).astype(str)
    counts = src.value_counts()
    keep_src = sorted(counts[counts >= MIN_IMAGES].index)
    sel = src.isin(keep_src).to_numpy()
    res: dict = {"n": int(sel.sum()), "sources": {s: int(counts[s]) for s in keep_src},
                 "left_out": {s: int(v) for s, v in counts.items() if s not in keep_src}}
    p_true = np.full(len(src), np.nan)
    if len(keep_src) < 2:
        return {**res, "reason": "fewer than two sources with at least "
                                 f"{MIN_IMAGES} images", "_p_true": p_true}
    codes = np.array([keep_src.index(s) for s in src[sel]])
    g = np.asarray(groups, dtype=object)[sel].astype(str)
    probs = out_of_fold(np.asarray(features)[sel], codes, g, folds, seed)
    correct = (probs.argmax(axis=1) == codes).astype(float)
    blocks = list(metrics.weight_blocks(g, len(codes), n_boot, seed))  # the patient bootstrap's resamples
    w = np.concatenate(blocks) if blocks else np.zeros((0, len(codes)))
    boot_auc = macro_auc(codes, probs, w) if len(w) else np.zeros(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot_acc = (w @ correct) / w.sum(axis=1) if len(w) else np.zeros(0)
    res["auc"] = _ci(macro_auc(codes, probs), boot_auc)
    res["accuracy"] = _ci(float(correct.mean()), boot_acc)
    res["chance_accuracy"] = float(np.bincount(codes).max() / len(codes))
    lo = res["auc"].get("ci_low")
    res["above_chance"] = bool(lo is not None and np.isfinite(lo) and lo > 0.5)
    p_true[sel] = probs[np.arange(len(codes)), codes]
    res["_p_true"] = p_true
    return res


def source_probes(features: np.ndarray, sources, labels, groups, n_boot: int = 1000,
                  seed: int = config.SEED) -> dict:
    """:func:`probe` over all images (``"all"``) and within each label (``"label:<name>"``)."""
    labels = pd.Series(np.asarray(labels, dtype=object)).astype(str).to_numpy()
    sources = np.asarray(sources, dtype=object)
    groups = np.asarray(groups, dtype=object)
    out = {"all": probe(features, sources, groups, n_boot, seed)}
    for lab in sorted(set(labels.tolist())):
        sel = labels == lab
        r = probe(np.asarray(features)[sel], sources[sel], groups[sel], n_boot, seed)
        full = np.full(len(labels), np.nan)
        full[sel] = r.pop("_p_true")
        r["_p_true"] = full
        out[f"label:{lab}"] = r
    return out
