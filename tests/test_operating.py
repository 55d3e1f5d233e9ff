"""Operating points (core.operating): the named points of the shipped run, site profiles applied to a
real film near the threshold, a profile for another model refused, the case report naming the
point that decided, and the dashboard's sidebar choice changing the Explain page's decision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core import case as ccase
from core import config, metrics, operating, report, runs

streamlit_testing = pytest.importorskip("streamlit.testing.v1")
APP = str(config.REPO_ROOT / "dashboard" / "app.py")


def site_profile(for_run, threshold: float, path: Path, **over) -> Path:
    """A hand-made site profile for ``run`` (as core.calibrate writes one) with a known threshold."""
    prof = {"format": operating.SITE_FORMAT, "site": "test-site", "threshold": threshold, "recalibration": None,
            "run": {"model_sha256": operating.model_identity(for_run)}, "n": 40, "data": "test", "date": "today",
            "target": {"metric": "specificity", "value": 0.8}, **over}
    path.write_text(json.dumps(prof))
    return path


def near_threshold_row(run: runs.Run, low: float, high: float) -> pd.Series:
    """The shipped run's test film whose P(covid) is nearest the middle of (low, high)."""
    test = run.predictions().query("split == 'test'")
    test = test[(test["p_covid"] > low) & (test["p_covid"] < high)]
    return test.iloc[int(np.argmin(np.abs(test["p_covid"].to_numpy() - (low + high) / 2)))]


def test_named_points_are_chosen_on_development_rows(shipped_run):
    run = runs.open_run(shipped_run)
    pts = operating.operating_points(run)
    assert set(pts) == {"run", "rule-out", "balanced"}
    val = run.predictions().query("split == 'val'")
    y = (val["label"] == "covid").to_numpy(int)
    # rule-out is today's threshold: sensitivity 0.95 on the out-of-fold rows, never the test rows
    assert pts["rule-out"].threshold == pytest.approx(run.threshold)
    assert metrics.at_threshold(y, val["p_covid"], pts["rule-out"].threshold)["sensitivity"] >= 0.95
    assert pts["balanced"].threshold == pytest.approx(metrics.choose_threshold(y, val["p_covid"], "youden"))
    assert pts["balanced"].threshold > pts["rule-out"].threshold
    assert all(p.meaning and p.chosen_on for p in pts.values())


def test_recalibration_is_monotone_and_decide_uses_it():
    p = np.linspace(0.01, 0.99, 50)
    q = operating.recalibrate(p, {"method": "platt", "a": 2.0, "b": -1.0})
    assert np.all(np.diff(q) > 0)
    point = operating.Point("site", 0.5, "m", "c", {"method": "platt", "a": 1.0, "b": -2.0})
    d = operating.decide(0.8, point)  # logit 1.386 - 2 < 0: below 0.5 after recalibration
    assert d.p == pytest.approx(0.8) and d.p_used < 0.5 and d.call == "not covid"
    assert "recalibrated" in d.sentence and "site profile" in d.sentence


@pytest.mark.slow
def test_a_site_profile_changes_the_decision_on_a_film_near_the_threshold(shipped_run, cxr_root, tmp_path):
    run = runs.open_run(shipped_run)
    row = near_threshold_row(run, run.threshold, run.threshold + 0.15)
    c = ccase.analyse(run, cxr_root / row["path"], colour_check=False)
    assert not c.warnings
    assert ccase.decide(run, c).call == "covid"  # the run's own point
    site = operating.choose(run, str(site_profile(run, c.p_positive + 0.01, tmp_path / "site.json")))
    decided = ccase.decide(run, c, site)
    assert decided.call == "not covid" and decided.point.name == "site"
    html = report.case_report_html(c.x, None, {"covid": c.p_positive, "other": 1 - c.p_positive}, run.threshold,
                                   run_id="shipped", operating_point=site)
    assert "not covid at the site profile test-site operating point" in html
    assert "fitted on a hospital&#x27;s own labelled films" in html


def test_a_profile_for_another_run_is_refused(shipped_run, tmp_path):
    path = site_profile(shipped_run, 0.5, tmp_path / "other.json", run={"model_sha256": "0" * 64})
    with pytest.raises(operating.SiteError, match="was made for another model"):
        operating.choose(shipped_run, str(path))
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(operating.SiteError, match="cannot be read"):
        operating.choose(shipped_run, str(tmp_path / "junk.json"))
    bad = json.dumps({"format": operating.SITE_FORMAT, "threshold": 0.5, "run": 5}).encode()
    with pytest.raises(operating.SiteError, match="lacks the run"):
        operating.choose(shipped_run, "bad.json", bad)
    with pytest.raises(operating.SiteError, match="not a site profile"):
        operating.choose(shipped_run, "x.json", b'{"threshold": 0.5}')


def test_apply_withholds_and_names_the_point():
    df = pd.DataFrame({"p_covid": [0.2, 0.6, 0.9], "withheld": [False, False, True]})
    out = operating.apply(df, operating.Point("balanced", 0.5, "m", "c"))
    assert out["covid_positive"].tolist()[:2] == [False, True] and out["covid_positive"].isna().iloc[2]
    assert set(out["operating_point"]) == {"balanced"}


@pytest.mark.slow
def test_sidebar_choice_changes_the_explain_decision(shipped_run, cxr_root, tmp_path, monkeypatch):
    run = runs.open_run(shipped_run)
    pts = operating.operating_points(run)
    row = near_threshold_row(run, pts["rule-out"].threshold + 0.05, pts["balanced"].threshold - 0.05)
    monkeypatch.setenv("CXR_DATA_DIR", str(cxr_root))
    monkeypatch.setenv("CXR_RUNS_DIR", str(tmp_path / "runs"))
    at = streamlit_testing.AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/explain.py").run()
    at.radio(key="explain_source").set_value("Pick from the test split").run()
    at.selectbox(key="explain_pick").set_value(row["path"]).run()

    def decision() -> str:
        assert not at.exception, [e.value for e in at.exception]
        return next(m.value for m in at.markdown if m.value.startswith("Decision at the"))

    assert "Decision at the run's operating point" in decision() and "[covid]" in decision()  # the default
    at.selectbox(key="operating_point").set_value("rule-out").run()
    assert "**rule-out**" in decision() and "[covid]" in decision()
    at.selectbox(key="operating_point").set_value("balanced").run()
    assert "**balanced**" in decision() and "[not covid]" in decision()
    at.selectbox(key="operating_point").set_value("site").run()
    at.text_input(key="site_profile_path").set_value(str(site_profile(run, 0.01, tmp_path / "s.json"))).run()
    assert "**site profile test-site**" in decision() and "[covid]" in decision()
    other = site_profile(run, 0.01, tmp_path / "o.json", run={"model_sha256": "f" * 64})
    at.text_input(key="site_profile_path").set_value(str(other)).run()
    assert "Decision at the run's operating point" in decision()
    assert any("made for another model" in w.value for w in at.warning)

