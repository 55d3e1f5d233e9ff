"""The one path from a decoded film to the classifier's input, and from a heatmap back to the film.

A run's network sees either the whole film or a crop to the bounding box of the lungs (found by
the shipped lung U-Net, :mod:`core.lungs`), resized to the network's side. Cropping to the box,
not blanking outside the lungs, removes most of what identifies a collection (borders, text,
markers, shoulders, the child's small thorax in a large frame) while keeping lung size and shape
out of the picture as a cue. The run's ``config.json`` says which, under ``lung_crop``: ``null``
(whole film) or ``{"margin": .., "threshold": .., "min_area": ..}``.

Training, the CLIs, the audit and the dashboard all call :func:`prepare` (or :func:`load`), so a
film is prepared in exactly one way. Each prepared film comes with its ``box`` (y0, x0, y1, x1) in
fractions of the film, so that :func:`to_film` can put a heatmap computed on the network's grid
back onto the right pixels of the original film. When no lungs are found the whole film is used
and the film is flagged (``fell_back``); callers show :data:`FALLBACK_WARNING`.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from core import images, lungs

# Settings of the lung crop (a run's config.json ``lung_crop`` overrides them).
LUNG_CROP = {
    "margin": 0.08,  # fraction of the box's height/width added on every side (costophrenic angles, apices)
    "threshold": 0.5,  # lung probability that counts as lung
    "min_area": 0.06,  # lungs covering less of the film than this are "not found"
    "min_side": 0.25,  # nor are lungs whose box is narrower or shorter than this fraction of the film
    "trim": 0.005,  # share of the lung pixels' mass left outside the box at each end of each axis
}
FULL_BOX = (0.0, 0.0, 1.0, 1.0)
# Decoding at the needed size (core.images.decode_sized): a film is read at 1/2, 1/4 or 1/8 scale
# when its shorter side stays >= needed_side(). MIN_NEED keeps every reduced film over the checks'
# small-film threshold (core.checks.MIN_SIDE_WARN) and their 256-px range sample.
MIN_NEED = 256
FALLBACK_WARNING = (
    "No lungs were found on this film, so the model looked at the whole film instead of the lung "
    "region it was trained on; treat the result with extra caution."
)


def settings(cfg: dict | None) -> dict | None:
    """The lung-crop settings of a run config (``None``: the network sees the whole film)."""
    crop = (cfg or {}).get("lung_crop")
    if crop is None or crop is False:  # ``{}`` (or ``true``) means: crop with the default settings
        if (cfg or {}).get("clahe"):
            raise ValueError("clahe: true needs the lung crop (the CLAHE is applied to the crop the network sees)")
        return None
    # ``clahe`` rides in the crop settings, so every caller of prepare (and the image cache's key) honours it
    return {**LUNG_CROP, **(crop if isinstance(crop, dict) else {}), **({"clahe": 1} if cfg.get("clahe") else {})}


def needed_side(size: int, lung_crop: dict | None = None) -> int:
    """Shorter side (px) a film must keep for a network of side ``size`` (and, with a lung crop, the
    lung U-Net): what :func:`core.images.decode_sized` may reduce a larger film to.

    A lung box spans at least ``min_side`` of the film (smaller ones are not boxes), so with
    ``size / min_side`` pixels the network's input is never upsampled from the reduced film. On
    all 1163 films of ../shared/cxr the shipped (CLAHE) run's P(COVID-19) then moves by at most
    0.133 (p99 0.045, mean 0.004; 6 decisions flip at its threshold), inside what a one-pixel shift
    of the film does to it (0.207, 23 flips); CLAHE makes the model more sensitive to both (before
    it: 0.032 and 2 flips against 0.14 and 7). Half that side moved the model before CLAHE as much
    as the shift (0.23, 8 flips): too much (tests/benchmarks/bench_decode.py). The whole film (no
    crop) keeps twice the network's side, the same margin over what it is resized to.
    """
    if lung_crop is None:
        return max(MIN_NEED, 2 * int(size))
    share = float({**LUNG_CROP, **lung_crop}["min_side"])
    return max(MIN_NEED, lungs.net_size(), int(np.ceil(size / max(share, 0.05))))


def lung_box(prob: np.ndarray, crop: dict | None = None) -> tuple[float, float, float, float] | None:
    """Bounding box (y0, x0, y1, x1), fractions of the image, of the lungs in a probability map.

    The box spans the central ``1 - 2 * trim`` of the lung pixels' mass along each axis, so a
    stray speck of "lung" in a corner does not stretch it (a rule simple enough to replicate in
    TensorFlow ops for the serving export); it then gets ``margin`` of its own size on every
    side, clipped to the image. ``None`` when the lungs are too small to trust.
    """
    c = {**LUNG_CROP, **(crop or {})}
    m = np.asarray(prob, np.float32) >= c["threshold"]
    h, w = m.shape
    total = m.sum()
    if total < c["min_area"] * m.size:
        return None

    def span(counts: np.ndarray, n: int) -> tuple[float, float]:
        cum = np.cumsum(counts)
        lo = int(np.searchsorted(cum, c["trim"] * total, side="right"))
        hi = int(np.searchsorted(cum, (1.0 - c["trim"]) * total, side="left")) + 1
        return lo / n, min(hi, n) / n

    (y0, y1), (x0, x1) = span(m.sum(axis=1), h), span(m.sum(axis=0), w)
    if y1 - y0 < c["min_side"] or x1 - x0 < c["min_side"]:
        return None
    dy, dx = c["margin"] * (y1 - y0), c["margin"] * (x1 - x0)
    return (max(0.0, y0 - dy), max(0.0, x0 - dx), min(1.0, y1 + dy), min(1.0, x1 + dx))


def _pixels(box, shape) -> tuple[int, int, int, int]:
    """A fractional box as integer pixel bounds (at least one pixel each way)."""
    h, w = shape[:2]
    y0, x0 = int(np.floor(box[0] * h)), int(np.floor(box[1] * w))
    y1, x1 = max(y0 + 1, int(np.ceil(box[2] * h))), max(x0 + 1, int(np.ceil(box[3] * w)))
    return y0, x0, min(h, y1), min(w, x1)


def crop(film: np.ndarray, box) -> np.ndarray:
    """The part of ``film`` (H, W) inside the fractional ``box``."""
    y0, x0, y1, x1 = _pixels(box, film.shape)
    return film[y0:y1, x0:x1]


def prepare(
    films: Sequence[np.ndarray], size: int, lung_crop: dict | None = None, lung_model=None,
    lung_side: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prepare decoded grey films (each (H, W), any size, [0, 255]) for a network of side ``size``.

    The lung U-Net runs on the whole batch at once, at ``lung_side`` (default
    :func:`core.lungs.net_size`, its training side: smaller sides move the boxes, see core.lungs).

    Returns ``(x, boxes, fell_back)``: ``x`` (n, size, size) float32 raw pixels, ``boxes`` (n, 4)
    the region of each film the network sees (fractions; the whole film without a crop), and
    ``fell_back`` (n,) bool, True where a crop was asked for but no lungs were found.
    """
    films = [np.asarray(f, np.float32) for f in films]
    n = len(films)
    boxes = np.tile(np.asarray(FULL_BOX, np.float64), (n, 1))
    fell_back = np.zeros(n, bool)
    if lung_crop is not None and n:
        net = lung_side or lungs.net_size()
        small = np.stack([images.resize(f, net) for f in films])
        probs = lungs.probabilities(small, model=lung_model, size=net)
        for i, p in enumerate(probs):
            box = lung_box(p, lung_crop)
            if box is None:
                fell_back[i] = True
            else:
                boxes[i] = box
    x = np.zeros((n, size, size), np.float32)
    for i, f in enumerate(films):
        x[i] = images.resize(crop(f, boxes[i]) if lung_crop is not None else f, size)
        if lung_crop is not None and lung_crop.get("clahe"):
            x[i] = clahe(x[i])
    return x, boxes, fell_back


def clahe(x: np.ndarray) -> np.ndarray:
    """CLAHE (clip 2.0, 8x8 tiles) of one prepared input (size, size) in [0, 255]: the run option ``clahe``."""
    u8 = np.clip(np.asarray(x, np.float32) + 0.5, 0, 255).astype(np.uint8)
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(u8).astype(np.float32)


def load(src, size: int, lung_crop: dict | None = None, name: str | None = None, lung_model=None):
    """Decode ``src`` (path or bytes) and prepare it: ``(x (size, size), box, fell_back, film)``.

    ``film`` is the decoded film (H, W), read at the needed size (:func:`needed_side`: a large film
    comes back reduced by 2, 4 or 8; a box in fractions fits either). Raises
    :class:`core.images.ImageError` for anything that is not a usable image.
    """
    film = images.decode(src, name, need=needed_side(size, lung_crop))
    x, boxes, fb = prepare([film], size, lung_crop, lung_model)
    return x[0], tuple(float(v) for v in boxes[0]), bool(fb[0]), film


def load_many(srcs, size: int, lung_crop: dict | None = None, lung_model=None):
    """Decode and prepare a batch; bad files are skipped and reported.

    Returns ``(x (n_ok, size, size), boxes (n_ok, 4), fell_back (n_ok,), kept, errors)``: ``kept``
    are the indices of the inputs that loaded, ``errors`` one :class:`core.images.ImageError` per
    input that did not.
    """
    films, kept, errors = [], [], []
    need = needed_side(size, lung_crop)  # reads the lung net's training record: once, not per film
    for i, src in enumerate(srcs):
        try:
            films.append(images.decode(src, need=need))
            kept.append(i)
        except images.ImageError as err:
            errors.append(err)
    x, boxes, fell_back = prepare(films, size, lung_crop, lung_model)
    return x, boxes, fell_back, kept, errors


def to_film(heatmap: np.ndarray, box, shape) -> np.ndarray:
    """Put a heatmap (h, w) on the network's grid back onto a film of ``shape`` (H, W).

    The map is resized smoothly (bicubic, clipped to the map's own range) onto the pixels of
    ``box``; outside the box, which the network never saw, it is 0.
    """
    heatmap = np.asarray(heatmap, np.float32)
    h, w = shape[:2]
    out = np.zeros((h, w), np.float32)
    y0, x0, y1, x1 = _pixels(box, (h, w))
    region = cv2.resize(heatmap, (x1 - x0, y1 - y0), interpolation=cv2.INTER_CUBIC)
    out[y0:y1, x0:x1] = np.clip(region, float(heatmap.min()), float(heatmap.max()))
    return out


def from_film(mask: np.ndarray, box, size: int) -> np.ndarray:
    """The part of a film-sized map (e.g. a lung mask) that the network sees, at (size, size)."""
    region = crop(np.asarray(mask, np.float32), box)
    return cv2.resize(region, (size, size), interpolation=cv2.INTER_LINEAR)
