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

from core import config

MIN_IMAGES = 5  # a source needs this many images (within the group probed) to be probed
FOLDS = 5
C = 1.0  # inverse L2 strength of the logistic regression (sklearn's default)


def macro_auc(codes: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC (Mann-Whitney, ties 1/2) of class ``codes`` (n,) from ``probs`` (n, k)."""
    from scipy.stats import rankdata

    codes = np.asarray(codes)
    aucs = []
    for c in range(probs.shape[1]):
        pos = codes == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        r = rankdata(probs[:, c])
        aucs.append((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    if not aucs:
        raise ValueError("macro AUC needs at least two classes present")
    return float(np.mean(aucs))


def out_of_fold(features: np.ndarray, codes: np.ndarray, groups, folds: int = FOLDS,
                seed: int = config.SEED) -> np.ndarray:
    """Out-of-fold class probabilities (n, k) of a standardised logistic regression, patient-grouped folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

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
    from core import metrics

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
    idx = np.arange(len(codes), dtype=float)

    def auc(_y, i):
        i = i.astype(int)
        return macro_auc(codes[i], probs[i])

    def acc(_y, i):
        i = i.astype(int)
        return float(np.mean(probs[i].argmax(axis=1) == codes[i]))

    res["auc"] = metrics.ci(auc, np.zeros(len(idx)), idx, g, n_boot=n_boot, seed=seed)
    res["accuracy"] = metrics.ci(acc, np.zeros(len(idx)), idx, g, n_boot=n_boot, seed=seed)
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
