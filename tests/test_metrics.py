"""core.metrics against sklearn and synthetic data with known answers."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    roc_auc_score,
)

from core import metrics


def _noisy(n=400, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(size=n))))
    return y, np.round(p, 2)  # rounding creates ties, which the AUC must handle like sklearn


def test_weighted_metrics_match_sklearn():
    y, p = _noisy()
    w = np.random.default_rng(1).integers(0, 4, len(y)).astype(float)
    st = metrics._stats(w[None, :], y.astype(float), p, 0.5, metrics.ALL_METRICS)
    assert st["roc_auc"][0] == pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-12)
    assert st["pr_auc"][0] == pytest.approx(average_precision_score(y, p, sample_weight=w), abs=1e-12)
    assert st["brier"][0] == pytest.approx(brier_score_loss(y, p, sample_weight=w), abs=1e-12)
    pred = (p >= 0.5).astype(int)
    assert st["accuracy"][0] == pytest.approx(accuracy_score(y, pred, sample_weight=w))
    assert st["f1"][0] == pytest.approx(f1_score(y, pred, sample_weight=w))


def test_binary_metrics_point_values_and_confusion():
    y, p = _noisy(seed=2)
    r = metrics.binary_metrics(y, p, threshold=0.4, n_boot=200)
    pred = p >= 0.4
    tp, fn = int((pred & (y == 1)).sum()), int((~pred & (y == 1)).sum())
    fp, tn = int((pred & (y == 0)).sum()), int((~pred & (y == 0)).sum())
    assert r["confusion"] == [[tn, fp], [fn, tp]]
    assert r["sensitivity"]["value"] == pytest.approx(tp / (tp + fn))
    assert r["specificity"]["value"] == pytest.approx(tn / (tn + fp))
    assert r["ppv"]["value"] == pytest.approx(tp / (tp + fp))
    assert r["npv"]["value"] == pytest.approx(tn / (tn + fn))
    assert r["roc_auc"]["value"] == pytest.approx(roc_auc_score(y, p))
    for k in metrics.BINARY_METRICS:
        assert r[k]["ci_low"] <= r[k]["value"] <= r[k]["ci_high"], k
    assert r["n"] == len(y) and r["n_pos"] == int(y.sum())


def test_perfect_separation_auc_one_and_ci_collapses():
    y = np.r_[np.zeros(50), np.ones(50)]
    p = np.r_[np.linspace(0, 0.4, 50), np.linspace(0.6, 1, 50)]
    r = metrics.binary_metrics(y, p, 0.5, groups=np.arange(100) // 2)
    for k in ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity"):
        assert r[k] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}, k


def test_random_scores_auc_near_half_and_ci_covers_it():
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 2, 600), rng.random(600)
    r = metrics.ci("roc_auc", y, p, n_boot=1000)
    assert abs(r["value"] - 0.5) < 0.06
    assert r["ci_low"] < 0.5 < r["ci_high"]
    assert 0.04 < r["ci_high"] - r["ci_low"] < 0.2


def test_patient_bootstrap_is_wider_when_images_cluster_within_patients():
    # 60 patients, 6 nearly identical images each: the effective sample is 60, not 360.
    rng = np.random.default_rng(4)
    n_pat, k = 60, 6
    y_pat = rng.integers(0, 2, n_pat)
    s_pat = y_pat * 0.8 + rng.normal(size=n_pat)
    y = np.repeat(y_pat, k)
    p = 1 / (1 + np.exp(-(np.repeat(s_pat, k) + 0.05 * rng.normal(size=n_pat * k))))
    groups = np.repeat([f"pat{i}" for i in range(n_pat)], k)
    by_image = metrics.ci("roc_auc", y, p, groups=None)
    by_patient = metrics.ci("roc_auc", y, p, groups=groups)
    assert by_image["value"] == by_patient["value"]
    w_img = by_image["ci_high"] - by_image["ci_low"]
    w_pat = by_patient["ci_high"] - by_patient["ci_low"]
    assert w_pat > 1.7 * w_img  # ~sqrt(6) in theory


def test_missing_group_ids_are_separate_units():
    codes, n = metrics.group_codes(["a", None, "", float("nan"), "a", "b"], 6)
    assert n == 5 and codes[0] == codes[4] and len({codes[1], codes[2], codes[3]}) == 3


def test_bootstrap_is_seeded_and_callable_path_agrees():
    y, p = _noisy(200, seed=5)
    g = np.arange(200) // 3
    a = metrics.ci("roc_auc", y, p, g, seed=7)
    assert a == metrics.ci("roc_auc", y, p, g, seed=7)
    assert a != metrics.ci("roc_auc", y, p, g, seed=8)
    b = metrics.ci(roc_auc_score, y, p, g, n_boot=200, seed=7)
    assert b["value"] == pytest.approx(a["value"])
    assert b["ci_low"] == pytest.approx(a["ci_low"], abs=0.04)
    assert b["ci_high"] == pytest.approx(a["ci_high"], abs=0.04)


@pytest.mark.parametrize("target_value", [0.8, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_reaches_target_sensitivity_on_val(seed, target_value):
    y, p = _noisy(150, seed=seed, signal=0.7)
    t = metrics.choose_threshold(y, p, "sensitivity", target_value)
    at = metrics.at_threshold(y, p, t)
    assert at["sensitivity"] >= target_value
    # It is the highest such threshold: any higher score in the data falls below target.
    higher = np.unique(p[p > t])
    if higher.size:
        assert metrics.at_threshold(y, p, higher[0])["sensitivity"] < target_value


def test_threshold_specificity_and_youden():
    y, p = _noisy(300, seed=6)
    t = metrics.choose_threshold(y, p, "specificity", 0.9)
    assert metrics.at_threshold(y, p, t)["specificity"] >= 0.9
    ty = metrics.choose_threshold(y, p, "youden")
    best = max(metrics.at_threshold(y, p, s)["youden"] for s in np.unique(p))
    assert metrics.at_threshold(y, p, ty)["youden"] == pytest.approx(best)
    with pytest.raises(ValueError, match="no covid"):
        metrics.choose_threshold(np.zeros(5), np.linspace(0, 1, 5))
    with pytest.raises(ValueError, match="unknown"):
        metrics.choose_threshold(y, p, "accuracy")


def test_threshold_ci_over_val():
    y, p = _noisy(200, seed=7)
    r = metrics.threshold_ci(y, p, np.arange(200) // 2, n_boot=300)
    assert r["ci_low"] <= r["value"] <= r["ci_high"]
    assert r["value"] == metrics.choose_threshold(y, p)


def test_prevalence_adjusted_predictive_values():
    # 100 covid (90 caught), 100 other (80 correctly negative): sens 0.9, spec 0.8.
    y = np.r_[np.ones(100), np.zeros(100)]
    p = np.r_[np.full(90, 0.9), np.full(10, 0.1), np.full(80, 0.1), np.full(20, 0.9)]
    r = metrics.at_threshold(y, p, 0.5)
    assert (r["sensitivity"], r["specificity"]) == (0.9, 0.8)
    assert r["ppv"] == pytest.approx(90 / 110)  # sample prevalence 0.5
    adj = metrics.at_threshold(y, p, 0.5, prevalence=0.1)
    assert adj["ppv"] == pytest.approx(0.09 / (0.09 + 0.18))  # = 1/3
    assert adj["npv"] == pytest.approx(0.72 / (0.72 + 0.01))
    assert adj["sample_ppv"] == pytest.approx(90 / 110)
    assert metrics.adjusted_predictive_values(1.0, 1.0, 0.3) == (1.0, 1.0)
    with pytest.raises(ValueError):
        metrics.at_threshold(y, p, 0.5, prevalence=1.5)


def test_at_threshold_is_fast_enough_for_a_slider():
    y, p = _noisy(2000)
    t0 = time.perf_counter()
    for t in np.linspace(0, 1, 101):
        metrics.at_threshold(y, p, t, prevalence=0.05)
    assert time.perf_counter() - t0 < 0.5
    df = metrics.sweep(y, p)
    assert len(df) == 101 and df["sensitivity"].is_monotonic_decreasing


def test_calibration_ece_small_when_calibrated_large_when_overconfident():
    rng = np.random.default_rng(8)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)
    curve, ece, brier = metrics.calibration(y, p)
    assert ece < 0.02
    assert brier == pytest.approx(np.mean((p - y) ** 2))
    assert list(curve.columns) == ["bin", "p_low", "p_high", "n", "mean_pred", "frac_pos"]
    assert curve["n"].sum() == 20000
    over = np.where(p > 0.5, 0.99, 0.01)  # says 99% sure when it is right 75% of the time
    _, ece_over, _ = metrics.calibration(y, over)
    assert ece_over > 0.2
    # The bootstrapped ECE has the same point value as calibration().
    assert metrics.ci("ece", y, p, n_boot=50)["value"] == pytest.approx(ece)


def test_one_class_gives_nan_auc_with_reason_not_a_crash():
    y = np.ones(12)
    p = np.linspace(0.1, 0.9, 12)
    r = metrics.binary_metrics(y, p, 0.5, groups=np.arange(12) // 2)
    assert math.isnan(r["roc_auc"]["value"]) and "both classes" in r["roc_auc"]["reason"]
    assert math.isnan(r["specificity"]["value"]) and r["specificity"]["reason"]
    assert 0 < r["sensitivity"]["value"] < 1
    assert metrics.roc_points(y, p).empty
    empty = metrics.binary_metrics([], [], 0.5)
    assert empty["n"] == 0 and math.isnan(empty["accuracy"]["value"])
    assert metrics.calibration([], [])[0].empty


def test_rare_class_ci_undefined_when_most_resamples_lack_it():
    y = np.r_[1, np.zeros(30)]
    p = np.r_[0.9, np.linspace(0, 0.5, 30)]
    r = metrics.ci("roc_auc", y, p, n_boot=500)
    assert r["value"] == 1.0
    # ~36% of resamples miss the single positive; the rest all give AUC 1.
    assert r["ci_low"] == 1.0 and r["ci_high"] == 1.0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="0 and 1"):
        metrics.binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="differ"):
        metrics.binary_metrics([0, 1], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.binary_metrics([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="unknown metrics"):
        metrics.bootstrap([0, 1], [0.1, 0.2], metrics=["kappa"])


def test_curves():
    y, p = _noisy(100, seed=9)
    roc = metrics.roc_points(y, p)
    assert roc["fpr"].iloc[0] == 0 and roc["tpr"].iloc[-1] == 1 and roc["threshold"].max() <= 1
    pr = metrics.pr_points(y, p)
    assert list(pr.columns) == ["recall", "precision", "threshold"] and pr["recall"].iloc[-1] == 0


def test_multiclass_per_class_auc_matches_sklearn():
    rng = np.random.default_rng(10)
    n, k = 300, 3
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    r = metrics.multiclass_metrics(y, probs, ["covid", "normal", "pneumonia"], groups=np.arange(n) // 2, n_boot=300)
    for c, name in enumerate(["covid", "normal", "pneumonia"]):
        assert r["per_class"][name]["roc_auc"]["value"] == pytest.approx(roc_auc_score(y == c, probs[:, c]))
        assert r["per_class"][name]["n"] == int((y == c).sum())
    assert r["macro_roc_auc"]["value"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert r["accuracy"]["value"] == pytest.approx(np.mean(probs.argmax(1) == y))
    assert np.array(r["confusion"]).sum() == n
    missing = metrics.multiclass_metrics(y[y < 2], probs[y < 2], ["covid", "normal", "pneumonia"], n_boot=50)
    assert math.isnan(missing["per_class"]["pneumonia"]["roc_auc"]["value"])


def test_bootstrap_of_a_few_hundred_predictions_is_fast():
    y, p = _noisy(500, seed=11)
    g = np.arange(500) // 2
    t0 = time.perf_counter()
    metrics.bootstrap(y, p, g, 0.5, metrics.ALL_METRICS, n_boot=1000)
    assert time.perf_counter() - t0 < 1.5


def test_fmt_is_the_one_way_a_metric_is_written():
    assert metrics.fmt({"value": 0.9123, "ci_low": 0.85, "ci_high": 0.96}) == "0.91 [0.85, 0.96]"
    assert metrics.fmt({"value": 0.9123, "ci_low": 0.85, "ci_high": 0.96}, digits=3) == "0.912 [0.850, 0.960]"
    assert metrics.fmt({"value": 0.5, "ci_low": float("nan"), "ci_high": None}) == "0.50"  # CI undefined
    assert metrics.fmt(0.25) == "0.25"
    for missing in (None, float("nan"), {"value": None}, {}, "n/a"):
        assert metrics.fmt(missing) == "n/a"
    nan_auc = {"value": float("nan"), "reason": "needs both classes"}
    assert metrics.fmt(nan_auc) == "n/a" and metrics.fmt(nan_auc, reason=True) == "n/a (needs both classes)"
