"""Pictures of heatmaps: colour maps, overlays, titled panels and the views on the original film.

No TensorFlow or Keras here, even indirectly (the dashboard and reports draw without it).
:func:`overlay` blends a map over the image with an OpenCV colour map and :func:`panel` puts
several overlays side by side with titles. :func:`film_views` draws a map on the original film
(overlay, side by side, or a wipe), with the lungs' outline when asked.
"""

from __future__ import annotations

import cv2
import numpy as np

from core.explain.registry import TITLES


def colormaps() -> list[str]:
    """Names accepted by :func:`overlay` (OpenCV colour maps), e.g. jet, inferno, viridis, turbo."""
    return sorted(n[len("COLORMAP_"):].lower() for n in dir(cv2) if n.startswith("COLORMAP_"))


def _colormap(name: str) -> int:
    code = getattr(cv2, f"COLORMAP_{str(name).upper()}", None)
    if code is None:
        raise ValueError(f"unknown colormap {name!r}; choose one of {colormaps()}")
    return code


def _to_rgb(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3):
        raise ValueError(f"expected a grey (H, W) or RGB (H, W, 3) image; got shape {np.shape(image)}")
    if img.dtype != np.uint8:
        img = np.nan_to_num(img.astype(np.float32, copy=False), copy=False)
        img = (np.clip(img, 0, 255) + 0.5).astype(np.uint8)
    return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img


def quantize(heatmap) -> np.ndarray:
    """A [0, 1] heatmap as uint8 levels 0-255, the levels :func:`colorize` maps to colours
    (a quarter of the memory of float32; :func:`colorize` and :func:`overlay` take it as is)."""
    h = np.nan_to_num(np.asarray(heatmap, dtype=np.float32))
    return (np.clip(h, 0.0, 1.0) * 255).round().astype(np.uint8)


def colorize(heatmap, colormap: str = "jet", size: tuple[int, int] | None = None) -> np.ndarray:
    """A heatmap as a uint8 RGB picture, resized to ``size`` = (H, W) if given.

    ``heatmap`` is float in [0, 1], or uint8 levels from :func:`quantize` (the same colours).
    """
    h = np.asarray(heatmap).squeeze()
    if h.ndim != 2:
        raise ValueError(f"expected a 2-D heatmap; got shape {np.shape(heatmap)}")
    if h.dtype != np.uint8:
        h = np.nan_to_num(h.astype(np.float32, copy=False))
        if size is not None and h.shape != tuple(size):
            h = cv2.resize(h, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        h = quantize(h)
    elif size is not None and h.shape != tuple(size):
        h = cv2.resize(h, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(cv2.applyColorMap(h, _colormap(colormap)), cv2.COLOR_BGR2RGB)


def overlay(image, heatmap, alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped heatmap over the image: uint8 RGB (H, W, 3) at the image's size.

    ``image`` is grey (H, W) in [0, 255] (or RGB); ``heatmap`` any size in [0, 1] (resized), or
    uint8 levels from :func:`quantize`;
    ``alpha`` in [0, 1] is the heatmap's weight: 0 returns the image itself.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    rgb = _to_rgb(image)
    heat = colorize(heatmap, colormap, rgb.shape[:2])
    return cv2.addWeighted(rgb, 1.0 - float(alpha), heat, float(alpha), 0.0)


DISPLAY_MAX = 1024  # films larger than this (longer side) are downscaled for display only
OUTLINE_RGB = (255, 255, 255)
BOX_RGB = (255, 210, 0)
VIEWS = ("overlay", "side by side", "wipe")


def display_film(film, max_side: int = DISPLAY_MAX) -> np.ndarray:
    """The film (H, W) at its own resolution, downscaled (area) only when its longer side exceeds ``max_side``."""
    f = np.asarray(film, np.float32)
    if f.ndim == 3:
        f = f[..., :3].mean(axis=-1) if f.shape[-1] in (3, 4) else f[..., 0]
    h, w = f.shape
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return f
    return cv2.resize(f, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def draw_outline(rgb: np.ndarray, mask, colour=OUTLINE_RGB, thickness: int | None = None) -> np.ndarray:
    """A copy of ``rgb`` with the outline of the boolean ``mask`` drawn on it.

    The mask may be smaller than the picture (a lung mask found on a small copy of the film):
    its contour is traced at the mask's own size and scaled onto the picture, which is cheaper
    and smoother than resizing the mask.
    """
    out = np.ascontiguousarray(rgb).copy()
    m = (np.asarray(mask) > 0).astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    sy, sx = out.shape[0] / m.shape[0], out.shape[1] / m.shape[1]
    scale = np.array([sx, sy], np.float32)
    shift = (scale - 1) / 2  # pixel centres: mask pixel k covers picture pixels k*s .. (k+1)*s
    contours = [np.round(c.astype(np.float32) * scale + shift).astype(np.int32) for c in contours]
    t = thickness or max(1, round(max(out.shape[:2]) / 400))
    cv2.polylines(out, contours, True, colour, t, cv2.LINE_AA)
    return out


def draw_box(rgb: np.ndarray, box, colour=BOX_RGB) -> np.ndarray:
    """A copy of ``rgb`` with a fractional box (y0, x0, y1, x1) drawn on it (the region a cropped network saw)."""
    out = np.ascontiguousarray(rgb).copy()
    h, w = out.shape[:2]
    y0, x0, y1, x1 = (int(round(v)) for v in (box[0] * h, box[1] * w, box[2] * h - 1, box[3] * w - 1))
    cv2.rectangle(out, (x0, y0), (x1, y1), colour, max(1, round(max(h, w) / 400)), cv2.LINE_AA)
    return out


def wipe(base: np.ndarray, top: np.ndarray, position: float) -> np.ndarray:
    """``top`` left of ``position`` (fraction of the width), ``base`` right of it, a thin line between."""
    if base.shape != top.shape:
        raise ValueError(f"wipe needs two images of one shape; got {base.shape} and {top.shape}")
    w = base.shape[1]
    cut = int(round(np.clip(position, 0.0, 1.0) * w))
    out = base.copy()
    out[:, :cut] = top[:, :cut]
    if 0 < cut < w:
        out[:, max(0, cut - 1) : cut + 1] = 255
    return out


def film_views(film, heat_film, view: str = "overlay", alpha: float = 0.4, colormap: str = "jet",
               lung_mask=None, box=None, position: float = 0.5) -> list[np.ndarray]:
    """The pictures of one view of a heatmap on the original film, each uint8 RGB at the film's size.

    ``film`` is the grey film at display resolution, ``heat_film`` the map already on it
    (:func:`core.inputs.to_film`; float in [0, 1] or uint8 levels from :func:`quantize`).
    ``view``: ``"overlay"`` -> [overlay]; ``"side by side"`` -> [film, overlay] (to be shown with
    linked zoom); ``"wipe"`` -> [overlay left of ``position``, film right of it]. ``lung_mask`` draws the lungs' outline on every picture; ``box`` (not the
    whole film) marks the region a lung-cropped network saw.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose one of {VIEWS}")
    plain = _to_rgb(film)
    over = overlay(plain, heat_film, alpha, colormap)
    pics = {"overlay": [over], "side by side": [plain, over], "wipe": [wipe(plain, over, position)]}[view]
    out = []
    for pic in pics:
        if lung_mask is not None:
            pic = draw_outline(pic, lung_mask)
        if box is not None and tuple(box) != (0.0, 0.0, 1.0, 1.0):
            pic = draw_box(pic, box)
        out.append(pic)
    return out


def _title_bar(text: str, width: int) -> np.ndarray:
    height = max(18, int(round(width * 0.09)))
    bar = np.zeros((height, width, 3), np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = height / 40.0
    thick = 1 if height < 40 else 2
    while len(text) > 1 and cv2.getTextSize(text, font, scale, thick)[0][0] > width - 6:
        text = text[:-1]
    (tw, th), _ = cv2.getTextSize(text, font, scale, thick)
    org = (max(3, (width - tw) // 2), (height + th) // 2)
    cv2.putText(bar, text, org, font, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return bar


def panel(image, maps: dict, alpha: float = 0.4, colormap: str = "jet", show_image: bool = True,
          gap: int = 4) -> np.ndarray:
    """Side-by-side overlays with a title above each: uint8 RGB (title + H, k * (W + gap) - gap, 3).

    ``maps`` is {title: heatmap}; registered method keys (:data:`core.explain.registry.TITLES`) get their display names. With
    ``show_image`` the plain image comes first, titled "image".
    """
    rgb = _to_rgb(image)
    h, w = rgb.shape[:2]
    tiles = [("image", rgb)] if show_image else []
    tiles += [(TITLES.get(k, str(k)), overlay(rgb, m, alpha, colormap)) for k, m in maps.items()]
    if not tiles:
        raise ValueError("panel needs at least one map or show_image=True")
    columns = []
    for title, tile in tiles:
        columns.append(np.concatenate([_title_bar(title, w), tile], axis=0))
        columns.append(np.full((columns[-1].shape[0], gap, 3), 255, np.uint8))
    return np.concatenate(columns[:-1], axis=1)
