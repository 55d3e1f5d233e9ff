"""core.explain's pictures of a heatmap on the original film: display size, views, outline, alignment."""

from __future__ import annotations

import numpy as np
import pytest

from core import explain, inputs


def film(h=600, w=500):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx + yy) * 255.0 / (h + w)).astype(np.float32)


def test_display_film_keeps_own_resolution_and_downscales_only_large_films():
    small = film(600, 500)
    assert explain.display_film(small).shape == (600, 500)
    big = film(2048, 1536)
    shown = explain.display_film(big)
    assert max(shown.shape) == explain.DISPLAY_MAX and shown.shape == (1024, 768)


def test_overlay_view_at_zero_opacity_is_the_film_and_heat_lands_where_to_film_puts_it():
    f = film()
    heat = np.zeros((32, 32), np.float32)
    heat[4:8, 20:26] = 1.0  # a hot spot top right on the network's grid
    box = (0.25, 0.1, 0.75, 0.9)  # a lung-cropped network saw this part of the film
    hf = inputs.to_film(heat, box, f.shape)
    (plain,) = explain.film_views(f, hf, "overlay", alpha=0.0)
    assert plain.shape == (600, 500, 3) and np.abs(plain[..., 0].astype(float) - np.round(f)).max() <= 1
    (over,) = explain.film_views(f, hf, "overlay", alpha=0.6, colormap="jet")
    # the spot's centre on the film: box origin + grid position scaled to the box
    cy, cx = (0.25 + (6 / 32) * 0.5) * 600, (0.1 + (23 / 32) * 0.8) * 500
    ys, xs = np.nonzero(hf > 0.5)
    assert abs(ys.mean() - cy) < 6 and abs(xs.mean() - cx) < 6, (ys.mean(), xs.mean(), cy, cx)
    rb = over[..., 0].astype(float) - over[..., 2].astype(float)  # jet: red where hot, blue where cold
    assert rb[int(cy), int(cx)] > 50 and rb[500, 50] < -50
    assert hf[: int(0.25 * 600) - 2].max() == 0  # outside the box the network saw nothing


def test_side_by_side_and_wipe():
    f = film()
    hf = np.ones(f.shape, np.float32)
    pics = explain.film_views(f, hf, "side by side", alpha=0.5)
    assert len(pics) == 2 and pics[0].shape == pics[1].shape == (600, 500, 3)
    assert np.array_equal(pics[0][..., 0], pics[0][..., 2])  # the plain film is grey
    (w,) = explain.film_views(f, hf, "wipe", alpha=0.5, position=0.3)
    over = explain.film_views(f, hf, "overlay", alpha=0.5)[0]
    assert np.array_equal(w[:, :140], over[:, :140]) and np.array_equal(w[:, 160:], pics[0][:, 160:])
    with pytest.raises(ValueError, match="unknown view"):
        explain.film_views(f, hf, "mosaic")


def test_lung_outline_follows_the_mask():
    f = np.full((200, 200), 60, np.float32)
    mask = np.zeros((50, 50), bool)
    mask[10:40, 10:20] = True  # given at another size: resized to the film
    (pic,) = explain.film_views(f, np.zeros(f.shape, np.float32), "overlay", alpha=0.0, lung_mask=mask)
    white = (pic >= 200).all(axis=-1)
    ys, xs = np.nonzero(white)
    assert white.any() and 36 <= ys.min() <= 44 and 156 <= ys.max() <= 164 and 36 <= xs.min() <= 44
    assert not white[80, 60]  # the inside stays as it was
