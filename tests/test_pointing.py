"""Pointing game and heat mass (core.pointing) against expert lung boxes, and the boxes' mapping."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import shortcut_world as world

from core import explain, inputs, pointing


def test_point_known_answers():
    region = np.zeros((20, 20), bool)
    region[5:15, 5:15] = True
    inside = np.zeros((20, 20), np.float32)
    inside[10, 10] = 1
    outside = np.zeros((20, 20), np.float32)
    outside[0, 0] = 1
    assert pointing.point(inside, region) == {"hit": 1.0, "mass": 1.0, "area": 0.25}
    assert pointing.point(outside, region)["hit"] == 0.0
    flat = pointing.point(np.zeros((20, 20)), region)  # an empty map scores chance
    assert flat["hit"] == pytest.approx(0.25) and flat["mass"] == pytest.approx(0.25)


def test_read_boxes_scales_to_stored_files_and_skips_crops(tmp_path):
    img_dir = tmp_path / "ieee8023" / "images"
    img_dir.mkdir(parents=True)
    cv2.imwrite(str(img_dir / "a.png"), np.zeros((50, 100), np.uint8))  # stored at half the annotated size
    cv2.imwrite(str(img_dir / "b.png"), np.zeros((50, 50), np.uint8))  # a crop: aspect differs
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 100},
                       {"id": 2, "file_name": "b.png", "width": 200, "height": 100},
                       {"id": 3, "file_name": "gone.png", "width": 10, "height": 10}],
            "annotations": [{"image_id": 1, "bbox": [20, 10, 60, 80]}, {"image_id": 1, "bbox": [120, 10, 60, 80]},
                            {"image_id": 2, "bbox": [0, 0, 10, 10]}, {"image_id": 3, "bbox": [0, 0, 5, 5]},
                            {"image_id": 1, "bbox": None}]}
    path = tmp_path / pointing.BOXES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))
    boxes, counts = pointing.read_boxes(tmp_path)
    assert list(boxes) == ["ieee8023/images/a.png"]
    assert boxes["ieee8023/images/a.png"][0] == pytest.approx((0.1, 0.1, 0.9, 0.4))
    assert counts["aspect_mismatch"] == 1 and counts["missing_file"] == 1 and counts["used"] == 1
    m = pointing.box_mask(boxes["ieee8023/images/a.png"], (50, 100))
    assert m[25, 25] and m[25, 75] and not m[25, 50] and not m[2, 25]
    # Into the network's view of a lung crop (the right half of the film): only the right box remains.
    view = inputs.from_film(m.astype(np.float32), (0.0, 0.5, 1.0, 1.0), 32) >= 0.5
    assert view[16, 16] and not view[16, 2]
    assert pointing.read_boxes(tmp_path / "nowhere")[0] == {}


def test_gradcam_of_the_marker_model_misses_the_lungs():
    x, covid, _ = world.evaluation()
    lungs = world.lung_mask()
    hits = {}
    for name, m in (("marker", world.marker_model()), ("lung", world.lung_model())):
        heat = explain.explain_many(m, x[covid], "gradcam")
        hits[name] = np.mean([pointing.point(h, lungs)["hit"] for h in heat])
    assert hits["marker"] < 0.3 < 0.7 < hits["lung"]
