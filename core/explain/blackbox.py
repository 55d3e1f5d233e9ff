"""Output-only explanations: they need nothing but ``model(x)``, so a black box (a SavedModel
signature whose layers cannot be reached) still gets maps.

- :func:`occlusion` (Zeiler & Fergus, 2014): a square patch (``patch`` x the image side) slides
  over the image with a stride of half the patch; each position is replaced by the image's mean
  and the drop of the class probability is spread over the patch; a pixel's heat is the mean
  drop of the patches that covered it (rises count as no evidence: clipped at 0).
- :func:`rise` (Petsiuk et al., BMVC 2018): ``n`` random binary grids of ``cells`` x ``cells``
  (each cell kept with probability ``keep``), upsampled bilinearly to one cell more than the
  image and shifted by a random fraction of a cell, so their edges are soft and fall anywhere;
  the map is the sum of the masks weighted by the class probability of each masked image,
  divided by ``n * keep``. Hidden pixels get the image's mean (the paper uses black, which is
  farther from a chest film than its own mean grey).

Both run their perturbed images through the model in batches of :data:`BATCH`, and explain the
model's output probability (a black box has no logits to show).
"""

from __future__ import annotations

import cv2
import numpy as np

from core import model as cmodel

BATCH = 64  # perturbed images per forward pass
OCCLUSION_PATCH = 1 / 8  # patch side as a fraction of the image side
RISE_N = 1000  # masks per image
RISE_CELLS = 8  # the random grid is cells x cells before upsampling
RISE_KEEP = 0.5  # probability that a cell is kept


def _probs(model, images: np.ndarray, class_index: int) -> np.ndarray:
    """P(class_index) of (n, h, w, c) images, :data:`BATCH` per forward pass."""
    fn = cmodel.inference(model)
    out = [np.asarray(fn(images[s : s + BATCH]))[:, class_index] for s in range(0, len(images), BATCH)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def _starts(side: int, patch: int, stride: int) -> list[int]:
    """Patch positions along one side, the last one flush with the edge."""
    starts = list(range(0, max(1, side - patch + 1), stride))
    if starts[-1] != max(0, side - patch):
        starts.append(max(0, side - patch))
    return starts


def _occlude_one(model, img: np.ndarray, class_index: int, patch: int, stride: int) -> np.ndarray:
    h, w = img.shape[:2]
    p0 = _probs(model, img[None], class_index)[0]
    boxes = [(y, x) for y in _starts(h, patch, stride) for x in _starts(w, patch, stride)]
    heat, count = np.zeros((h, w)), np.zeros((h, w))
    mean = float(img.mean())
    for s in range(0, len(boxes), BATCH):
        chunk = boxes[s : s + BATCH]
        batch = np.repeat(img[None], len(chunk), axis=0)
        for b, (y, x) in enumerate(chunk):
            batch[b, y : y + patch, x : x + patch] = mean
        drop = p0 - _probs(model, batch, class_index)
        for d, (y, x) in zip(drop, chunk, strict=True):
            heat[y : y + patch, x : x + patch] += d
            count[y : y + patch, x : x + patch] += 1
    return np.maximum(heat / np.maximum(count, 1), 0.0)


def occlusion(model, x, class_index, layer=None, patch: float = OCCLUSION_PATCH, stride: float | None = None):
    """Occlusion maps (n, h, w) of a prepared batch ``x`` (n, h, w, c); ``layer`` is ignored.

    ``patch`` is the patch side as a fraction of the image side (default 1/8), ``stride`` as a
    fraction too (default half the patch).
    """
    h, w = x.shape[1:3]
    side = max(2, int(round(patch * min(h, w))))
    step = max(1, int(round(stride * min(h, w))) if stride else side // 2)
    return np.stack([_occlude_one(model, img, class_index, side, step) for img in np.asarray(x, np.float32)])


def rise_masks(n: int, hw: tuple[int, int], cells: int = RISE_CELLS, keep: float = RISE_KEEP,
               seed: int = 0) -> np.ndarray:
    """RISE's ``n`` soft masks (n, h, w) in [0, 1] (Petsiuk et al.; see the module docstring)."""
    h, w = hw
    rng = np.random.default_rng(seed)
    ch, cw = int(np.ceil(h / cells)), int(np.ceil(w / cells))
    grids = (rng.random((n, cells, cells)) < keep).astype(np.float32)
    shifts = rng.integers(0, [ch, cw], size=(n, 2))
    out = np.empty((n, h, w), np.float32)
    for i in range(n):
        up = cv2.resize(grids[i], ((cells + 1) * cw, (cells + 1) * ch), interpolation=cv2.INTER_LINEAR)
        dy, dx = shifts[i]
        out[i] = up[dy : dy + h, dx : dx + w]
    return out


def rise(model, x, class_index, layer=None, n: int = RISE_N, cells: int = RISE_CELLS, keep: float = RISE_KEEP,
         seed: int = 0):
    """RISE maps (n_images, h, w) of a prepared batch ``x``; ``layer`` is ignored. The same ``seed``
    gives the same masks (a reproducible map)."""
    x = np.asarray(x, np.float32)
    h, w = x.shape[1:3]
    out = []
    for img in x:
        heat = np.zeros((h, w))
        mean = float(img.mean())
        for s in range(0, n, BATCH):
            masks = rise_masks(min(BATCH, n - s), (h, w), cells, keep, seed + s)[..., None]
            p = _probs(model, img[None] * masks + mean * (1.0 - masks), class_index)
            heat += np.tensordot(p, masks[..., 0], axes=1)
        out.append(heat / (n * keep))
    return np.stack(out)
