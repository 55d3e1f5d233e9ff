"""Nearest development films (core.neighbours) and the map of the model's features (core.feature_map):
issue 20, items 1 and 2.

- a re-encoded, resized copy of a development film finds the film itself among its nearest films;
- the shipped map's points are the shipped run's films (predictions.csv), and the audit records it;
- the sentence says when most neighbours share a collection or disagree with the call;
- the Shortcut audit page shows the map, and a film picked on it opens on the Explain page;
- an adopted run gets its map and its neighbours (its scored films stand in for development films).
"""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pandas as pd
import pytest
from test_adopted_pages import RUN_NAME, adopted_run
from test_dashboard import APP, TIMEOUT, plotly_charts, texts

from core import case, feature_map, neighbours, report, runs

AppTest = pytest.importorskip("streamlit.testing.v1").AppTest


def _reencoded(path, scale: float = 0.8, quality: int = 85) -> bytes:
    """The film resized by ``scale`` and saved again as JPEG: a near-duplicate, not the same bytes."""
    film = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    h, w = film.shape
    film = cv2.resize(film, (int(w * scale), int(h * scale)), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", film, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


# --------------------------------------------------------------------------- core, shipped run
def test_the_shipped_index_holds_the_development_films_paths_only(shipped_run):
    run = runs.open_run(shipped_run)
    index = neighbours.load_index(run)
    assert index is not None, "assets/model ships neighbours.npz"
    dev = run.predictions()
    dev = dev[dev["split"] != "test"]
    assert set(index.table["path"]) == set(dev["path"])
    assert index.model_sha256 == run.config["model_sha256"]
    assert index.unit.shape[0] == len(index.table) and index.unit.ndim == 2  # features, never pixels
    assert np.allclose(np.linalg.norm(index.unit, axis=1), 1.0, atol=1e-2)
    assert (run.path / neighbours.INDEX_FILE).stat().st_size < 2_000_000


def test_neighbours_of_a_film_include_its_near_duplicate(shipped_run, shipped_lungs, cxr_root):
    run = runs.open_run(shipped_run)
    table = neighbours.load_index(run).table
    picks = table.groupby("source").head(1)["path"].tolist()  # one development film per collection
    for rel in picks:
        c = case.analyse(run, _reencoded(cxr_root / rel), name="copy.jpg")
        near = case.neighbours(run, c, call="covid")
        assert list(near.columns) == ["path", "label", "source", "distance"]
        assert rel in near["path"].tolist()[:2], (rel, near)
        assert near["distance"].is_monotonic_increasing and near["distance"].iloc[0] < 0.05
        # excluded (the film itself opened from the map), it is gone and another film comes first
        assert rel not in case.neighbours(run, c, exclude=(rel,))["path"].tolist()
    t0 = time.perf_counter()
    for _ in range(20):
        neighbours.nearest(run, c.features)
    assert (time.perf_counter() - t0) / 20 < 0.2  # target 50 ms warm (bench_neighbours.py); loose here


def test_the_sentence_says_one_collection_and_disagreement():
    t = pd.DataFrame({"source": ["kermany"] * 4 + ["nih"], "positive": [False] * 5})
    s = neighbours.describe(t, "covid")
    assert "4 of the 5" in s and "kermany" in s and "disagrees with the call (covid)" in s
    mixed = pd.DataFrame({"source": ["a", "b", "c", "a", "b"], "positive": [True] * 5})
    assert neighbours.describe(mixed, "covid") is None
    assert neighbours.describe(mixed, "not covid").startswith("5 of the 5 carry")
    assert neighbours.describe(mixed, "withheld") is None and neighbours.describe(mixed.head(0)) is None


def test_the_case_report_has_a_short_table_of_them_without_file_names():
    near = pd.DataFrame({"path": ["kermany/NORMAL/person1_a.jpeg"] * 2, "label": ["normal", "pneumonia"],
                         "source": ["kermany"] * 2, "distance": [0.01, 0.02]})
    near.attrs["sentence"] = "2 of the 2 films this one most resembles, to the model, come from one collection."
    img = np.zeros((64, 64), np.uint8)
    page = report.case_report_html(img, None, {"covid": 0.9}, 0.5, run_id="r", neighbours=near)
    assert "most resembles, to the model" in page and "pneumonia" in page and "0.020" in page
    assert "person1_a" not in page  # the report names no file
    pdf = report.case_report_pdf(img, None, {"covid": 0.9}, 0.5, run_id="r", neighbours=near)
    assert b"distance 0.010" in pdf and b"person1_a" not in pdf


def test_the_shipped_map_points_are_the_runs_films(shipped_run):
    run = runs.open_run(shipped_run)
    table = feature_map.load(run)
    preds = run.predictions()
    assert table is not None, "assets/model ships feature_map.csv"
    assert sorted(table["path"]) == sorted(preds["path"])  # every test and development film, once
    merged = table.merge(preds[["path", "split", "label", "source", "p_covid"]], on="path", suffixes=("", "_pred"))
    for col in ("split", "label", "source"):
        assert (merged[col] == merged[f"{col}_pred"]).all(), col
    assert np.allclose(merged["p"], merged["p_covid"], atol=1e-4)
    assert np.isfinite(table[["x", "y"]].to_numpy()).all()
    info = run.audit()["feature_map"]
    assert info["file"] == feature_map.MAP_FILE and info["n"] == len(table) and info["method"] == feature_map.METHOD
    assert 0.5 < info["trustworthiness"] <= 1.0
    wrong = table[table["outcome"].isin(["false positive", "false negative"])]
    assert len(wrong) and (wrong["call"] != "").all()


def test_embed_keeps_neighbours_of_two_clusters():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (60, 20)), rng.normal(6, 1, (60, 20))]).astype(np.float32)
    xy = feature_map.embed(x, "tsne")
    assert xy.shape == (120, 2)
    far = np.linalg.norm(xy[:60].mean(0) - xy[60:].mean(0))
    assert far > 3 * xy[:60].std(0).mean()  # the two clusters stay apart
    assert feature_map.keeps_neighbours(x, xy) > 0.9
    with pytest.raises(ValueError, match="unknown map method"):
        feature_map.embed(x, "isomap")


# --------------------------------------------------------------------------- dashboard
def _app(run) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["run"] = str(run)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_the_audit_page_shows_the_map(shipped_run, monkeypatch):
    monkeypatch.setenv("CXR_RUNS_DIR", str(shipped_run.parent))
    at = _app(shipped_run)
    at.switch_page("views/shortcuts.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "A map of the model's features" in texts(at)
    charts = [c for c in at.get("plotly_chart") if "sc_map" in str(c.proto.id)]
    assert charts, "the map is drawn"
    spec = json.loads(charts[0].proto.spec)
    paths = {p[0] for tr in spec["data"] for p in tr.get("customdata", [])}
    assert paths == set(runs.open_run(shipped_run).predictions()["path"])
    at.radio(key="sc_map_by").set_value("outcome").run()
    assert not at.exception, [e.value for e in at.exception]


def test_a_film_picked_on_the_map_opens_on_explain(shipped_run, cxr_root, monkeypatch):
    monkeypatch.setenv("CXR_RUNS_DIR", str(shipped_run.parent))
    monkeypatch.setenv("CXR_DATA_DIR", str(cxr_root))
    dev = runs.open_run(shipped_run).predictions()
    rel = dev[dev["split"] != "test"]["path"].iloc[0]  # a development film: not in the test list by itself
    at = _app(shipped_run)
    at.session_state["explain_open"] = rel  # what the map's selection sets before st.switch_page
    at.switch_page("views/explain.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="explain_pick").value == rel
    assert "The development films it most resembles, to the model" in texts(at)
    assert plotly_charts(at) >= 1


# --------------------------------------------------------------------------- adopted run
@pytest.mark.slow  # adopts a small model on 24 synthetic films, maps them and explains one
def test_an_adopted_run_gets_its_map_and_neighbours(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    run, data = adopted_run(tmp_path)
    runs.write_json(run / "audit.json", {"run": RUN_NAME, "n_images": 0, "findings": []})
    assert feature_map.main(["--run", str(run), "--data", str(data), "--json"]) == 0
    handle = runs.open_run(run)
    table = feature_map.load(handle)
    assert sorted(table["path"]) == sorted(handle.predictions()["path"])
    assert handle.audit()["feature_map"]["n"] == len(table)
    index = neighbours.load_index(handle)
    assert len(index.table) == len(table)  # no development films: its scored films stand in
    rel = table["path"].iloc[0]
    c = case.analyse(handle, data / rel)
    assert case.neighbours(handle, c)["path"].iloc[0] == rel
    monkeypatch.setenv("CXR_DATA_DIR", str(data))
    monkeypatch.setenv("CXR_RUNS_DIR", str(run.parent))
    at = _app(run)
    at.switch_page("views/shortcuts.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("sc_map" in str(c.proto.id) for c in at.get("plotly_chart"))
