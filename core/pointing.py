"""Does a heatmap point at the lungs? The pointing game and heat mass against expert lung boxes.

- **Expert lung boxes**: ``ieee8023/annotations/imageannotation_ai_lung_bounding_boxes.json``
  (COCO format: one box per lung, ``bbox = [x, y, width, height]`` in pixels of the annotated
  file). :func:`read_boxes` turns them into fractions of the film, keyed by the image's path
  relative to the data root, so that they survive the collection's downscaling of large files;
  an annotation whose aspect ratio differs from the stored file's by more than
  :data:`ASPECT_TOLERANCE` (a crop, not a rescale) is left out and counted.
- :func:`box_mask` draws boxes on a film of any size; ``core.inputs.from_film`` then maps that
  mask into the network's view (the lung crop of a run, or the whole film).
- :func:`point` scores one heatmap against one region: **hit** when the map's maximum lies in
  the region (the pointing game of Zhang et al., ECCV 2016, without tolerance), and **mass**,
  the share of the map's (non-negative) energy inside the region (the "energy-based pointing
  game" of Score-CAM), beside the region's share of the image, which is what a uniform map
  scores. A map with several equal maxima scores the share of them inside (so a flat map
  scores the region's area share, as chance does).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

BOXES_FILE = Path("ieee8023") / "annotations" / "imageannotation_ai_lung_bounding_boxes.json"
IMAGE_DIR = Path("ieee8023") / "images"
ASPECT_TOLERANCE = 0.03


def read_boxes(root, path: str | Path | None = None) -> tuple[dict[str, list[tuple[float, float, float, float]]], dict]:
    """Expert lung boxes as ``{relative image path: [(y0, x0, y1, x1) fractions, ...]}``, and counts.

    ``root`` is the data root; ``path`` the COCO file (default: :data:`BOXES_FILE` under it).
    Images not present under ``root`` are skipped. Returns ``({}, {"reason": ...})`` when the
    file is missing. The counts say how many annotated images were found, used and left out.
    """
    root = Path(root)
    path = Path(path) if path else root / BOXES_FILE
    if not path.is_file():
        return {}, {"reason": f"no expert lung boxes at {path}"}
    coco = json.loads(path.read_text(encoding="utf-8"))
    by_id = {im["id"]: im for im in coco.get("images", [])}
    boxes: dict[str, list] = {}
    counts = {"annotated": len(by_id), "missing_file": 0, "aspect_mismatch": 0}
    sizes: dict[int, tuple[int, int] | None] = {}
    for ann in coco.get("annotations", []):
        im = by_id.get(ann.get("image_id"))
        bbox = ann.get("bbox") or []
        if im is None or len(bbox) != 4 or any(not isinstance(v, (int, float)) for v in bbox):
            counts["bad_box"] = counts.get("bad_box", 0) + 1
            continue
        rel = (IMAGE_DIR / im["file_name"]).as_posix()
        if im["id"] not in sizes:
            sizes[im["id"]] = _stored_size(root / rel)
            stored = sizes[im["id"]]
            if stored is None:
                counts["missing_file"] += 1
            elif abs(stored[1] / stored[0] - im["width"] / im["height"]) > ASPECT_TOLERANCE * im["width"] / im["height"]:
                counts["aspect_mismatch"] += 1
                sizes[im["id"]] = None
        if sizes[im["id"]] is None:
            continue
        x, y, w, h = (float(v) for v in bbox)
        W, H = float(im["width"]), float(im["height"])
        box = (max(0.0, y / H), max(0.0, x / W), min(1.0, (y + h) / H), min(1.0, (x + w) / W))
        if box[2] > box[0] and box[3] > box[1]:
            boxes.setdefault(rel, []).append(box)
    counts["used"] = len(boxes)
    return boxes, counts


def _stored_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of an image file from its header (no full decode), None when unreadable."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError):
        return None
    return h, w


def box_mask(boxes, shape: tuple[int, int]) -> np.ndarray:
    """A bool mask (H, W) of the union of fractional boxes (y0, x0, y1, x1) on an image of ``shape``."""
    h, w = shape[:2]
    m = np.zeros((h, w), bool)
    for y0, x0, y1, x1 in boxes:
        r0, c0 = int(np.floor(y0 * h)), int(np.floor(x0 * w))
        r1, c1 = max(r0 + 1, int(np.ceil(y1 * h))), max(c0 + 1, int(np.ceil(x1 * w)))
        m[r0:r1, c0:c1] = True
    return m


def point(heatmap: np.ndarray, region: np.ndarray) -> dict:
    """Pointing game and heat mass of one map against one region (bool, resized to the map).

    Returns ``hit`` (1.0 when the map's maximum lies in the region; with tied maxima, the share
    of them inside), ``mass`` (share of the non-negative energy inside; an all-zero map counts
    as uniform) and ``area`` (the region's share of the image).
    """
    h = np.clip(np.nan_to_num(np.asarray(heatmap, np.float64), nan=0.0), 0, None)
    r = np.asarray(region, bool)
    if r.shape != h.shape:
        r = cv2.resize(r.astype(np.uint8), (h.shape[1], h.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    total = h.sum()
    if total <= 0:
        h = np.ones_like(h)
        total = h.sum()
    top = h >= h.max() - 1e-9 * max(1.0, h.max())
    return {"hit": float(r[top].mean()), "mass": float(h[r].sum() / total), "area": float(r.mean())}
