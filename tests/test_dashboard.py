"""The Streamlit dashboard through streamlit.testing.v1.AppTest: every page, with and without data.

The app is started from its real entry point (``dashboard/app.py`` with ``st.navigation``) and each
page is reached with ``AppTest.switch_page``. Two environments:

- ``data``: ``CXR_DATA_DIR`` = the real data (../shared/cxr), a real tiny run (``tiny_run``);
- ``nodata``: ``CXR_DATA_DIR`` = an empty folder, as on a fresh clone: every page must still load,
  and pages that need images say how to get them.

Uploads go through ``at.file_uploader[0].set_value((name, bytes, mime))``, which AppTest in
Streamlit 1.67 supports natively (no test hook in the app).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import config, runs

streamlit_testing = pytest.importorskip("streamlit.testing.v1")
AppTest = streamlit_testing.AppTest

APP = str(config.REPO_ROOT / "dashboard" / "app.py")
TIMEOUT = 120  # seconds per script run: TensorFlow's import alone takes ~4 s on 2 busy cores
PAGES = ["explain", "errors", "training", "evaluation", "data", "shortcuts", "about"]


# --------------------------------------------------------------------------- images


def chest_like_png(size: int = 256, seed: int = 0) -> bytes:
    """A synthetic frontal 'chest X-ray': bright body and midline, two dark lung fields."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.full((size, size), 40.0)
    img[(np.abs(xx - 0.5) < 0.42) & (yy > 0.08)] = 170  # body
    for cx in (0.3, 0.7):
        img[((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1] = 60  # lungs
    img[(np.abs(xx - 0.5) < 0.07) & (yy > 0.1)] = 215  # spine / mediastinum
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def real_xray(root: Path) -> tuple[str, bytes]:
    path = sorted((root / "nih" / "Pneumonia").glob("*.png"))[0]
    return path.name, path.read_bytes()


# --------------------------------------------------------------------------- environments


def _run_for_tests(request) -> Path:
    """The tiny real run of the test session when data exist, else the shipped model (which must be there)."""
    try:
        return request.getfixturevalue("tiny_run")
    except pytest.skip.Exception:
        pass
    return request.getfixturevalue("shipped_run")


@pytest.fixture(scope="module")
def dash_run(request) -> Path:
    return _run_for_tests(request)


@pytest.fixture(params=["data", "nodata"])
def env(request, dash_run, tmp_path, monkeypatch):
    """Environment variables for one app: data root (real or empty) and a runs root holding the run."""
    if request.param == "data":
        root = request.getfixturevalue("cxr_root")
    else:
        root = tmp_path / "empty-data"
        root.mkdir()
    runs_root = Path(dash_run).parent if Path(dash_run) != config.DEFAULT_RUN else tmp_path / "runs"
    monkeypatch.setenv("CXR_DATA_DIR", str(root))
    monkeypatch.setenv("CXR_RUNS_DIR", str(runs_root))
    return {"kind": request.param, "data": Path(root), "run": Path(dash_run)}


def start(env, page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["run"] = str(env["run"])
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    if page:
        at.switch_page(f"views/{page}.py").run()
    return at


def texts(at: AppTest) -> str:
    """All visible text of the main area (markdown, captions, alerts, metrics), for assertions."""
    parts = []
    for kind in ("markdown", "caption", "info", "warning", "error", "success", "title", "subheader"):
        parts += [str(e.value) for e in getattr(at, kind)]
    parts += [f"{m.label} {m.value}" for m in at.metric]
    return "\n".join(parts)


def images_shown(at: AppTest) -> int:
    return len(at.image)


def captions(at: AppTest) -> list[str]:
    return [c for el in at.image for c in el.captions]


def plotly_charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def map_captions(at: AppTest) -> list[str]:
    """Captions under the overlay figures (and every other caption)."""
    return [str(c.value) for c in at.caption]


# --------------------------------------------------------------------------- every page


@pytest.mark.parametrize("page", PAGES)
def test_page_loads(env, page):
    at = start(env, page)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    t = texts(at)
    has_data = env["kind"] == "data"
    if page == "explain":
        assert at.file_uploader, "the Explain page offers an upload"
        assert at.radio(key="explain_source").options == ["Upload a file", "Pick from the test split"]
    elif page == "errors":
        assert "misclassified" in t
        if has_data:
            assert images_shown(at) >= 1 or "No misclassified" in t
        else:
            assert "core.data download" in t
    elif page == "training":
        assert plotly_charts(at) >= 2, "loss and AUC curves"
        assert at.get("json"), "the run's config"
        assert at.dataframe, "the split summary"
    elif page == "evaluation":
        assert at.slider(key="eval_thr").value == pytest.approx(
            json.loads((env["run"] / "metrics.json").read_text())["threshold"]["value"], abs=1e-3)
        assert at.number_input(key="eval_prev")
        assert plotly_charts(at) == 4, "confusion matrix, ROC, PR, calibration"
        assert "Internal test ROC AUC" in t and "Within ieee8023 ROC AUC" in t
    elif page == "data":
        if has_data:
            assert at.dataframe, "the counts table"
            assert images_shown(at) >= 3
            assert "holds only covid images" in t  # the source/label confounding warning (hannover)
        else:
            assert "core.data download" in t and "CXR_DATA_DIR" in t
    elif page == "shortcuts":
        assert "core.audit" in t or "Lung-blanked probes" in t
    elif page == "about":
        assert "Research use only" in t
        assert "Cohen" in t and "Kermany" in t and "ChestX-ray8" in t


# --------------------------------------------------------------------------- uploads


def test_upload_gives_heatmap_and_downloads(env):
    at = start(env, "explain")
    if env["kind"] == "data":
        name, data = real_xray(env["data"])
    else:
        name, data = "synthetic.png", chest_like_png()
    at.file_uploader[0].set_value((name, data, "image/png")).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert any(m.label == "P(covid)" for m in at.metric)
    assert plotly_charts(at) == 1, "the Grad-CAM overlay on the original film"
    assert images_shown(at) >= 1 and all(url for el in at.image for url in el.value), "what the network sees"
    assert any("Grad-CAM for covid on the film" in c for c in map_captions(at)), map_captions(at)
    t = texts(at)
    assert "Decision at the run's operating point" in t
    assert "P(COVID-19) ranges from" in t, "the film's range (core.uncertainty)"
    assert "How far to trust this map" in t and "Randomisation check" in t and "Faithfulness" in t
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels == ["Download overlay (PNG)", "Download case report (HTML)", "Download case report (PDF)"]


def test_methods_and_controls_change_the_maps(env):
    at = start(env, "explain")
    at.file_uploader[0].set_value(("x.png", chest_like_png(seed=3), "image/png")).run()
    at.multiselect(key="explain_methods").set_value(["gradcam", "saliency"]).run()
    at.slider(key="explain_alpha").set_value(0.8).run()
    at.selectbox(key="explain_cmap").set_value("inferno").run()
    at.toggle(key="explain_outline").set_value(True).run()
    at.radio(key="explain_view").set_value("side by side").run()
    assert not at.exception, [e.value for e in at.exception]
    caps = map_captions(at)
    assert any("Grad-CAM for" in c for c in caps) and any("Saliency for" in c for c in caps), caps
    assert plotly_charts(at) == 2
    at.radio(key="explain_view").set_value("wipe").run()
    at.slider(key="explain_wipe").set_value(0.3).run()
    assert not at.exception, [e.value for e in at.exception]


def test_bad_upload_is_one_sentence_and_session_survives(env):
    at = start(env, "explain")
    bad = [("notes.png", b"this is not an image", "image/png"), ("page.html", b"<html><body>hi</body></html>", "text/html"),
           ("empty.jpg", b"", "image/jpeg"), ("cut.png", chest_like_png()[:300], "image/png")]
    for name, data, mime in bad:
        at.file_uploader[0].set_value((name, data, mime)).run()
        assert not at.exception, (name, [e.value for e in at.exception])
        assert len(at.error) == 1, name
        msg = at.error[0].value
        assert msg.startswith("This file cannot be used") and "Traceback" not in msg and msg.count("\n") == 0
    # The same session goes on working with a good image.
    at.file_uploader[0].set_value(("ok.png", chest_like_png(), "image/png")).run()
    assert not at.exception and not at.error
    assert any(m.label == "P(covid)" for m in at.metric)


def test_non_chest_image_gets_a_warning_not_an_answer(env):
    at = start(env, "explain")
    rgb = np.zeros((300, 300, 3), np.uint8)
    rgb[..., 0] = np.linspace(0, 255, 300)[None, :]
    rgb[..., 1] = np.linspace(255, 0, 300)[:, None]
    rgb[..., 2] = 128
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    at.file_uploader[0].set_value(("holiday.jpg", buf.getvalue(), "image/jpeg")).run()
    assert not at.exception
    warns = [w.value for w in at.warning]
    assert any("photograph" in w for w in warns), warns
    t = texts(at)
    assert "No answer is given" in t and "Decision at the run's operating point" not in t


def test_pick_from_test_split(env):
    at = start(env, "explain")
    at.radio(key="explain_source").set_value("Pick from the test split").run()
    assert not at.exception, [e.value for e in at.exception]
    if env["kind"] == "nodata":
        assert "core.data download" in texts(at)
        return
    assert at.selectbox(key="explain_pick").options
    # The answer, or (for a film that fails a plausibility check, as a tiny run's first test film
    # may) the reason it is withheld; the map and what the network sees either way.
    answered = any(m.label == "P(covid)" for m in at.metric) or "No answer is given" in texts(at)
    assert images_shown(at) >= 1 and plotly_charts(at) == 1 and answered


# --------------------------------------------------------------------------- evaluation and errors


def test_threshold_slider_updates_metrics(env):
    at = start(env, "evaluation")

    def values():
        return {m.label: m.value for m in at.metric if m.label in ("Sensitivity", "Specificity", "PPV", "NPV")}

    at.slider(key="eval_thr").set_value(0.0).run()
    low = values()
    at.slider(key="eval_thr").set_value(1.0).run()
    high = values()
    assert low["Sensitivity"] == "1.000" and high["Specificity"] == "1.000"
    at.number_input(key="eval_prev").set_value(0.01).run()
    assert not at.exception


def test_misclassified_filters(env):
    at = start(env, "errors")
    # Every test run has metrics.json (core.train evaluates), hence an operating point and the filter.
    assert at.multiselect(key="err_kind").value == ["false positive", "false negative"]

    def shown():
        """The error table as the user sees it (None when the page says nothing matches)."""
        tables = [d.value for d in at.dataframe if "error" in d.value.columns]
        if not tables:
            assert "No misclassified test image matches" in texts(at)
            return None
        return tables[0]

    at.multiselect(key="err_kind").set_value(["false negative"]).run()
    assert not at.exception
    table = shown()
    if table is not None:
        assert set(table["error"]) == {"false negative"}
    at.multiselect(key="err_kind").set_value(["false positive", "false negative"]).run()
    at.radio(key="err_sort").set_value("least confident first").run()
    assert not at.exception
    table = shown()
    if table is not None and "confidence" in table.columns:
        assert table["confidence"].is_monotonic_increasing, "least confident first"


# --------------------------------------------------------------------------- broken runs


@pytest.mark.parametrize("page", ["explain", "errors", "training", "evaluation"])
def test_corrupt_run_is_one_sentence(env, page, tmp_path, monkeypatch):
    """A run with corrupt files is reported with st.error in one sentence, never a traceback."""
    bad = tmp_path / "bad-runs" / "20990101-000000-broken"
    shutil.copytree(env["run"], bad, ignore=shutil.ignore_patterns("audit_maps"))
    (bad / "metrics.json").write_text("{not json")
    (bad / "history.csv").write_bytes(b"\x00\x01garbage")
    (bad / "predictions.csv").write_text("nothing,useful\n1,2\n")
    (bad / "model.keras").write_bytes(b"PK\x03\x04 truncated")
    monkeypatch.setenv("CXR_RUNS_DIR", str(bad.parent))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["run"] = str(bad)
    at.run()
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.error, f"{page}: the broken run must be reported"
    for e in at.error:
        assert "Traceback" not in e.value and e.value.count("\n") == 0
        assert "broken" in e.value


# --------------------------------------------------------------------------- shortcut audit


@pytest.mark.slow
def test_shortcut_page_with_a_real_audit(env, tmp_path, monkeypatch, request):
    """Audit a copy of the run (24 test images, real lung net), show its cards and the images behind one,
    and compare it with a second audited copy."""
    if env["kind"] == "nodata":
        pytest.skip("auditing needs the images; the no-data case is test_page_loads[nodata-shortcuts]")
    from core import audit
    from dashboard import components

    request.getfixturevalue("shipped_lungs")  # the lung net is shipped: missing fails, never skips
    run = tmp_path / "runs" / env["run"].name
    shutil.copytree(env["run"], run, ignore=shutil.ignore_patterns("audit*"))
    summary = audit.run_audit(run, env["data"], methods=("gradcam",), limit=24, sanity_n=2, n_boot=50,
                              progress=False)
    other = tmp_path / "runs" / "candidate"
    shutil.copytree(run, other)
    monkeypatch.setenv("CXR_RUNS_DIR", str(run.parent))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["run"] = str(run)
    at.run()
    at.switch_page("views/shortcuts.py").run()
    assert not at.exception and not at.error, [e.value for e in at.exception]
    t = texts(at)
    assert "ROC AUC, lungs blanked" in t and "Lung-blanked probes" in t
    # run-file text is shown as plain text: its Markdown characters are escaped (dashboard.components.plain)
    assert "Findings" in t and components.plain(summary["findings"][0]["claim"]) in t
    assert plotly_charts(at) == 2  # the per-method chart, and the map of the model's features (core.feature_map)
    assert summary["feature_map"]["n"] == 24
    assert at.dataframe, "probe and method tables"
    for title in ("Does the model know where a film came from?", "ROAD: does removing", "Pointing game",
                  "Where does the model fail? Slices"):
        assert title in t, title
    assert images_shown(at) >= 1, "mean heatmaps or worst cases"
    # The button of a card with images lists them, each with its heatmap.
    with_paths = [c for c in summary["findings"] if c["paths"]]
    assert with_paths
    shown = images_shown(at)
    buttons = [b for b in at.button if b.key and b.key.startswith("sc_card_")]
    assert buttons
    buttons[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert images_shown(at) > shown
    # Two audited runs: every figure and card side by side.
    assert "Compare two audited runs" in texts(at)
    at.selectbox(key="sc_cmp_a").set_value(str(run))
    at.selectbox(key="sc_cmp_b").set_value(str(other)).run()
    assert not at.exception, [e.value for e in at.exception]
    frames = [d.value for d in at.dataframe]
    assert any("difference" in f.columns and len(f) > 20 for f in frames), "the figures side by side"
    assert any("change" in f.columns for f in frames), "the cards side by side"


def test_pages_folder_is_not_named_pages():
    """A `pages/` folder beside app.py switches Streamlit to legacy multipage mode on deep links."""
    assert not (Path(APP).parent / "pages").exists()


def test_dicom_upload_shows_no_patient_tags(env, tmp_path):
    from test_report import _dicom_with_patient

    at = start(env, "explain")
    at.file_uploader[0].set_value(("scan.dcm", _dicom_with_patient(tmp_path), "application/dicom")).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert plotly_charts(at) == 1, "decoded and explained"
    t = texts(at) + "\n".join(captions(at))
    for secret in ("Doe", "Johnathan", "PID-918273", "19450101", "Secret Hospital"):
        assert secret not in t


# --------------------------------------------------------------------------- fresh clone


@pytest.mark.parametrize("with_data", [False, True], ids=["nodata", "data"])
@pytest.mark.parametrize("page", PAGES)
def test_shipped_model_every_page(page, with_data, tmp_path, monkeypatch, request, shipped_run):
    """The shipped model as on a fresh clone (no runs), without data and with ../shared/cxr."""
    if with_data:
        monkeypatch.setenv("CXR_DATA_DIR", str(request.getfixturevalue("cxr_root")))
    else:
        (tmp_path / "data").mkdir()
        monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CXR_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert at.session_state["run"] == str(config.DEFAULT_RUN)
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    t = texts(at)
    if page in ("data", "errors") and not with_data:
        assert "core.data download" in t
    if page == "about":
        # The card of THIS model is on the page: its sha256 (the card must name it, tests/test_faults.py).
        assert runs.sha256(shipped_run / "model.keras") in t, "the About page does not show the model card"
        assert "missing from this checkout" not in t
    if page == "explain":
        at.file_uploader[0].set_value(("chest.png", chest_like_png(), "image/png")).run()
        assert not at.exception and not at.error
        assert any("Grad-CAM for" in c for c in map_captions(at))


def test_seed_spread_from_sibling_runs(env, tmp_path, monkeypatch):
    """Two runs that differ only in their seed: the spread across seeds is shown beside the AUCs."""
    if env["kind"] == "nodata":
        pytest.skip("covered by the data case")
    root = tmp_path / "runs"
    for i, seed in enumerate((11, 12)):
        r = root / f"2099010{i}-000000-seed{seed}"
        shutil.copytree(env["run"], r, ignore=shutil.ignore_patterns("audit*", "model.keras"))
        cfg = json.loads((r / "config.json").read_text())
        cfg["seed"] = seed
        (r / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("CXR_RUNS_DIR", str(root))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["run"] = str(r)
    at.run()
    at.switch_page("views/evaluation.py").run()
    assert not at.exception and not at.error
    assert any(m.label == "ROC AUC across 2 seeds" for m in at.metric), [m.label for m in at.metric]


# --------------------------------------------------------------------------- the lung warning


def flat_map_run(root: Path, side: int = 64) -> Path:
    """A valid run whose network's last convolution is constant, so every Grad-CAM map is flat
    (blank after normalisation): the map says nothing, least of all 'outside the lungs'."""
    import keras

    inp = keras.Input((side, side, 1), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="last_conv",
                            kernel_initializer="zeros", bias_initializer="ones")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(2, name="logits")(x)
    model = keras.Model(inp, keras.layers.Activation("softmax", name="probs")(x))
    run = root / "20990101-000000-flat"
    run.mkdir(parents=True)
    model.save(run / "model.keras")
    cfg = {"task": "binary", "classes": ["covid", "other"], "size": side, "name": "flat",
           "model_sha256": runs.sha256(run / "model.keras")}
    (run / "config.json").write_text(json.dumps(cfg))
    return run


def test_a_blank_map_is_not_called_outside_the_lungs(tmp_path, monkeypatch, cxr_root):
    """Lungs cover ~28 % of a film, so a uniform (or blank) map has less than half its heat there;
    the page used to warn 'most of the heat lies outside the lungs' for it (fails on d0fbe2d)."""
    run = flat_map_run(tmp_path / "runs")
    monkeypatch.setenv("CXR_DATA_DIR", str(cxr_root))
    monkeypatch.setenv("CXR_RUNS_DIR", str(run.parent))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["run"] = str(run)
    at.run()
    name, data = real_xray(cxr_root)
    at.file_uploader[0].set_value((name, data, "image/png")).run()
    assert not at.exception, [e.value for e in at.exception]
    warns = [str(w.value) for w in at.warning]
    assert not any("outside the lungs" in w or "avoids the lungs" in w for w in warns), warns
    assert "lungs" in texts(at)


# --------------------------------------------------------------------------- caches follow the files


def _copy_of_shipped(tmp_path, monkeypatch) -> Path:
    """A copy of the shipped run under a fresh runs folder, and an empty data root."""
    run = tmp_path / "runs" / "20990101-000000-copy"
    shutil.copytree(config.DEFAULT_RUN, run, ignore=shutil.ignore_patterns("audit_maps"))
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CXR_RUNS_DIR", str(run.parent))
    return run


def _metric(at: AppTest, label: str) -> str:
    values = [m.value for m in at.metric if m.label == label]
    assert values, f"no metric {label!r}: {[m.label for m in at.metric]}"
    return values[0]


def test_rewritten_metrics_and_audit_are_shown_without_a_restart(tmp_path, monkeypatch, shipped_run):
    """core.evaluate / core.audit rewrite a run while the app runs: the next page run shows the new files."""
    from dashboard import components

    run = _copy_of_shipped(tmp_path, monkeypatch)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["run"] = str(run)
    at.run()
    at.switch_page("views/evaluation.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    m = json.loads((run / "metrics.json").read_text())
    before = _metric(at, "Internal test ROC AUC")
    assert before.startswith(f"{m['roc_auc']['value']:.2f} [")
    m["roc_auc"] = {"value": 0.123, "ci_low": 0.101, "ci_high": 0.146}
    runs.write_json(run / "metrics.json", m)  # what core.evaluate does: an atomic rewrite
    at.run()
    assert _metric(at, "Internal test ROC AUC") == "0.12 [0.10, 0.15]"

    at.switch_page("views/shortcuts.py").run()
    verdict = json.loads((run / "audit.json").read_text())["verdict"]
    assert components.plain(verdict) in [w.value for w in at.warning]  # run-file text shown as plain text
    a = json.loads((run / "audit.json").read_text())
    a["verdict"] = "A rewritten verdict that the page must show."
    runs.write_json(run / "audit.json", a)
    at.run()
    assert a["verdict"] in [w.value for w in at.warning]


def test_swapped_model_is_loaded_and_checked_again(tmp_path, monkeypatch, shipped_run):
    """A retrained (or tampered) model.keras replaces the old one while the app runs: the next
    page run uses the new model, and a model whose sha256 no longer matches config.json is refused."""
    from core import model as cmodel

    run = _copy_of_shipped(tmp_path, monkeypatch)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["run"] = str(run)
    at.run()
    at.switch_page("views/explain.py").run()
    at.file_uploader[0].set_value(("chest.png", chest_like_png(), "image/png")).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    before = _metric(at, "P(covid)")

    # A new model whose P(covid) is the same known value for every image (zero kernel, fixed bias).
    cfg = runs.read_config(run)
    target = 0.2 if before != "0.200" else 0.7
    new = cmodel.build("default", "binary", int(cfg["size"]))
    logits = new.get_layer("logits")
    kernel, _ = logits.get_weights()
    logits.set_weights([np.zeros_like(kernel), np.array([np.log(target / (1 - target)), 0.0], np.float32)])
    runs.atomic_save_model(new, run / "model.keras")
    cfg["model_sha256"] = runs.sha256(run / "model.keras")
    runs.write_json(run / "config.json", cfg)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert _metric(at, "P(covid)") == f"{target:.3f}"

    # Tampered bytes under the same config.json: the sha256 check runs again and refuses it.
    data = bytearray((run / "model.keras").read_bytes())
    data[-100] ^= 0xFF
    tmp = run / ".model.keras.swap"
    tmp.write_bytes(bytes(data))
    os.replace(tmp, run / "model.keras")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("sha256" in e.value for e in at.error), [e.value for e in at.error]
    assert not any(m.label == "P(covid)" for m in at.metric)


def test_evaluation_page_opens_with_the_leave_one_source_out_table(tmp_path, monkeypatch, shipped_run):
    """The headline of the Evaluation page is the run's crossval.json, row by row, mean and worst."""
    from core import crossval

    run = _copy_of_shipped(tmp_path, monkeypatch)
    folds = {"nih": {"n": 220, "roc_auc": {"value": 0.611, "ci_low": 0.55, "ci_high": 0.67},
                     "specificity": {"value": 0.123, "ci_low": 0.08, "ci_high": 0.17}},
             "hannover": {"n": 166, "roc_auc": {"value": 0.944, "ci_low": 0.91, "ci_high": 0.97},
                          "sensitivity": {"value": 0.981, "ci_low": 0.96, "ci_high": 1.0}}}
    runs.write_json(run / "crossval.json", crossval.summarise(folds))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["run"] = str(run)
    at.run()
    at.switch_page("views/evaluation.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = next(d.value for d in at.dataframe if "held-out source" in d.value.columns)
    assert table["held-out source"].tolist() == ["nih", "hannover"]
    assert table["AUC vs other class [95% CI]"].tolist() == ["0.611 [0.550, 0.670]", "0.944 [0.910, 0.970]"]
    assert table["specificity"].tolist()[0] == "0.123 [0.080, 0.170]"
    assert "Mean AUC 0.78, worst 0.61 (nih)" in texts(at)
    (run / "crossval.json").unlink()
    at.run()
    assert "has no leave-one-source-out table" in texts(at)


def _plotly_array(v) -> np.ndarray:
    """A trace's x or y as plotly serialises it: a list, or a typed array ``{dtype, bdata}``."""
    if isinstance(v, dict):
        import base64

        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).astype(float)
    return np.asarray(v, float)


def test_training_curves_draw_one_line_per_network_and_no_index(env):
    """history.csv holds a row per network and epoch: every drawn line is one network's epochs in
    order (never a line running back from the last epoch of one network to the first of the next),
    and the ``member`` index is not drawn as if it were a measurement."""
    cfg = json.loads((env["run"] / "config.json").read_text())
    at = start(env, "training")
    traces = [t for chart in at.get("plotly_chart") for t in json.loads(chart.proto.spec)["data"]]
    assert traces
    for t in traces:
        assert "member" != t.get("name"), "the network index drawn as a curve"
        x = _plotly_array(t["x"])
        assert np.all(np.diff(x) > 0), (t.get("name"), x[:12])
    auc = {t["name"] for t in traces if t["name"].startswith("val_auc")}
    assert len(auc) == cfg["members"], auc  # one validation AUC line per network
