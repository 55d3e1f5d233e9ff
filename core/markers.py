"""Burned-in text, laterality letters and other overlays on a film: ``detect(film) -> (mask, boxes)``.

An image-processing detector, chosen over an OCR text detector (rapidocr-onnxruntime's DBNet) by
precision and recall on the hand-labelled films of ``tests/data/markers.csv``
(``tests/benchmarks/bench_markers.py``): the OCR detector also boxes ribs, wires and electrodes, and
takes about a second a film on a CPU, where this takes milliseconds.

What it looks for: glyph strokes are small, flat and drawn with hard edges, unlike anatomy. On a
copy of the film whose longer side is :data:`PARAMS` ``side`` px, a white and a black top-hat
(a square of ``tophat`` px) keep what is smaller than a glyph's box and brighter (darker) than its
surroundings; connected pieces whose mean top-hat contrast reaches ``contrast`` grey levels, whose
outline is sharp (mean morphological gradient on the outline >= ``edge``) and whose size is a
glyph's are kept; pieces close to each other are merged into boxes (a word, a tag).

The mask is the union of the boxes, each padded by ``pad`` of the film's longer side, at the film's
resolution: heatmaps are coarse, so "heat on the marker" means heat on its box, not on its strokes.

CLI::

    python -m core.markers FILM [FILM ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import cv2
import numpy as np

from core import images, inputs

# Every cut-off of the detector, at the working side (``side`` px); tuned on tests/data/markers.csv.
PARAMS = {
    "side": 512,  # longer side (px) of the copy the detector works on (smaller films: their own size)
    "tophat": 31,  # square (px) of the top-hats: bigger structures (ribs, heart) are removed
    "contrast": 70,  # mean top-hat response of a piece, grey levels (0-255)
    "edge": 80,  # mean morphological gradient (3x3) on a piece's outline: glyphs have hard edges
    "min_area": 15,  # pixels of a piece
    "max_box": 80,  # longest side (px) of a piece's box: a wire or a rib edge is longer
    "merge": (9, 5),  # (w, h) px of the dilation that merges the letters of a word into one box
    "pad": 0.01,  # padding of each box in the mask, as a share of the film's longer side
}


def _grey(film: np.ndarray) -> tuple[np.ndarray, float]:
    """The film as uint8 grey (0-255) with its longer side at most PARAMS['side'], and that scale."""
    f = np.asarray(film, np.float32)
    if f.ndim == 3:
        f = f[..., :3].mean(axis=-1) if f.shape[-1] in (3, 4) else f[..., 0]
    if f.ndim != 2 or min(f.shape) < 2:
        raise images.ImageError("film", f"markers.detect() takes a 2-D film; got shape {np.shape(film)}")
    if f.max(initial=0.0) <= 1.0:  # a 0-1 film
        f = f * 255.0
    h, w = f.shape
    scale = min(1.0, PARAMS["side"] / max(h, w))
    if scale < 1.0:
        f = cv2.resize(f, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return np.clip(f + 0.5, 0, 255).astype(np.uint8), scale


def _pieces(g: np.ndarray, tophat: np.ndarray, k: float) -> np.ndarray:
    """Bool mask of the glyph-like pieces of one top-hat (k: the working side over PARAMS['side'])."""
    m = (tophat > 40).astype(np.uint8)
    n, lab, st, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return np.zeros(g.shape, bool)
    inner = cv2.erode(m, np.ones((3, 3), np.uint8)).astype(bool)
    outline = m.astype(bool) & ~inner
    grad = cv2.morphologyEx(g, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(np.float64)
    flat = lab.ravel()
    area = np.bincount(flat, minlength=n).astype(np.float64)
    contrast = np.bincount(flat, weights=tophat.ravel().astype(np.float64), minlength=n) / np.maximum(area, 1)
    o = outline.ravel()
    edge = np.bincount(flat[o], weights=grad.ravel()[o], minlength=n) / np.maximum(
        np.bincount(flat[o], minlength=n), 1)
    keep = ((contrast >= PARAMS["contrast"]) & (edge >= PARAMS["edge"])
            & (area >= max(4.0, PARAMS["min_area"] * k * k))
            & (np.maximum(st[:, cv2.CC_STAT_WIDTH], st[:, cv2.CC_STAT_HEIGHT]) <= PARAMS["max_box"] * k))
    keep[0] = False  # the background
    return keep[lab]


def _boxes(pieces: np.ndarray, k: float) -> np.ndarray:
    """Boxes (n, 4) normalised (x0, y0, x1, y1) of the pieces, neighbours merged (a word, a tag)."""
    if not pieces.any():
        return np.zeros((0, 4), np.float32)
    mw, mh = (max(1, round(v * k)) for v in PARAMS["merge"])
    merged = cv2.dilate(pieces.astype(np.uint8), np.ones((mh, mw), np.uint8))
    n, _, st, _ = cv2.connectedComponentsWithStats(merged, connectivity=8)
    h, w = pieces.shape
    x, y, bw, bh = (st[1:, i].astype(np.float32) for i in range(4))
    # undo the dilation's growth so the box hugs the strokes
    dx, dy = (mw - 1) / 2, (mh - 1) / 2
    return np.stack([(x + dx) / w, (y + dy) / h, (x + bw - dx) / w, (y + bh - dy) / h], axis=1).clip(0, 1)


def box_mask(boxes: np.ndarray, shape: tuple[int, int], pad: float | None = None) -> np.ndarray:
    """Bool mask of ``shape`` (H, W), True inside each normalised box padded by ``pad`` of the longer side."""
    pad = PARAMS["pad"] if pad is None else pad
    h, w = shape[:2]
    out = np.zeros((h, w), bool)
    p = pad * max(h, w)
    for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
        c0, r0 = max(0, int(np.floor(x0 * w - p))), max(0, int(np.floor(y0 * h - p)))
        c1, r1 = min(w, int(np.ceil(x1 * w + p))), min(h, int(np.ceil(y1 * h + p)))
        out[r0:r1, c0:c1] = True
    return out


def detect(film: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Burned-in text and markers on ``film`` (H, W) grey (0-255 or 0-1; colour is averaged).

    Returns ``(mask, boxes)``: ``mask`` bool (H, W), True on the (padded) boxes; ``boxes`` float32
    (n, 4) of normalised (x0, y0, x1, y1), n = 0 on a film without any. Raises
    :class:`core.images.ImageError` for an array that is not a film.
    """
    g, scale = _grey(film)
    k = max(g.shape) / PARAMS["side"]
    side = max(3, round(PARAMS["tophat"] * k) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (side, side))
    pieces = np.zeros(g.shape, bool)
    for op in (cv2.MORPH_TOPHAT, cv2.MORPH_BLACKHAT):  # bright glyphs, then dark ones
        pieces |= _pieces(g, cv2.morphologyEx(g, op, kernel), k)
    boxes = _boxes(pieces, k)
    return box_mask(boxes, np.shape(film)[:2]), boxes


def on_grid(mask: np.ndarray, box, size: int) -> np.ndarray:
    """The part of a film-sized marker mask that the network sees (as ``core.inputs.from_film``), bool (size, size).

    Any overlap counts: a letter a few pixels wide must not vanish on a coarse grid."""
    region = inputs.crop(np.asarray(mask, np.float32), box)
    # area averaging, not inputs.from_film's linear sampling, which skips most pixels of a big film
    return cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA) > 0


CLI_HELP = ("Find burned-in text, laterality letters and other overlays on films: prints, per film, the boxes "
            "(normalised x0 y0 x1 y1) and the time taken.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.markers", description=CLI_HELP)
    p.add_argument("films", nargs="+", help="image files (PNG, JPEG, DICOM, ...)")
    p.add_argument("--json", action="store_true", help="print one JSON object per film on stdout")
    args = p.parse_args(argv)
    status = 0
    for path in args.films:
        try:
            film = images.decode(path)
        except images.ImageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 2
            continue
        t0 = time.perf_counter()
        _, boxes = detect(film)
        ms = 1000 * (time.perf_counter() - t0)
        out = {"film": path, "n": int(len(boxes)), "boxes": [[round(float(v), 4) for v in b] for b in boxes],
               "ms": round(ms, 1)}
        print(json.dumps(out) if args.json else f"{path}: {out['n']} marker box(es) in {ms:.0f} ms "
              + " ".join("[" + " ".join(f"{v:.2f}" for v in b) + "]" for b in out["boxes"]))
    return status


if __name__ == "__main__":
    sys.exit(main())
