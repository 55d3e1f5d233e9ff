"""ROAD (core.road): noisy linear imputation, removal orders, and scores with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import shortcut_world as world

from core import road


def test_imputation_reconstructs_a_linear_ramp_exactly():
    """ROAD's 8-neighbour equations hold for any linear image: an interior hole is filled exactly."""
    yy, xx = np.mgrid[:40, :40].astype(np.float32)
    img = 20 + 3 * xx + 2 * yy
    hole = np.zeros((40, 40), bool)
    hole[10:30, 8:25] = True
    filled = road.impute(img, hole, noise=0.0, grid=None)
    assert np.abs(filled - img).max() < 0.01  # (up to the solver's whisper of regularisation)
    assert np.array_equal(filled[~hole], img[~hole])  # kept pixels are never touched


def test_imputation_noise_and_batch_of_masks():
    img = world.films(1, [False], [False], seed=1)[0]
    masks = np.stack([np.zeros((32, 32), bool)] * 3)
    masks[0, 14:18, 20:24] = True
    masks[1, 10:20, 10:20] = True
    masks[2, ::2, ::2] = True
    out = road.impute(img, masks, noise=0.01, seed=3)
    assert out.shape == (3, 32, 32)
    for m, o in zip(masks, out, strict=True):
        assert np.array_equal(o[~m], img[~m])
        # Filled from the surroundings: closer to the truth than a fill with the image's mean.
        assert np.abs(o[m] - img[m]).mean() < 0.8 * np.abs(img.mean() - img[m]).mean()
    again = road.impute(img, masks, noise=0.01, seed=3)
    assert np.array_equal(out, again)  # seeded noise


def test_coarse_to_fine_solve_agrees_with_the_exact_solve():
    """The speed-up (exact up to 32 px, coarse-to-fine above) stays within a few % of the exact fill."""
    rng = np.random.default_rng(0)
    img = world.films(1, [True], [True], seed=4, size=128)[0]
    heat = road.random_maps(1, (128, 128), seed=2)[0]
    morf, lerf = road.removal_masks(heat)
    masks = np.concatenate([morf, lerf])
    exact = road.impute(img, masks, noise=0.0, grid=None)
    fast = road.impute(img, masks, noise=0.0)
    err = np.abs(exact - fast)[masks]
    assert err.mean() < 0.05 * img.std()
    scattered = rng.random((128, 128)) < 0.5
    e2 = np.abs(road.impute(img, scattered, noise=0.0, grid=None) - road.impute(img, scattered, noise=0.0))
    assert e2[scattered].mean() < 0.02 * img.std()


def test_removal_masks_take_exact_fractions_in_order():
    heat = np.zeros((10, 10), np.float32)
    heat[0, :5] = [5, 4, 3, 2, 1]  # ties (the zeros) are broken at random, but counts are exact
    morf, lerf = road.removal_masks(heat, fractions=(0.03, 0.5))
    assert morf[0].sum() == 3 and morf[0][0, :3].all()
    assert morf[1].sum() == 50 and lerf[1].sum() == 50
    assert not (lerf[0] & (heat > 0)).any()  # least relevant first never takes a hot pixel early
    assert not (morf[1] & lerf[1]).any()


def test_region_map_ranks_the_inside_first():
    m = world.lung_mask()
    r = road.region_map(m)
    assert r[m].min() > r[~m].max()
    morf, _ = road.removal_masks(r, fractions=(0.1,))
    assert m[morf[0]].all()


@pytest.fixture(scope="module")
def models():
    return {"marker": world.marker_model(), "lung": world.lung_model()}


def test_road_on_the_lungs_fails_for_the_marker_model_only(models):
    """Removing the lungs first moves a lung model's score; a source-marker model does not care."""
    x, covid, _ = world.evaluation()
    pos = x[covid]
    lungs = np.stack([road.region_map(world.lung_mask())] * len(pos))
    out = {}
    for name, m in models.items():
        res = road.road(m, pos, {"lungs": lungs, "random": road.random_maps(len(pos), (32, 32))})
        out[name] = res["lungs"]["combined"].mean()
        assert res["lungs"]["morf"].shape == (len(pos), len(road.FRACTIONS))
    assert out["lung"] > 0.2
    assert out["marker"] < 0.05
    assert out["lung"] > out["marker"] + 0.2


def test_random_maps_peak_anywhere():
    """The baseline map's maximum falls anywhere (the centre about as often as its area share: a
    smooth map's peak sits on the edge a little more often, as it does for any smooth map)."""
    maps = road.random_maps(600, (32, 32), seed=5)
    assert maps.min() == 0.0 and maps.max() == 1.0
    peaks = np.array([np.unravel_index(m.argmax(), m.shape) for m in maps])
    centre = ((peaks >= 8) & (peaks < 24)).all(axis=1).mean()  # the central quarter of the area
    assert 0.17 < centre < 0.33
