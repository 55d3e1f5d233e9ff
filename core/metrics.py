"""Classification metrics with patient-level bootstrap confidence intervals.

Pure numpy/pandas/sklearn (no TensorFlow), so the dashboard and the tests can use it cheaply.

Conventions used everywhere in this module:

- ``y`` is 1 for the positive class (covid) and 0 otherwise; ``p`` is the predicted
  probability of the positive class, P(covid).
- An image is called positive when ``p >= threshold``.
- ``groups`` define the resampling unit of the bootstrap: images of one patient are correlated,
  so a CI that resamples images would be too narrow. Callers pass the split file's ``group``
  (patients merged through duplicate images and cross-source links, what the split kept
  together; :func:`core.evaluate._groups`), else patient ids. Each bootstrap resample draws
  groups with replacement and keeps all images of a drawn group (as often as drawn).
- Every metric is returned as ``{"value", "ci_low", "ci_high"}`` (percentile 95% CI, widened
  if needed to contain the point value; NaN with a ``"reason"`` when fewer than half of the
  resamples define the metric, e.g. a rare class missing from most of them). A metric
  that is undefined on the data (e.g. AUC with one class only) has ``value`` NaN and a
  ``"reason"``; it never raises.

The bootstrap is vectorised: a resample is a row of per-image weights (how often its patient was
drawn), and every metric is computed for all rows at once with matrix products, so 1000
resamples of a few hundred predictions take milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_curve

from core.config import SEED

THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
RANK_METRICS = ("roc_auc", "pr_auc")
PROB_METRICS = ("brier", "ece")
ALL_METRICS = THRESHOLD_METRICS + RANK_METRICS + PROB_METRICS
BINARY_METRICS = THRESHOLD_METRICS + RANK_METRICS

# Upper bound on the size of one block of bootstrap weights (floats), to bound memory.
_BLOCK = 4_000_000


# ----------------------------------------------------------------------------- inputs


def _as_arrays(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(float).ravel()
    p = np.asarray(p, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y and p differ in length: {y.size} vs {p.size}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("y must hold only 0 and 1 (1 = covid)")
    if np.any(~np.isfinite(p)):
        raise ValueError("p holds NaN or infinite values")
    return y, p


def group_codes(groups, n: int) -> tuple[np.ndarray, int]:
    """Integer codes ``0..G-1`` for the resampling units; ``None`` -> every image its own unit.

    Missing or empty group ids (NaN, None, "") are treated as unique units (one per image), so
    unknown patients never get merged into one giant cluster.
    """
    if groups is None:
        return np.arange(n), n
    g = pd.Series(np.asarray(groups, dtype=object).ravel())
    if len(g) != n:
        raise ValueError(f"groups has {len(g)} entries for {n} predictions")
    missing = g.isna() | (g.astype(str).str.strip() == "")
    g = g.astype(str)
    g[missing] = [f"\x00row{i}" for i in np.flatnonzero(missing.to_numpy())]
    codes, uniques = pd.factorize(g)
    return codes.astype(np.int64), len(uniques)


def weight_blocks(groups, n: int, n_boot: int = 1000, seed: int = SEED):
    """Yield bootstrap weight matrices (rows = resamples, columns = images), block by block.

    Row r, column i = how many times the patient of image i was drawn in resample r. The
    sequence of blocks depends only on (groups, n, n_boot, seed), so two calls with the same
    arguments yield the same resamples (the metrics of several classes can share them).
    """
    codes, n_groups = group_codes(groups, n)
    rng = np.random.default_rng(seed)
    if n == 0 or n_boot <= 0:
        return
    rows = max(1, min(n_boot, _BLOCK // max(n, n_groups)))
    pvals = np.full(n_groups, 1.0 / n_groups)
    done = 0
    while done < n_boot:
        k = min(rows, n_boot - done)
        counts = rng.multinomial(n_groups, pvals, size=k)
        yield counts[:, codes].astype(float)
        done += k


# ----------------------------------------------------------------------------- vectorised core


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def _rank_stats(W: np.ndarray, y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """Weighted ROC AUC (ties count 1/2) and average precision (sklearn's step definition)."""
    if len(p) == 0:
        nan = np.full(W.shape[0], np.nan)
        return {"roc_auc": nan, "pr_auc": nan.copy()}
    order = np.argsort(p, kind="mergesort")
    ps, ys = p[order], y[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    Ws = W[:, order]
    pos_u = np.add.reduceat(Ws * ys, starts, axis=1)  # positive weight per distinct score
    neg_u = np.add.reduceat(Ws * (1.0 - ys), starts, axis=1)
    P, N = pos_u.sum(1), neg_u.sum(1)
    below = np.cumsum(neg_u, axis=1) - neg_u
    auc = _div((pos_u * (below + 0.5 * neg_u)).sum(1), P * N)
    # Average precision: scores descending, precision at each distinct threshold.
    pos_d, neg_d = pos_u[:, ::-1], neg_u[:, ::-1]
    tp, fp = np.cumsum(pos_d, axis=1), np.cumsum(neg_d, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1.0), 0.0)
    ap = _div((pos_d * prec).sum(1), P)
    ap = np.where(N > 0, ap, np.nan)  # AP with no negatives is trivially 1: call it undefined
    return {"roc_auc": auc, "pr_auc": ap}


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    return np.clip((p * n_bins).astype(int), 0, n_bins - 1)


def _stats(W, y, p, threshold, names, n_bins=10) -> dict[str, np.ndarray]:
    """All requested metrics for every row of weights ``W`` (shape (B, n)) at once."""
    out: dict[str, np.ndarray] = {}
    total = W.sum(1)
    if any(m in THRESHOLD_METRICS for m in names):
        pred = p >= threshold
        tp = W @ ((y == 1) & pred)
        fn = W @ ((y == 1) & ~pred)
        fp = W @ ((y == 0) & pred)
        tn = W @ ((y == 0) & ~pred)
        out.update(
            accuracy=_div(tp + tn, total),
            sensitivity=_div(tp, tp + fn),
            specificity=_div(tn, tn + fp),
            ppv=_div(tp, tp + fp),
            npv=_div(tn, tn + fn),
            f1=_div(2 * tp, 2 * tp + fp + fn),
        )
    if any(m in RANK_METRICS for m in names):
        out.update(_rank_stats(W, y, p))
    if "brier" in names:
        out["brier"] = _div(W @ (p - y) ** 2, total)
    if "ece" in names:
        onehot = np.zeros((len(p), n_bins))
        onehot[np.arange(len(p)), _bin_index(p, n_bins)] = 1.0
        # sum_b n_b/N * |mean_y_b - mean_p_b| == sum_b |sum_y_b - sum_p_b| / N
        gap = np.abs(W @ (onehot * y[:, None]) - W @ (onehot * p[:, None]))
        out["ece"] = _div(gap.sum(1), total)
    return {m: out[m] for m in names}


def _reason(metric: str, y: np.ndarray, p: np.ndarray, threshold: float | None) -> str:
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if len(y) == 0:
        return "no predictions"
    if metric in ("roc_auc", "pr_auc"):
        return f"needs both classes; have {n_pos} positive and {n_neg} negative"
    if metric == "sensitivity":
        return "no positive (covid) cases"
    if metric == "specificity":
        return "no negative (non-covid) cases"
    if metric in ("ppv", "f1"):
        return "no predicted positives" if n_pos else "no positive cases and no predicted positives"
    if metric == "npv":
        return "no predicted negatives"
    return "undefined on these data"


def _summarise(value: float, boots: np.ndarray, alpha: float) -> dict:
    value = float(value)
    finite = boots[np.isfinite(boots)]
    if not math.isfinite(value):
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    if boots.size == 0:  # n_boot == 0: no interval requested
        return {"value": value, "ci_low": value, "ci_high": value}
    if finite.size < max(10, 0.5 * boots.size):
        # Most resamples lack a class: the interval would describe a different quantity.
        return {"value": value, "ci_low": float("nan"), "ci_high": float("nan"),
                "reason": f"CI undefined: only {finite.size} of {boots.size} resamples had both classes"}
    lo, hi = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"value": value, "ci_low": float(min(lo, value)), "ci_high": float(max(hi, value))}


def bootstrap(
    y,
    p,
    groups=None,
    threshold: float = 0.5,
    metrics: Iterable[str] = ALL_METRICS,
    n_boot: int = 1000,
    seed: int = SEED,
    alpha: float = 0.05,
    n_bins: int = 10,
) -> dict[str, dict]:
    """Point value and patient-bootstrap percentile CI of several metrics at once.

    ``metrics`` are names from :data:`ALL_METRICS`. All metrics share the same resamples.
    Returns ``{name: {"value", "ci_low", "ci_high"[, "reason"]}}``.
    """
    y, p = _as_arrays(y, p)
    names = tuple(metrics)
    unknown = set(names) - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}")
    point = _stats(np.ones((1, len(y))), y, p, threshold, names, n_bins)
    parts = [_stats(W, y, p, threshold, names, n_bins) for W in weight_blocks(groups, len(y), n_boot, seed)]
    out = {}
    for m in names:
        boots = np.concatenate([d[m] for d in parts]) if parts else np.zeros(0)
        r = _summarise(point[m][0], boots, alpha)
        if not math.isfinite(r["value"]):
            r["reason"] = _reason(m, y, p, threshold)
        out[m] = r
    return out


def ci(
    metric_fn: str | Callable,
    y,
    p,
    groups=None,
    n_boot: int = 1000,
    seed: int = SEED,
    threshold: float = 0.5,
    alpha: float = 0.05,
) -> dict:
    """95% patient-bootstrap CI of one metric: ``{"value", "ci_low", "ci_high"}``.

    ``metric_fn`` is either a name from :data:`ALL_METRICS` (fast, vectorised) or any callable
    ``f(y, p) -> float`` (evaluated on each resample; slower). A resample on which the callable
    raises ``ValueError`` (e.g. one class only) is skipped.
    """
    if isinstance(metric_fn, str):
        return bootstrap(y, p, groups, threshold, [metric_fn], n_boot, seed, alpha)[metric_fn]
    y, p = _as_arrays(y, p)

    def safe(yy, pp):
        try:
            return float(metric_fn(yy, pp))
        except ValueError:
            return float("nan")

    value = safe(y, p)
    codes, n_groups = group_codes(groups, len(y))
    members = [np.flatnonzero(codes == g) for g in range(n_groups)]
    rng = np.random.default_rng(seed)
    boots = np.empty(max(n_boot, 0))
    for b in range(len(boots)):
        idx = np.concatenate([members[g] for g in rng.integers(0, n_groups, n_groups)])
        boots[b] = safe(y[idx], p[idx])
    return _summarise(value, boots, alpha)


# ----------------------------------------------------------------------------- binary


def confusion(y, p, threshold: float) -> list[list[int]]:
    """``[[tn, fp], [fn, tp]]`` at ``p >= threshold``."""
    y, p = _as_arrays(y, p)
    pred, pos = p >= threshold, y == 1
    tp, fn = int((pred & pos).sum()), int((~pred & pos).sum())
    fp, tn = int((pred & ~pos).sum()), int((~pred & ~pos).sum())
    return [[tn, fp], [fn, tp]]


def binary_metrics(
    y,
    p,
    threshold: float = 0.5,
    groups=None,
    n_boot: int = 1000,
    seed: int = SEED,
    alpha: float = 0.05,
) -> dict:
    """accuracy, sensitivity, specificity, ppv, npv, f1, roc_auc, pr_auc, each with a CI.

    Also ``confusion`` (``[[tn, fp], [fn, tp]]``), ``threshold``, ``n``, ``n_pos``,
    ``n_patients``. Degenerate inputs give NaN values with a ``reason``, never an exception.
    """
    y, p = _as_arrays(y, p)
    out = bootstrap(y, p, groups, threshold, BINARY_METRICS, n_boot, seed, alpha)
    out["confusion"] = confusion(y, p, threshold)
    out["threshold"] = float(threshold)
    out["n"] = len(y)
    out["n_pos"] = int(y.sum())
    out["n_patients"] = group_codes(groups, len(y))[1]
    return out


def choose_threshold(y_val, p_val, target: str = "sensitivity", value: float = 0.95) -> float:
    """Decision threshold chosen on VALIDATION data (never test).

    - ``target="sensitivity"``: the highest threshold whose sensitivity on (y_val, p_val) is
      ``>= value`` (highest = best specificity among those meeting the target).
    - ``target="specificity"``: the lowest threshold whose specificity is ``>= value``.
    - ``target="youden"``: maximises sensitivity + specificity - 1 (``value`` is ignored).

    Positive means ``p >= threshold``. Raises ``ValueError`` when the validation data lack the
    class the target needs.
    """
    y, p = _as_arrays(y_val, p_val)
    pos, neg = np.sort(p[y == 1])[::-1], np.sort(p[y == 0])
    if target == "sensitivity":
        if pos.size == 0:
            raise ValueError("cannot choose a sensitivity threshold: validation has no covid cases")
        if not 0 < value <= 1:
            raise ValueError(f"target sensitivity must be in (0, 1], got {value}")
        k = max(1, math.ceil(value * pos.size - 1e-9))  # positives that must be called positive
        return float(pos[k - 1])
    if target == "specificity":
        if neg.size == 0:
            raise ValueError("cannot choose a specificity threshold: validation has no non-covid cases")
        if not 0 < value <= 1:
            raise ValueError(f"target specificity must be in (0, 1], got {value}")
        k = max(1, math.ceil(value * neg.size - 1e-9))  # negatives that must fall below
        return float(np.nextafter(neg[k - 1], np.inf))
    if target == "youden":
        if pos.size == 0 or neg.size == 0:
            raise ValueError("cannot choose a Youden threshold: validation needs both classes")
        fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
        ok = np.isfinite(thr)
        j = np.argmax((tpr - fpr)[ok])
        return float(thr[ok][j])
    raise ValueError(f"unknown threshold target {target!r}; use sensitivity, specificity or youden")


def threshold_ci(
    y_val,
    p_val,
    groups=None,
    target: str = "sensitivity",
    value: float = 0.95,
    n_boot: int = 1000,
    seed: int = SEED,
    alpha: float = 0.05,
) -> dict:
    """The validation-chosen threshold with a patient-bootstrap CI over the validation set."""
    y, p = _as_arrays(y_val, p_val)
    thr = choose_threshold(y, p, target, value)
    codes, n_groups = group_codes(groups, len(y))
    members = [np.flatnonzero(codes == g) for g in range(n_groups)]
    rng = np.random.default_rng(seed)
    boots = np.full(max(n_boot, 0), np.nan)
    for b in range(len(boots)):
        idx = np.concatenate([members[g] for g in rng.integers(0, n_groups, n_groups)])
        try:
            boots[b] = choose_threshold(y[idx], p[idx], target, value)
        except ValueError:
            pass
    return _summarise(thr, boots, alpha)


def at_threshold(y, p, threshold: float, prevalence: float | None = None) -> dict:
    """Fast point metrics at one threshold (no bootstrap), e.g. for a dashboard slider.

    Returns sensitivity, specificity, ppv, npv, accuracy, f1, youden, tp, fp, tn, fn, n,
    prevalence. With ``prevalence`` (expected share of covid among the people tested), PPV and
    NPV are re-computed for that prevalence by Bayes' rule from sensitivity and specificity:
    ``ppv = sens*prev / (sens*prev + (1-spec)*(1-prev))``; the sample values stay in
    ``sample_ppv``/``sample_npv``. Undefined values are NaN.
    """
    y = np.asarray(y, dtype=float).ravel()
    p = np.asarray(p, dtype=float).ravel()
    pred = p >= threshold
    tp = int(np.count_nonzero(pred & (y == 1)))
    fp = int(np.count_nonzero(pred & (y == 0)))
    fn = int(np.count_nonzero(~pred & (y == 1)))
    tn = int(np.count_nonzero(~pred & (y == 0)))
    n = tp + fp + fn + tn

    def div(a, b):
        return a / b if b else float("nan")

    sens, spec = div(tp, tp + fn), div(tn, tn + fp)
    out = {
        "threshold": float(threshold),
        "sensitivity": sens,
        "specificity": spec,
        "sample_ppv": div(tp, tp + fp),
        "sample_npv": div(tn, tn + fn),
        "accuracy": div(tp + tn, n),
        "f1": div(2 * tp, 2 * tp + fp + fn),
        "youden": sens + spec - 1,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n,
        "sample_prevalence": div(tp + fn, n),
    }
    if prevalence is None:
        out["prevalence"] = out["sample_prevalence"]
        out["ppv"], out["npv"] = out["sample_ppv"], out["sample_npv"]
    else:
        if not 0 <= prevalence <= 1:
            raise ValueError(f"prevalence must be in [0, 1], got {prevalence}")
        out["prevalence"] = float(prevalence)
        out["ppv"], out["npv"] = adjusted_predictive_values(sens, spec, prevalence)
    return out


def adjusted_predictive_values(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """(PPV, NPV) at a given prevalence by Bayes' rule (NaN where undefined)."""
    s, c, q = sensitivity, specificity, prevalence
    tp, fp = s * q, (1 - c) * (1 - q)
    tn, fn = c * (1 - q), (1 - s) * q
    ppv = tp / (tp + fp) if tp + fp > 0 else float("nan")
    npv = tn / (tn + fn) if tn + fn > 0 else float("nan")
    return float(ppv), float(npv)


def sweep(y, p, thresholds=None, prevalence: float | None = None) -> pd.DataFrame:
    """:func:`at_threshold` over many thresholds (default 0.00, 0.01, ..., 1.00), one row each."""
    if thresholds is None:
        thresholds = np.linspace(0, 1, 101)
    return pd.DataFrame([at_threshold(y, p, t, prevalence) for t in thresholds])


# ----------------------------------------------------------------------------- curves


def calibration(y, p, n_bins: int = 10) -> tuple[pd.DataFrame, float, float]:
    """Reliability curve (equal-width bins), expected calibration error and Brier score.

    Returns ``(curve, ece, brier)``; ``curve`` has one row per non-empty bin with columns
    ``bin, p_low, p_high, n, mean_pred, frac_pos``. ECE = sum over bins of
    ``n_bin / n * |frac_pos - mean_pred|``.
    """
    y, p = _as_arrays(y, p)
    if len(y) == 0:
        empty = pd.DataFrame(columns=["bin", "p_low", "p_high", "n", "mean_pred", "frac_pos"])
        return empty, float("nan"), float("nan")
    b = _bin_index(p, n_bins)
    df = pd.DataFrame({"bin": b, "p": p, "y": y})
    g = df.groupby("bin").agg(n=("y", "size"), mean_pred=("p", "mean"), frac_pos=("y", "mean")).reset_index()
    g.insert(1, "p_low", g["bin"] / n_bins)
    g.insert(2, "p_high", (g["bin"] + 1) / n_bins)
    ece = float((g["n"] / len(y) * (g["frac_pos"] - g["mean_pred"]).abs()).sum())
    brier = float(np.mean((p - y) ** 2))
    return g, ece, brier


def roc_points(y, p) -> pd.DataFrame:
    """ROC curve as a table ``fpr, tpr, threshold`` (empty if a class is missing)."""
    y, p = _as_arrays(y, p)
    if y.min(initial=1) == y.max(initial=0):
        return pd.DataFrame(columns=["fpr", "tpr", "threshold"], dtype=float)
    fpr, tpr, thr = roc_curve(y, p)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thr, 1.0)})


def pr_points(y, p) -> pd.DataFrame:
    """Precision-recall curve as a table ``recall, precision, threshold`` (NaN threshold at end)."""
    y, p = _as_arrays(y, p)
    if y.sum() == 0:
        return pd.DataFrame(columns=["recall", "precision", "threshold"], dtype=float)
    prec, rec, thr = precision_recall_curve(y, p)
    return pd.DataFrame({"recall": rec, "precision": prec, "threshold": np.r_[thr, np.nan]})


# ----------------------------------------------------------------------------- multiclass


def multiclass_metrics(
    y_idx,
    probs,
    classes: Iterable[str],
    groups=None,
    n_boot: int = 1000,
    seed: int = SEED,
    alpha: float = 0.05,
) -> dict:
    """Multiclass view: accuracy (argmax), per-class one-vs-rest ROC AUC, macro AUC, confusion.

    ``y_idx`` are true class indices, ``probs`` an (n, k) array. Returns
    ``{"accuracy": ci, "macro_roc_auc": ci, "per_class": {cls: {"roc_auc": ci, "n": n}},
    "confusion": k x k list (rows = true), "classes": [...]}``.
    """
    classes = list(classes)
    y_idx = np.asarray(y_idx, dtype=int).ravel()
    probs = np.asarray(probs, dtype=float)
    k = len(classes)
    if probs.ndim != 2 or probs.shape != (len(y_idx), k):
        raise ValueError(f"probs must have shape ({len(y_idx)}, {k}), got {probs.shape}")
    correct = (probs.argmax(1) == y_idx).astype(float)
    ones = np.ones(len(y_idx))

    def per_row(W):
        acc = _div(W @ correct, W.sum(1))
        aucs = [_rank_stats(W, (y_idx == c).astype(float), probs[:, c])["roc_auc"] for c in range(k)]
        return acc, np.vstack(aucs)

    acc0, auc0 = per_row(ones[None, :])
    acc_b, auc_b = [], []
    for W in weight_blocks(groups, len(y_idx), n_boot, seed):
        a, u = per_row(W)
        acc_b.append(a)
        auc_b.append(u)
    acc_b = np.concatenate(acc_b) if acc_b else np.zeros(0)
    auc_b = np.concatenate(auc_b, axis=1) if auc_b else np.zeros((k, 0))
    per_class = {}
    for c, name in enumerate(classes):
        r = _summarise(auc0[c, 0], auc_b[c], alpha)
        if not math.isfinite(r["value"]):
            r["reason"] = _reason("roc_auc", (y_idx == c).astype(float), probs[:, c], None)
        per_class[name] = {"roc_auc": r, "n": int((y_idx == c).sum())}
    with np.errstate(invalid="ignore"):
        macro0 = np.mean(auc0[:, 0]) if np.all(np.isfinite(auc0[:, 0])) else np.nan
        macro_b = auc_b.mean(0) if auc_b.size else np.zeros(0)
    macro = _summarise(macro0, macro_b, alpha)
    if not math.isfinite(macro["value"]):
        macro["reason"] = "some class is absent or alone, so its one-vs-rest AUC is undefined"
    cm = confusion_matrix(y_idx, probs.argmax(1), labels=list(range(k))).astype(int).tolist()
    return {
        "accuracy": _summarise(acc0[0], acc_b, alpha),
        "macro_roc_auc": macro,
        "per_class": per_class,
        "confusion": cm,
        "classes": classes,
    }


# ----------------------------------------------------------------------------- text


def _finite(x) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt(d, digits: int = 2, reason: bool = False) -> str:
    """A metric as people read it: ``'0.91 [0.85, 0.96]'`` from ``{"value", "ci_low", "ci_high"}``.

    The one formatter of the CLIs, the audit's verdict and the dashboard. A plain number is shown
    alone; an undefined interval leaves just the value; a missing or undefined value is ``'n/a'``,
    followed by its ``reason`` in brackets when ``reason`` is True and the dict has one.
    """
    if not isinstance(d, dict):
        d = {"value": d}
    v, lo, hi = (_finite(d.get(k)) for k in ("value", "ci_low", "ci_high"))
    if v is None:
        why = d.get("reason") if reason else None
        return "n/a" + (f" ({why})" if why else "")
    if lo is None or hi is None:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
