"""Everything downstream of ``core.adopt`` on an adopted run (issue 18, items 4 and 7): the Explain
page with an upload, the Shortcut audit page after a real audit, the comparison of the shipped run
against the adopted one, and the serving export. The browser test on an adopted run is in
tests/test_browser.py (``test_upload_on_an_adopted_run_in_a_real_browser``).

The adopted model and its films are the small ones of tests/test_adopt.py; the films come from two
synthetic sources so that the audit's source probe has something to tell apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from test_adopt import _adopt, _films, _functional_softmax3, _save, _sequential_sigmoid
from test_dashboard import APP, TIMEOUT, chest_like_png, plotly_charts, texts

from core import export, findings, images, predict, runs

AppTest = pytest.importorskip("streamlit.testing.v1").AppTest
RUN_NAME = "20990101-000000-adopted"


def adopted_run(root: Path) -> tuple[Path, Path]:
    """(run, data): a softmax-over-3 ``.keras`` model adopted on 24 synthetic films of two sources,
    written as ``root/runs/RUN_NAME``."""
    data = _films(root / "data")
    manifest = pd.read_csv(data / "manifest.csv")
    manifest["source"] = ["syn_a" if int(p[1:]) % 2 else "syn_b" for p in manifest["patient_id"]]
    manifest.to_csv(data / "manifest.csv", index=False)
    path = _save(_functional_softmax3(), root / "m.keras")
    run = root / "runs" / RUN_NAME
    assert _adopt(path, data, run, "--preprocess", "torch", "--classes", "normal,covid,pneu") == 0
    return run, data


@pytest.fixture(scope="module")
def adopted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adopted")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXR_CACHE_DIR", str(root / "cache"))
        return adopted_run(root)


@pytest.fixture
def app_env(adopted, monkeypatch):
    """CXR_DATA_DIR and CXR_RUNS_DIR for an app whose runs folder holds the adopted run."""
    run, data = adopted
    monkeypatch.setenv("CXR_DATA_DIR", str(data))
    monkeypatch.setenv("CXR_RUNS_DIR", str(run.parent))
    return run, data


def _start(run: Path, page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["run"] = str(run)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_explain_page_on_an_adopted_run_shows_overlay_and_trust_panel(app_env):
    run, _ = app_env
    at = _start(run, "explain")
    assert at.file_uploader, "the Explain page offers an upload on an adopted run"
    at.file_uploader[0].set_value(("chest.png", chest_like_png(), "image/png")).run()
    assert not at.exception, [e.value for e in at.exception]
    assert plotly_charts(at) >= 1, "the overlay on the film"
    t = texts(at)
    assert "How far to trust this map" in t, t
    assert "P(covid)" in t


@pytest.mark.slow  # a real audit (lung net, Grad-CAM, probes, ROAD, sanity) of 24 films
def test_shortcut_page_and_comparison_on_an_adopted_run(app_env, shipped_run, shipped_lungs):
    from core import audit  # lazy: only this test audits

    run, data = app_env
    summary = audit.run_audit(run, data, methods=("gradcam",), limit=24, sanity_n=2, n_boot=50, progress=False)
    assert (run / "audit.json").is_file() and summary["findings"]
    at = _start(run, "shortcuts")
    assert not at.error, [e.value for e in at.error]
    t = texts(at)
    assert "Findings" in t and "Compare two audited runs" in t
    # ours (the shipped model) against the adopted one, in the page's compare section ...
    at.selectbox(key="sc_cmp_a").set_value(str(shipped_run))
    at.selectbox(key="sc_cmp_b").set_value(str(run)).run()
    assert not at.exception, [e.value for e in at.exception]
    cols = [str(c) for d in at.dataframe for c in d.value.columns]
    assert any(RUN_NAME in c for c in cols), cols
    # ... and in core
    figs, cards = findings.compare_runs(shipped_run, run)
    assert RUN_NAME in figs.columns and RUN_NAME in cards.to_string() + " ".join(cards.columns)
    assert len(figs) > 10


def test_export_of_an_adopted_run_gives_predicts_p_covid(adopted, tmp_path):
    run, data = adopted
    out = tmp_path / "serving" / "1"
    assert export.main([str(run), "--out", str(out), "--json"]) == 0
    record = pd.read_json(out / "export.json", typ="series")
    assert record["classes"] == ["normal", "covid", "pneu"]
    serve = tf.saved_model.load(str(out)).signatures[export.SIGNATURE]
    handle = runs.open_run(run)
    films = [data / p for p in handle.predictions()["path"][:4]]
    want, _ = predict.predict_paths(handle.model(), films, handle.size, handle.classes)
    for film, p in zip(films, want["p_covid"], strict=True):
        x = images.decode(film).astype(np.float32)[None, ..., None]
        got = serve(image=tf.constant(x))
        assert abs(float(got["p_covid"][0]) - p) < 1e-4, (film, float(got["p_covid"][0]), p)
        assert abs(float(got["probs"][0, 1]) - p) < 1e-6  # covid is column 1 of this model's classes


def test_export_refuses_an_adopted_savedmodel_in_one_sentence(adopted, tmp_path, capsys, monkeypatch):
    _, data = adopted
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "sm-run"
    assert _adopt(_save(_sequential_sigmoid(), tmp_path / "sm"), data, run) == 0
    capsys.readouterr()
    assert export.main([str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "adopted SavedModel" in err and "model_savedmodel" in err
    assert err.count("\n") == 0 and not (tmp_path / "out").exists()
