"""core.inputs: the lung crop and the way back from the network's grid to the film."""

from __future__ import annotations

import numpy as np
import pytest

from core import datasets, inputs


def _two_lungs(h=128, w=128, top=30, bottom=100, left=20, right=108):
    prob = np.zeros((h, w), np.float32)
    mid = (left + right) // 2
    prob[top:bottom, left:mid - 6] = 0.9
    prob[top:bottom, mid + 6:right] = 0.9
    return prob


def test_lung_box_encloses_both_lungs_with_margin():
    box = inputs.lung_box(_two_lungs(), {"margin": 0.0, "trim": 0.0})
    assert box == pytest.approx((30 / 128, 20 / 128, 100 / 128, 108 / 128))
    wide = inputs.lung_box(_two_lungs(), {"margin": 0.1})
    assert wide[0] < box[0] and wide[1] < box[1] and wide[2] > box[2] and wide[3] > box[3]


@pytest.mark.parametrize("prob", [np.zeros((128, 128)), _two_lungs(top=60, bottom=66)])
def test_no_lungs_or_a_sliver_is_not_a_box(prob):
    assert inputs.lung_box(prob) is None


def test_to_film_puts_the_heat_inside_the_box_only():
    heat = np.zeros((8, 8), np.float32)
    heat[0, 0] = 1.0  # hot top-left cell of the network's grid
    box = (0.5, 0.25, 1.0, 0.75)
    film = inputs.to_film(heat, box, (200, 400))
    assert film.shape == (200, 400)
    assert film[:100].max() == 0 and film[:, :100].max() == 0 and film[:, 300:].max() == 0
    y, x = np.unravel_index(np.argmax(film), film.shape)
    assert 100 <= y < 120 and 100 <= x < 130  # the box's own top-left corner
    assert film.max() <= 1.0 and film.min() >= 0.0


def test_from_film_inverts_to_film_on_the_box():
    rng = np.random.default_rng(0)
    heat = rng.random((16, 16)).astype(np.float32)
    box = (0.1, 0.2, 0.9, 0.8)
    back = inputs.from_film(inputs.to_film(heat, box, (480, 640)), box, 16)
    assert np.corrcoef(back.ravel(), heat.ravel())[0, 1] > 0.9


def test_settings_of_a_run_config():
    assert inputs.settings({}) is None and inputs.settings({"lung_crop": None}) is None
    assert inputs.settings({"lung_crop": {}}) == inputs.LUNG_CROP  # an empty dict: the defaults
    s = inputs.settings({"lung_crop": {"margin": 0.2}})
    assert s["margin"] == 0.2 and s["threshold"] == inputs.LUNG_CROP["threshold"]


def test_real_films_are_cropped_to_their_lungs(cxr_root):
    table = datasets.load_table(cxr_root, sources=["nih", "kermany"])
    paths = table.groupby("source").head(3)["path"].tolist()
    films = [inputs.images.decode(cxr_root / p) for p in paths]
    x, boxes, fell_back = inputs.prepare(films, 96, inputs.LUNG_CROP)
    assert x.shape == (len(paths), 96, 96) and not fell_back.any()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert ((area > 0.3) & (area < 0.98)).all()  # a real crop, not the whole film
    full, full_boxes, _ = inputs.prepare(films, 96, None)
    assert np.allclose(full_boxes, inputs.FULL_BOX) and not np.allclose(full, x)


def test_a_blank_film_falls_back_to_the_whole_film():
    x, boxes, fell_back = inputs.prepare([np.full((300, 300), 128.0, np.float32)], 64, inputs.LUNG_CROP)
    assert fell_back.tolist() == [True] and np.allclose(boxes[0], inputs.FULL_BOX)
    assert np.allclose(x[0], 128.0)


def test_a_stray_speck_does_not_stretch_the_box():
    prob = _two_lungs()
    prob[2, 2] = prob[125, 125] = 1.0
    assert inputs.lung_box(prob, {"margin": 0.0}) == pytest.approx(inputs.lung_box(_two_lungs(), {"margin": 0.0}), abs=0.02)
