"""core.markers: burned-in text and markers found on synthetic films with a known answer; the hand-labelled
list; the trust row, the audit step and the finding card built on them."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from core import audit_markers, findings, markers, runs, trust

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "benchmarks"))
import bench_markers  # noqa: E402


def chest(h: int = 600, w: int = 520, seed: int = 0) -> np.ndarray:
    """A smooth synthetic chest (body, two darker lungs, a bright midline) with film noise; no text."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 25, np.float32)
    cv2.ellipse(img, (w // 2, h // 2 + 40), (int(w * 0.45), int(h * 0.5)), 0, 0, 360, 170, -1)
    for cx in (int(w * 0.32), int(w * 0.68)):
        cv2.ellipse(img, (cx, int(h * 0.45)), (int(w * 0.14), int(h * 0.28)), 0, 0, 360, 85, -1)
    cv2.rectangle(img, (w // 2 - 18, 0), (w // 2 + 18, h), 200, -1)
    img = cv2.GaussianBlur(img, (0, 0), 12)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.float32)


def tagged(film: np.ndarray, text: str = "PORTABLE", org=(330, 50), scale: float = 0.9) -> np.ndarray:
    out = np.ascontiguousarray(film.copy())
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255.0, 2, cv2.LINE_AA)
    return out


def test_a_drawn_text_tag_is_found_where_it_was_drawn():
    film = tagged(chest())
    mask, boxes = markers.detect(film)
    assert mask.shape == film.shape and mask.dtype == bool and boxes.shape[1] == 4 and len(boxes) >= 1
    h, w = film.shape
    tag = (330 / w, 30 / h, 460 / w, 55 / h)  # where putText drew it (baseline at y=50)
    assert any(bench_markers.touches(b, tag, 0.0) for b in boxes)
    assert mask[40, 380] and not mask[h // 2, w // 2]  # on the tag, not on the chest


def test_a_clean_film_has_none():
    for seed in range(3):
        mask, boxes = markers.detect(chest(seed=seed))
        assert len(boxes) == 0 and not mask.any()


def test_a_laterality_letter_on_a_small_film_and_a_0_1_film():
    film = tagged(chest(256, 256), "L", (12, 34), 0.9)
    _, boxes = markers.detect(film)
    assert len(boxes) >= 1 and boxes[:, 0].min() < 0.15 and boxes[:, 1].min() < 0.15
    _, boxes01 = markers.detect(film / 255.0)
    assert len(boxes01) == len(boxes)


def test_not_a_film_raises_the_project_error():
    from core import images

    with pytest.raises(images.ImageError):
        markers.detect(np.zeros(5))


def test_on_grid_keeps_a_small_marker():
    mask = markers.box_mask(np.array([[0.05, 0.05, 0.07, 0.07]]), (1000, 1000), pad=0.0)
    grid = markers.on_grid(mask, (0.0, 0.0, 1.0, 1.0), 32)
    assert grid.dtype == bool and grid.shape == (32, 32) and grid[1:3, 1:3].any() and grid.sum() < 10


def test_the_labelled_list_loads_and_every_path_exists(cxr_root):
    labels = bench_markers.load_labels()
    assert len(labels) >= 60 and set(labels["collection"]) == {"ieee8023", "kermany", "nih", "hannover"}
    assert labels["has_marker"].isin([0, 1]).all() and 0 < labels["has_marker"].sum() < len(labels)
    assert all((cxr_root / p).is_file() for p in labels["path"])
    for has, boxes, kinds in zip(labels["has_marker"], labels["boxes"], labels["kinds"], strict=True):
        assert bool(boxes) == bool(has) and len(boxes) == len(kinds)
        assert all(0 <= v <= 1 for b in boxes for v in b) and all(b[0] < b[2] and b[1] < b[3] for b in boxes)


def test_marker_row_marks_heat_on_a_marker():
    m = np.zeros((64, 64), bool)
    m[2:8, 2:12] = True
    on = np.zeros((64, 64), np.float32)
    on[2:8, 2:12] = 1.0
    on += 0.01
    red = trust.marker_row(on, m)
    assert red["key"] == "markers" and red["mark"] == "red" and red["value"]["marker_ratio"] > 3
    assert trust.marker_row(np.ones((64, 64), np.float32), m)["mark"] == "green"  # a uniform map: ratio 1
    assert trust.marker_row(on, np.zeros((64, 64), bool))["mark"] == "green"  # nothing found
    assert trust.marker_row(np.zeros((64, 64), np.float32), m)["mark"] == "amber"  # a blank map


def _summary(ratios: dict) -> dict:
    methods = {}
    for name, ratio in ratios.items():
        area = 0.02
        methods[name] = {"all": {"n": 40, "n_marked": 30},
                         "source:nih": {"n": 20, "n_marked": 18, "heat_share": ratio * area, "area_share": area,
                                        "ratio": ratio, "paths": ["nih/a.png"]},
                         "source:kermany": {"n": 20, "n_marked": 12, "heat_share": area, "area_share": area,
                                            "ratio": 1.0, "paths": []}}
    return {"methods": {k: {"title": k.upper()} for k in ratios}, "markers": {"methods": methods}}


def test_the_finding_card_fires_and_high_needs_two_methods():
    cards = [c for c in findings.findings(_summary({"gradcam": 8.0, "rise": 7.0})) if c["kind"] == "marker_heat"]
    assert {c["severity"] for c in cards} == {"high"} and "nih" in cards[0]["claim"] and cards[0]["paths"]
    cards = [c for c in findings.findings(_summary({"gradcam": 8.0, "rise": 1.1})) if c["kind"] == "marker_heat"]
    assert {c["method"]: c["severity"] for c in cards} == {"gradcam": "medium", "rise": "ok"}
    assert not [c for c in findings.findings({"methods": {}}) if c["kind"] == "marker_heat"]


def test_the_audit_step_measures_heat_on_markers_per_collection(tmp_path):
    (tmp_path / "a").mkdir()
    plain, marked = chest(256, 256), tagged(chest(256, 256, seed=1), "L", (12, 34), 0.9)
    cv2.imwrite(str(tmp_path / "a" / "clean.png"), plain.astype(np.uint8))
    cv2.imwrite(str(tmp_path / "a" / "marked.png"), marked.astype(np.uint8))
    import pandas as pd

    test = pd.DataFrame({"path": ["a/clean.png", "a/marked.png"], "source": ["x", "x"]})
    heat = np.full((2, 32, 32), 0.01, np.float32)
    heat[1, 0:5, 0:5] = 1.0  # the second film's map sits on its letter
    res = audit_markers.markers_step(test, tmp_path, np.array([(0, 0, 1, 1)] * 2, float), {"m": heat}, False)
    assert res["n_films"] == 2 and res["n_marked"] == 1 and res["by_source"]["x"]["n_marked"] == 1
    g = res["methods"]["m"]["source:x"]
    assert g["ratio"] > 3 and g["paths"] == ["a/marked.png"]


@pytest.mark.slow
def test_the_trust_panel_has_the_markers_row(shipped_run):
    from core import case

    run = runs.open_run(shipped_run)
    film = tagged(chest(), "PORTABLE")
    ok, png = cv2.imencode(".png", film.astype(np.uint8))
    c = case.analyse(run, png.tobytes(), name="tagged.png")
    row = trust.row(case.trust_rows(run, c, "gradcam"), "markers")
    assert row is not None and row["mark"] in trust.MARKS and row["value"]["marker_area"] > 0


def test_shortcut_page_shows_heat_on_markers_per_collection(shipped_run, monkeypatch, tmp_path):
    """The shipped audit's `markers` block is laid out per method and collection on the Shortcut audit page."""
    from streamlit.testing.v1 import AppTest

    from core import config

    monkeypatch.setenv("CXR_RUNS_DIR", str(shipped_run.parent))
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))  # the table needs no images
    at = AppTest.from_file(str(config.REPO_ROOT / "dashboard" / "app.py"), default_timeout=120)
    at.session_state["run"] = str(shipped_run)
    at.run()
    at.switch_page("views/shortcuts.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Heat on burned-in text and markers" in [str(h.value) for h in at.subheader]
    table = next(d.value for d in at.dataframe if "times a uniform map" in d.value.columns)
    stored = runs.open_run(shipped_run).audit()["markers"]
    assert len(table) == sum(len(per) for per in stored["methods"].values())
    assert set(table["films"]) == {"all"} | set(stored["by_source"])
