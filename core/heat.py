"""Where one heatmap's energy lies: in the lungs, in the border band, in the top band, in a corner.

:func:`heat_share` is the per-map measure under both the whole-run audit (:mod:`core.audit`, one
row of ``audit.csv`` per image and method) and the trust panel of one film (:mod:`core.trust`).
"""

from __future__ import annotations

import cv2
import numpy as np


def fit_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``mask`` as a bool array of ``shape`` (nearest-neighbour resize when the sizes differ)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == tuple(shape):
        return mask
    return cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0


def heat_share(heatmap: np.ndarray, lung_mask: np.ndarray, border: float = 0.1, top: float = 0.15) -> dict:
    """Where a heatmap's energy lies, as shares of its total (non-negative) energy.

    Returns ``in_lung_share`` (energy inside ``lung_mask``), ``lung_area_share`` (the lungs'
    share of the image: what a uniform map would give), ``lung_ratio`` (= in_lung_share /
    lung_area_share; above 1 means the map favours the lungs), ``border_share`` (energy in the
    band of ``border`` x side along all four edges) and ``top_share`` (energy in the top
    ``top`` x height rows). An all-zero map counts as uniform.
    """
    h = np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0)
    if h.ndim != 2:
        raise ValueError(f"heat_share() takes one heatmap (H, W); got shape {h.shape}")
    h = np.clip(h, 0, None)
    total = h.sum()
    if total <= 0:
        h = np.ones_like(h)
        total = h.sum()
    m = fit_mask(lung_mask, h.shape)
    rows, cols = h.shape
    b_r, b_c = int(round(border * rows)), int(round(border * cols))
    band = np.zeros(h.shape, dtype=bool)
    if b_r:
        band[:b_r] = band[-b_r:] = True
    if b_c:
        band[:, :b_c] = band[:, -b_c:] = True
    t = int(round(top * rows))
    area = float(m.mean())
    share = float(h[m].sum() / total)
    return {
        "in_lung_share": share,
        "lung_area_share": area,
        "lung_ratio": share / area if area > 0 else float("nan"),
        "border_share": float(h[band].sum() / total),
        "top_share": float(h[:t].sum() / total) if t else 0.0,
    }


# side of the corner squares, as a fraction of each side (a burned-in tag or laterality letter sits in one)
CORNER_SIDE = 0.2


def corner_share(heatmap, side: float = CORNER_SIDE) -> dict:
    """The largest share of a heatmap's (non-negative) energy in one corner square (``side`` x each side):
    ``corner_share``, which ``corner`` (top-left, top-right, bottom-left, bottom-right) and ``corner_area``
    (the square's share of the map: what a uniform map puts there). An all-zero map counts as uniform."""
    h = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0), 0, None)
    if h.ndim != 2:
        raise ValueError(f"corner_share() takes one heatmap (H, W); got shape {h.shape}")
    if not h.sum() > 0:
        h = np.ones_like(h)
    r, c = max(1, round(side * h.shape[0])), max(1, round(side * h.shape[1]))
    boxes = {"top-left": h[:r, :c], "top-right": h[:r, -c:], "bottom-left": h[-r:, :c], "bottom-right": h[-r:, -c:]}
    shares = {k: float(v.sum() / h.sum()) for k, v in boxes.items()}
    best = max(shares, key=shares.get)
    return {"corner_share": shares[best], "corner": best, "corner_area": r * c / h.size}
