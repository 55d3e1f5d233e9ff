"""core.severity: features, the ridge and nested-CV procedure on data with a known answer, the shipped asset."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from core import config, runs, severity


def test_lung_features_see_brighter_lungs():
    yy, xx = np.mgrid[0:128, 0:128] / 128
    mask = np.zeros((128, 128), bool)
    for cx in (0.3, 0.7):
        mask |= ((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
    clear = np.where(mask, 50.0, 160.0).astype(np.float32)
    opaque = np.where(mask, 120.0, 160.0).astype(np.float32)
    names = severity.LUNG_FEATURES
    a, b = severity.lung_features(clear, mask), severity.lung_features(opaque, mask)
    assert a.shape == (len(names),)
    assert b[names.index("lung_mean")] > a[names.index("lung_mean")]
    assert a[names.index("area_share")] == pytest.approx(mask.mean(), abs=1e-6)


def synthetic(n_patients=40, per=2, signal=True, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"p{i}" for i in range(n_patients)], per)
    x = rng.normal(0, 1, (len(groups), 6))
    y = np.clip(3 + 1.5 * x[:, 0] - x[:, 1] + rng.normal(0, 0.5, len(groups)), 0, 8) if signal \
        else rng.uniform(0, 8, len(groups))
    return {"lungs": x, "classifier": rng.normal(0, 1, (len(groups), 4)), "both": x}, y, groups


def test_ridge_recovers_a_linear_score():
    feats, y, _ = synthetic()
    fit = severity.fit_ridge(feats["lungs"], y, 0.1)
    pred = severity.predict_ridge(fit, feats["lungs"], 8.0)
    assert np.abs(pred - y).mean() < 0.6 and pred.min() >= 0 and pred.max() <= 8


def test_nested_cv_beats_the_baseline_only_when_there_is_signal():
    for signal in (True, False):
        feats, y, groups = synthetic(signal=signal)
        cv = severity.nested_cv(feats, y, groups, 8.0)
        res = severity.summarise(y, cv["pred"], cv["baseline"], groups, n_boot=300)
        assert res["beats_baseline"] is signal, res
        assert set(res["ci"]) == {"mae", "baseline_mae", "mae_minus_baseline", "r"}
        if signal:
            assert res["r"] > 0.8 and any("lungs" in c for fold in cv["chosen"] for c in fold)


def test_folds_never_split_a_patient():
    _, _, groups = synthetic(per=3)
    folds = severity._folds(groups, 5, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(groups)))
    owners = [set(groups[f]) for f in folds]
    assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1:])


def test_shipped_severity_model_is_plain_and_consistent():
    rec = severity.load()
    assert set(rec["models"]) == set(severity.TARGETS)
    for name, m in rec["models"].items():
        assert m["members"] and all(len(k["coef"]) == len(k["mean"]) for k in m["members"])
        cv = rec["cv"][name]
        assert cv["beats_baseline"] == (cv["ci"]["mae_minus_baseline"][1] < 0)
    assert rec["show"] == all(rec["cv"][n]["beats_baseline"] for n in severity.TARGETS)
    assert len(rec["classifier_sha256"]) == 64
    assert (severity.ASSET_DIR / "CARD.md").is_file() and (severity.ASSET_DIR / "cv_scatter.png").is_file()
    assert "about a hundred" in (severity.ASSET_DIR / "CARD.md").read_text()


def test_a_severity_model_of_another_classifier_is_refused():
    rec = severity.load()
    shipped = runs.read_config(config.DEFAULT_RUN).get("model_sha256")
    other = "0" * 64
    if rec["show"]:
        assert "another classifier" in severity.usable(rec, other)
        assert severity.usable({**rec, "classifier_sha256": shipped}, shipped) is None
    assert "baseline" in severity.usable({**rec, "show": False}, rec["classifier_sha256"])


def test_estimate_of_a_real_film_is_in_range(cxr_root):
    from core import images

    rec = severity.load()
    model = runs.load_model(config.DEFAULT_RUN)
    cfg = runs.read_config(config.DEFAULT_RUN)
    table = severity.scored_table(cxr_root)
    est = severity.estimate(rec, images.decode(cxr_root / table["path"].iloc[0]), model, cfg)
    for name, (_, top) in severity.TARGETS.items():
        e = est[name]
        assert 0 <= e["low"] <= e["value"] <= e["high"] <= top and e["cv_mae"] > 0


@pytest.mark.slow
def test_train_cli_on_a_new_run_writes_assets_and_json(tiny_run, cxr_root, tmp_path):
    """`python -m core.severity train --run RUN --json` retrains for another classifier (tiny run)."""
    out = tmp_path / "sev"
    proc = subprocess.run([sys.executable, "-m", "core.severity", "train", "--run", str(tiny_run), "--data",
                           str(cxr_root), "--out", str(out), "--json"], capture_output=True, text=True,
                          cwd=config.REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout)
    for name in ("geographic", "opacity"):
        assert {"mae", "baseline_mae", "r"} <= set(res[name])
    assert res["n_images"] >= 80 and res["n_patients"] >= 50
    rec = severity.load(out / "severity.json")
    assert rec["classifier_sha256"] == runs.sha256(tiny_run / "model.keras")
    assert (out / "CARD.md").is_file() and (out / "cv_scatter.png").is_file()
