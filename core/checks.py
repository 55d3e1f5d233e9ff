"""Plausibility checks for one input image, shown instead of a confident answer.

The classifier was trained on frontal (PA/AP) chest X-rays. Anything else (a lateral view, an
inverted film, a colour photograph, a tiny or washed-out image) still yields a probability, and
that number means little. :func:`image_warnings` returns plain-language warnings for such
inputs; an empty list means no check fired, not that the image is fine.

The heuristics are deliberately simple and were calibrated on ``../shared/cxr`` (235 frontal
films sampled from all three sources, the 44 lateral ieee8023 films and inverted copies of the
frontal ones; see ``tests/test_checks.py``):

* frontal films have a bright midline (spine, mediastinum) between two darker lung fields:
  ``midline_contrast`` = (midline - darker side of the two lung fields) / std is > 0.05 for
  98 % of frontal films and < 0.05 for 75 % of lateral films;
* an inverted film (MONOCHROME1 shown as is, or a negative) has the opposite sign:
  ``inversion_score`` (midline - mean of both lung fields) / std < -0.3 for 95 % of inverted
  frontal films and for none of the originals;
* colour is read from the file's bytes before the grey conversion (:func:`colour_stats`):
  a photograph has many saturated pixels of many hues; a photo of a film or a monitor is tinted
  with one hue.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from core import images, inputs

# Thresholds (see the module docstring for how they were chosen).
MIDLINE_MIN = 0.05  # below: no bright midline between two darker lung fields
INVERSION_MAX = -0.3  # below: midline darker than the lung fields -> inverted
MIN_SIDE_WARN = 200  # pixels; smaller originals carry little detail
MIN_RANGE = 50.0  # grey levels between the 1st and 99th percentile
SATURATED_SHARE = 0.05  # share of clearly coloured pixels that makes an image "colour"
HUE_SPREAD_PHOTO = 0.35  # circular spread of hue (0 = one hue, 1 = all hues) of a photograph

WARN_LATERAL = (
    "This does not look like a frontal chest X-ray (no bright midline between two darker lung "
    "fields): it may be a lateral view, oddly framed, or not a chest X-ray; the model was trained "
    "on frontal films only, so its answer is not meaningful here."
)
WARN_INVERTED = (
    "The image looks inverted (bright lungs, dark midline), like a negative or a MONOCHROME1 "
    "film shown as stored; invert it before judging the result."
)
WARN_PHOTO = (
    "This is a colour image with many hues, like a photograph, not a chest X-ray; the result is "
    "not meaningful."
)
WARN_TINTED = (
    "The image has a colour tint, like a photo of a film or a screen; such copies are less "
    "reliable than the original X-ray."
)
WARN_LOW_CONTRAST = "The image has very low contrast (almost uniform grey); the result is unreliable."
WARN_SMALL = (
    "The image is only {w}x{h} pixels; below {m} pixels per side, fine lung detail is lost."
)
WITHHELD = "No answer is given for this image because it failed a plausibility check."
# Beginnings of warnings that only flag the answer (shown next to it) instead of withholding it.
# None today: every check withholds the decision, as the dashboard has always done; a warning
# moved here is shown with the answer on the dashboard, by core.predict and core.explain at once.
FLAG_ONLY: tuple[str, ...] = ()
RANGE_SIDE = 256  # the grey-level range is read on a strided copy of about this side (cheap, same answer)


def _regions(image: np.ndarray) -> tuple[float, float, float, float]:
    """(midline mean, left lung-field mean, right lung-field mean, std) on a 128 px copy."""
    a = images.resize(np.asarray(image, dtype=np.float32), 128)
    midline = float(a[32:96, 54:74].mean())
    left = float(a[32:83, 19:45].mean())
    right = float(a[32:83, 83:109].mean())
    return midline, left, right, float(a.std()) + 1e-6


def midline_contrast(image: np.ndarray) -> float:
    """How much brighter the midline is than the darker of the two lung fields (in stds).

    Positive for frontal chest X-rays, about zero or negative for lateral views and non-chest
    images.
    """
    mid, left, right, std = _regions(image)
    return (mid - max(left, right)) / std


def inversion_score(image: np.ndarray) -> float:
    """Midline minus the mean of both lung fields (in stds); strongly negative when inverted."""
    mid, left, right, std = _regions(image)
    return (mid - (left + right) / 2) / std


def colour_stats(data: bytes) -> dict[str, float]:
    """Colour of an encoded image (PNG/JPEG bytes), read before any grey conversion.

    Returns ``{"saturated_share", "hue_spread"}``: the share of clearly coloured pixels
    (HSV saturation > 0.25 and value > 0.15) and the circular spread of their hue (0 for a single
    tint, near 1 for all hues). Both are 0 for grey images and for anything PIL cannot open
    (DICOM, garbage): decoding errors are reported by :func:`core.images.load`, not here.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            if img.mode in {"L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "1"}:
                return {"saturated_share": 0.0, "hue_spread": 0.0}
            img.draft("RGB", (256, 256))  # JPEG: decode at reduced scale, cheap
            img = img.convert("RGB")
            img.thumbnail((256, 256))
            hsv = np.asarray(img.convert("HSV"), dtype=np.float32) / 255.0
    except Exception:
        return {"saturated_share": 0.0, "hue_spread": 0.0}
    coloured = (hsv[..., 1] > 0.25) & (hsv[..., 2] > 0.15)
    share = float(coloured.mean())
    if coloured.sum() < 10:
        return {"saturated_share": share, "hue_spread": 0.0}
    angle = hsv[..., 0][coloured] * 2 * np.pi
    resultant = float(np.hypot(np.cos(angle).mean(), np.sin(angle).mean()))
    return {"saturated_share": share, "hue_spread": 1.0 - resultant}


def _layout_warning(layout: np.ndarray) -> str | None:
    """WARN_INVERTED, WARN_LATERAL or None, from one look at the midline and the lung fields."""
    mid, left, right, std = _regions(layout)
    if (mid - (left + right) / 2) / std < INVERSION_MAX:  # inversion_score
        return WARN_INVERTED
    if (mid - max(left, right)) / std < MIDLINE_MIN:  # midline_contrast
        return WARN_LATERAL
    return None


def image_warnings(image: np.ndarray, data: bytes | None = None, lungs: np.ndarray | None = None,
                   box=None) -> list[str]:
    """Plain-language warnings for an image that may not be a usable frontal chest X-ray.

    ``image`` is a raw grey array (H, W) in [0, 255] as returned by :func:`core.images.load`,
    best at its native size (the size check needs it). ``data`` are the original file bytes,
    when available, for the colour check (the grey array has lost its colour). ``lungs``, a lung
    mask of the film (any size; core.lungs), puts the layout checks (midline, polarity) on the
    lungs' bounding box: on the whole film they misread frames that are tilted, off-centre or
    padded with black bars (about one in six Hannover and NIH frontal films), while a lateral
    film still fails them inside its box. ``box`` (fractions, core.inputs) gives that box directly
    when the caller already has it (core.predict's lung crop). Returns an empty list when no check fires.
    """
    image = np.asarray(image, dtype=np.float32)
    out: list[str] = []
    if data is not None:
        colour = colour_stats(data)
        if colour["saturated_share"] > SATURATED_SHARE:
            out.append(WARN_PHOTO if colour["hue_spread"] > HUE_SPREAD_PHOTO else WARN_TINTED)
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE_WARN:
        out.append(WARN_SMALL.format(w=w, h=h, m=MIN_SIDE_WARN))
    step = max(1, min(h, w) // RANGE_SIDE)
    lo, hi = np.percentile(image[::step, ::step], [1, 99])
    if hi - lo < MIN_RANGE:
        out.append(WARN_LOW_CONTRAST)
        return out  # the layout checks below mean nothing on a flat image
    if box is None and lungs is not None:
        box = inputs.lung_box(np.asarray(lungs, np.float32))
    layout = image if box is None else inputs.crop(image, box)
    got = _layout_warning(layout)
    return out + ([got] if got else [])


@dataclass(frozen=True)
class Verdict:
    """What the checks of one film mean for its answer (:func:`verdict`)."""

    warnings: tuple[str, ...]  # every warning, to show
    withheld: bool  # no decision is given (the raw output may still be shown, marked as such)
    reason: str | None  # why it is withheld: the withholding warnings in one text; None when not


def verdict(warnings) -> Verdict:
    """The one rule that turns warnings into withholding the decision or only flagging it (the
    dashboard, ``core.predict`` and ``core.explain`` all use it): every warning withholds except
    those beginning as in :data:`FLAG_ONLY`."""
    ws = tuple(warnings)
    withholding = [w for w in ws if not w.startswith(FLAG_ONLY)]
    return Verdict(ws, bool(withholding), " ".join(withholding) or None)


def check_film(image: np.ndarray, data: bytes | None = None, lungs: np.ndarray | None = None,
               box=None) -> Verdict:
    """:func:`image_warnings` of one film, and whether its answer is withheld (:func:`verdict`)."""
    return verdict(image_warnings(image, data, lungs=lungs, box=box))
