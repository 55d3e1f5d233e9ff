"""Site calibration (core.calibrate): the fit on synthetic scores with a known answer, the refusal and
the warning for too few films, and the CLI on a small site of real films, applied by core.predict
--site and core.evaluate --site."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from streamlit.testing.v1 import AppTest

from core import calibrate, config, evaluate, metrics, operating, predict, runs


def scores(n_pos: int, n_neg: int, shift: float = 2.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and P(covid) of a model that ranks well but is badly calibrated for the site (too high)."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(int)
    z = rng.normal(0, 1, len(y)) + 2.0 * y + shift
    return y, 1 / (1 + np.exp(-z))


def test_fit_reaches_the_target_and_recalibrates_monotonically():
    y, p = scores(60, 60)
    prof = calibrate.fit_site(y, p, None, "sensitivity", 0.9, threshold_run=0.5, n_boot=200)
    used = operating.recalibrate(p, prof["recalibration"])
    assert prof["recalibration"]["a"] > 0
    assert roc_auc_score(y, used) == pytest.approx(roc_auc_score(y, p))  # ranking kept
    assert abs(used.mean() - y.mean()) < 0.05  # Platt: the mean probability matches the site's prevalence
    assert metrics.at_threshold(y, used, prof["threshold"])["sensitivity"] >= 0.9
    assert prof["sensitivity"]["ci_low"] <= prof["sensitivity"]["value"] <= prof["sensitivity"]["ci_high"]
    # the run's own threshold calls most of this site's other films COVID-19; the site's point does not
    assert prof["at_run_threshold"]["specificity"] < 0.2 < prof["specificity"]["value"]
    assert prof["n_per_class"] == {"covid": 60, "other": 60} and not prof["warnings"]


def test_one_class_site_sets_a_specificity_target_without_recalibration():
    y, p = scores(0, 40)
    prof = calibrate.fit_site(y, p, None, "specificity", 0.8, n_boot=200)
    assert prof["recalibration"] is None and prof["sensitivity"]["value"] != prof["sensitivity"]["value"]  # NaN
    assert metrics.at_threshold(y, p, prof["threshold"])["specificity"] >= 0.8
    assert any("not recalibrated" in w for w in prof["warnings"])
    assert any("no COVID-19 films" in w for w in prof["warnings"])
    with pytest.raises(operating.SiteError, match="has 0 COVID-19 film"):
        calibrate.fit_site(y, p, None, "sensitivity", 0.9)


def test_too_few_films_is_refused_and_a_wide_ci_is_warned():
    y, p = scores(9, 30)
    with pytest.raises(operating.SiteError, match=f"has 9 COVID-19 film.*at least {calibrate.MIN_FILMS}"):
        calibrate.fit_site(y, p, None, "sensitivity", 0.9)
    y, p = scores(12, 30)  # enough to fit, too few for a CI within +-0.10
    prof = calibrate.fit_site(y, p, None, "sensitivity", 0.85, n_boot=300)
    assert prof["ci_half_width"] > calibrate.MAX_HALF_WIDTH
    assert any("too few to pin it down" in w for w in prof["warnings"])


def site_folder(root: Path, tmp_path: Path, n_covid: int, n_other: int) -> Path:
    """A site's data folder: a manifest.csv naming real films of ../shared/cxr (never copied)."""
    covid = sorted((root / "hannover" / "png").glob("*.png"))[:n_covid]
    other = sorted((root / "nih" / "No_findings").glob("*.png"))[:n_other]
    site = tmp_path / "site"
    site.mkdir()
    pd.DataFrame({"path": [str(p) for p in covid + other], "label": ["covid"] * len(covid) + ["normal"] * len(other),
                  "patient_id": [p.stem for p in covid + other]}).to_csv(site / "manifest.csv", index=False)
    return site


@pytest.mark.slow
def test_cli_json_and_the_profile_applied_by_predict_and_evaluate(cxr_root, tmp_path, shipped_run, capsys):
    site = site_folder(cxr_root, tmp_path, 12, 14)
    out = tmp_path / "SITE.json"
    assert calibrate.main(["--data", str(site), "--target-specificity", "0.8", "--out", str(out), "--json",
                           "--n-boot", "200"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert prof == json.loads(out.read_text())
    assert prof["run"]["model_sha256"] == runs.open_run(shipped_run).config["model_sha256"]
    assert prof["n_per_class"] == {"covid": 12, "other": 14} and prof["target"]["metric"] == "specificity"
    assert prof["specificity"]["value"] >= 0.8 and prof["data"] == str(site.resolve())
    films = [str(p) for p in sorted((cxr_root / "nih" / "No_findings").glob("*.png"))[:3]]
    assert predict.main([*films, "--site", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["threshold"] == pytest.approx(prof["threshold"]) and got["operating_point"] == "site profile site"
    assert evaluate.main(["--site", str(out), "--no-write", "--n-boot", "50", "--json"]) == 0
    block = json.loads(capsys.readouterr().out)["operating_point"]
    assert block["operating_point"] == "site profile site" and block["threshold"] == pytest.approx(prof["threshold"])


@pytest.mark.slow
def test_cli_refuses_too_few_films(cxr_root, tmp_path, capsys):
    site = site_folder(cxr_root, tmp_path, 4, 3)
    assert calibrate.main(["--data", str(site), "--target-sensitivity", "0.9", "--out", str(tmp_path / "s.json")]) == 2
    assert "has 4 COVID-19 film(s); a sensitivity target needs at least 10" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_site_table_in_plain_words():
    doc = {"draws": 5, "rows": [
        {"source": "nih", "k": 40, "target": "specificity >= 0.65", "draws": 5, "refused": 1,
         "site_sensitivity_mean": 0.8, "site_sensitivity_sd": 0.05, "site_specificity_mean": 0.66,
         "site_specificity_sd": 0.04, "run_sensitivity_mean": 0.97, "run_sensitivity_sd": 0.0,
         "run_specificity_mean": 0.11, "run_specificity_sd": 0.02, "half_width_mean": 0.14, "half_width_sd": 0.01},
        {"source": "kermany", "k": 10, "target": "specificity >= 0.65", "draws": 5, "refused": 5}]}
    t = calibrate.site_table(doc)
    assert t.loc[0, "specificity, site point"] == "0.66 ± 0.04" and t.loc[0, "refused draws"] == "1 of 5"
    assert t.loc[1, "sensitivity, site point"] == "-"


def test_shipped_site_table_on_the_evaluation_page(shipped_run, tmp_path, monkeypatch):
    doc = json.loads((shipped_run / "site_calibration.json").read_text())  # shipped: a missing file fails
    assert {r["k"] for r in doc["rows"]} >= {10, 20, 40, 80} and doc["draws"] >= 50
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(str(config.REPO_ROOT / "dashboard" / "app.py"), default_timeout=120).run()
    at.switch_page("views/evaluation.py").run()
    assert not at.exception, [e.value for e in at.exception]
    shown = [d.value for d in at.dataframe if "site films k" in d.value.columns]
    assert shown and len(shown[0]) == len(doc["rows"])
    assert any("With a site's own operating point" in m.value for m in at.markdown)


def test_a_corrupt_site_table_spoils_only_that_table(shipped_run, tmp_path, monkeypatch):
    run = tmp_path / "runs" / "copy"
    shutil.copytree(shipped_run, run, ignore=shutil.ignore_patterns("audit_maps", "*.png"))
    (run / "site_calibration.json").write_text('{"rows": [{"source": 1}]}')
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(str(config.REPO_ROOT / "dashboard" / "app.py"), default_timeout=120)
    at.session_state["run"] = str(run)
    at.run()
    at.switch_page("views/evaluation.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("site_calibration.json cannot be read" in w.value for w in at.warning)
    assert any(m.value.startswith("**Does it detect") or "Does it detect" in m.value for m in at.subheader)
