"""Trust by outcome (core.audit_outcome): the audit's trust measures split by TP/FP/TN/FN."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest
from test_audit import blob_model, tiny_audit_run  # noqa: F401  (fixtures: a small real model and run)

from core import audit_outcome, config, runs

APP = str(config.REPO_ROOT / "dashboard" / "app.py")


def _table(methods=("gradcam",)) -> pd.DataFrame:
    """Eight films with known outcomes at threshold 0.5: 3 TP, 1 FN, 2 TN, 2 FP; wrong calls have less heat in lungs."""
    y = ["covid"] * 4 + ["other"] * 4
    p = [0.9, 0.8, 0.7, 0.2, 0.1, 0.3, 0.6, 0.95]
    lung = [0.6, 0.6, 0.6, 0.2, 0.6, 0.6, 0.2, 0.2]
    rows = [{"path": f"f{i}.png", "class": y[i], "group": f"g{i}", "method": m, "p_covid_original": p[i],
             "in_lung_share": lung[i], "road_combined": 0.1 * i, "lungs_hit": float(i % 2),
             "boxes_hit": np.nan if i else 1.0} for m in methods for i in range(8)]
    return pd.DataFrame(rows)


def test_outcomes_at_the_threshold():
    got = audit_outcome.outcomes([1, 1, 0, 0], [0.5, 0.49, 0.5, 0.1], 0.5)
    assert got.tolist() == ["TP", "FN", "FP", "TN"]


def test_by_outcome_counts_and_means():
    res = audit_outcome.by_outcome(_table(("gradcam", "saliency")), 0.5, "covid", n_boot=50)
    assert res["counts"] == {"TP": 3, "FP": 2, "TN": 2, "FN": 1}
    assert set(res["methods"]) == {"gradcam", "saliency"}
    per = res["methods"]["gradcam"]
    assert per["TP"]["n"] == 3 and per["wrong"]["n"] == 3 and per["right"]["n"] == 5
    assert per["TP"]["in_lung_share"]["value"] == pytest.approx(0.6)
    assert per["wrong"]["in_lung_share"]["value"] == pytest.approx(0.2)
    assert per["FP"]["road_combined"]["value"] == pytest.approx((0.6 + 0.7) / 2)
    # boxes only where a film has them (film 0, a TP): other outcomes have n = 0 for that measure
    assert per["TP"]["boxes_hit"]["n"] == 1 and per["FN"]["boxes_hit"]["n"] == 0
    assert "less of their heat in the lungs" in res["sentence"]


def test_no_wrong_calls_says_so():
    t = _table()
    t["p_covid_original"] = np.where(t["class"] == "covid", 0.9, 0.1)
    res = audit_outcome.by_outcome(t, 0.5, "covid", n_boot=20)
    assert "wrong" not in res["methods"]["gradcam"] and "no wrong calls" in res["sentence"]


def test_update_run_on_the_shipped_audit(shipped_run, tmp_path):
    """The step alone, from audit.csv: one film per row of the first method, at the run's threshold."""
    run = tmp_path / "model"
    shutil.copytree(shipped_run, run, ignore=shutil.ignore_patterns("audit_maps*", "model.keras"))
    res = audit_outcome.update_run(run, n_boot=50)
    stored = json.loads((run / "audit.json").read_text())["by_outcome"]
    assert stored["counts"] == res["counts"]
    assert sum(res["counts"].values()) == json.loads((run / "audit.json").read_text())["n_images"]
    assert res["threshold"] == pytest.approx(runs.open_run(run).threshold)
    # the shipped audit.json carries the same split (python -m core.audit_outcome was run on it)
    shipped = json.loads((shipped_run / "audit.json").read_text())["by_outcome"]
    assert shipped["counts"] == res["counts"]


def test_update_run_without_audit_raises(tmp_path, shipped_run):
    run = tmp_path / "model"
    shutil.copytree(shipped_run, run, ignore=shutil.ignore_patterns("audit*", "model.keras"))
    with pytest.raises(runs.RunError, match="has not been audited"):
        audit_outcome.update_run(run)
    assert audit_outcome.main(["--run", str(run)]) == 2


def test_shortcut_page_shows_trust_by_outcome(shipped_run, monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_RUNS_DIR", str(shipped_run.parent))
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))  # the table needs no images
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["run"] = str(shipped_run)
    at.run()
    at.switch_page("views/shortcuts.py").run()
    assert not at.exception, [e.value for e in at.exception]
    text = " ".join(str(m.value) for kind in ("subheader", "caption") for m in getattr(at, kind))
    assert "Do wrong calls come with worse maps?" in text and "wrong calls" in text
    assert at.dataframe, "the by-outcome table among the page's tables"


def test_run_audit_stores_by_outcome(tiny_audit_run):  # noqa: F811  (the fixture imported above)
    """core.audit runs the step: by_outcome in audit.json, one film per row of audit.csv, at threshold 0.5."""
    from core import audit, lungs

    run, root = tiny_audit_run
    s = audit.run_audit(run, root, methods=["gradcam"], limit=10, sanity_n=0, n_boot=20, progress=False,
                        lung_model=lungs.build_unet(base=4))
    stored = json.loads((run / "audit.json").read_text())["by_outcome"]
    assert stored["threshold"] == 0.5 and sum(stored["counts"].values()) == s["n_images"] == 10
    per = stored["methods"]["gradcam"]
    assert sum(per[o]["n"] for o in audit_outcome.OUTCOMES if o in per) == 10
    assert {"in_lung_share", "road_combined", "lungs_hit"} <= set(per[next(iter(per))])
