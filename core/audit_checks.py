"""The audit's checks of one model on a stack of images: faithfulness, randomisation, lung blanking.

- :func:`deletion_insertion`: deletion and insertion AUC (Petsiuk et al., RISE, BMVC 2018),
  kept for comparison (``--di-methods``); the blank it leaves is itself a signal, so the audit
  scores faithfulness with ROAD (:mod:`core.road`) instead.
- :func:`sanity_check`: the model randomisation test (Adebayo et al., NeurIPS 2018): maps of the
  trained model against the same network with its learned weights re-initialised
  (:func:`randomised_copy`), compared by Spearman rank correlation. A method **passes** if the
  mean correlation is below :data:`SANITY_THRESHOLD` (its maps depend on what the model learned).
- :func:`probes`: the counterfactual test of DeGrave et al., offline: re-predict every image
  with the lungs blanked and with everything but the lungs blanked (:func:`blank`); the ROC AUC
  that survives each, with patient-bootstrap CIs. High AUC without lungs = shortcuts.
"""

from __future__ import annotations

import cv2
import keras
import numpy as np
from scipy.stats import spearmanr

from core import config, explain, metrics
from core import model as cxr_model
from core.heat import fit_mask
from core.metrics import fmt as _fmt

SANITY_THRESHOLD = 0.5  # mean Spearman correlation below this -> the method passes


# --------------------------------------------------------------------------- deletion / insertion
def _predict(model, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    # the model's traced call (core.model.inference): an eager call of a DenseNet121 on 64 films took
    # minutes and held ~12 GB in the probes of an audit; the traced one frees activations as it goes
    fn = cxr_model.inference(model)
    out = [np.asarray(fn(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float32)


def baseline_image(image: np.ndarray, kind: str = "blur") -> np.ndarray:
    """A 'nothing here' version of an image: ``blur`` (Gaussian, sigma = side/16), ``mean`` or ``zero``."""
    image = np.asarray(image, dtype=np.float32)
    if kind == "blur":
        return cv2.GaussianBlur(image, (0, 0), max(1.0, max(image.shape) / 16))
    if kind == "mean":
        return np.full_like(image, image.mean())
    if kind == "zero":
        return np.zeros_like(image)
    raise ValueError(f"unknown baseline {kind!r}; choose blur, mean or zero")


def deletion_insertion_batch(
    image: np.ndarray, heatmap: np.ndarray, steps: int = 16, deletion_baseline: str = "mean",
    insertion_baseline: str = "blur",
) -> tuple[np.ndarray, np.ndarray]:
    """The (steps+1) deletion and (steps+1) insertion images of RISE, hottest pixels first."""
    image = np.asarray(image, dtype=np.float32)
    heat = cv2.resize(np.asarray(heatmap, np.float32), image.shape[::-1]) if heatmap.shape != image.shape else heatmap
    order = np.argsort(-np.nan_to_num(heat, nan=0.0).ravel(), kind="stable")
    n = order.size
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    rank = rank.reshape(image.shape)
    cut = np.round(np.linspace(0, n, steps + 1)).astype(np.int64)
    on = rank[None] < cut[:, None, None]  # (steps+1, H, W): the top-k pixels at each step
    d_base = baseline_image(image, deletion_baseline)
    i_base = baseline_image(image, insertion_baseline)
    deletion = np.where(on, d_base[None], image[None])
    insertion = np.where(on, image[None], i_base[None])
    return deletion, insertion


def deletion_insertion(
    model, image: np.ndarray, heatmap: np.ndarray, class_index: int = 0, steps: int = 16,
    deletion_baseline: str = "mean", insertion_baseline: str = "blur",
) -> tuple[float, float]:
    """Deletion and insertion AUC of a heatmap (Petsiuk et al., RISE, 2018).

    Deletion replaces the hottest pixels first (in ``steps`` equal steps of the pixel count) by
    the image mean and tracks the model's probability of ``class_index``; insertion starts from
    a blurred copy and puts the hottest pixels back first. The areas under both curves (x from 0
    to 1) are returned: a faithful map gives a LOW deletion AUC and a HIGH insertion AUC.
    All 2 x (steps + 1) images go through the model in one batch.
    """
    dele, ins = deletion_insertion_batch(image, heatmap, steps, deletion_baseline, insertion_baseline)
    p = _predict(model, np.concatenate([dele, ins]))[:, class_index]
    x = np.linspace(0, 1, steps + 1)
    k = steps + 1
    return float(np.trapezoid(p[:k], x)), float(np.trapezoid(p[k:], x))


# --------------------------------------------------------------------------- sanity check
ADOPTED = "adopted"  # the nested sub-model of an adopted run (core.adopt): everything in it was learned


def randomised_copy(model, seed: int = config.SEED):
    """The same network with every learned weight re-initialised (Adebayo et al.'s full randomisation).

    The copy is a clone (nested Functional and Sequential models included, at any depth) with
    fresh initial weights. Layers whose weights are fixed by design (non-trainable: frozen lung
    net, fixed blur kernels, an adopted run's preprocessing) keep their weights, so only what the
    model *learned* is destroyed; inside an adopted network (the sub-model ``adopted``) every layer
    with weights is re-initialised, a frozen backbone included (its weights were learned too).
    """
    keras.utils.set_random_seed(seed)
    fresh = keras.models.clone_model(model)
    fresh.build(model.input_shape)
    for (src, learned), (dst, _) in zip(_all_layers(model), _all_layers(fresh), strict=False):
        if not src.weights or learned:
            continue
        if not src.trainable or not src.trainable_weights:
            dst.set_weights(src.get_weights())
    return fresh


def _all_layers(model, learned: bool = False) -> list:
    """(layer, inside an adopted network?) for every layer; a frozen sub-model outside one stays whole."""
    out = []
    for layer in model.layers:
        inner = learned or layer.name == ADOPTED
        if hasattr(layer, "layers") and layer.layers and (inner or layer.trainable):
            out.extend(_all_layers(layer, inner))
        else:
            out.append((layer, learned))  # a frozen sub-model is kept whole
    return out


def spearman(a: np.ndarray, b: np.ndarray, side: int = 64) -> float:
    """Spearman rank correlation of two maps (downsampled to ``side`` x ``side``); 0 if one is constant."""
    def small(m):
        m = np.nan_to_num(np.asarray(m, np.float32), nan=0.0)
        return cv2.resize(m, (side, side), interpolation=cv2.INTER_AREA).ravel() if max(m.shape) > side else m.ravel()

    x, y = small(a), small(b)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    r = spearmanr(x, y).statistic
    return float(r) if np.isfinite(r) else 0.0


def sanity_check(model, images, method: str, layer=None, class_index: int = 0, random_model=None,
                 threshold: float = SANITY_THRESHOLD, **kw) -> dict:
    """Model randomisation test (Adebayo et al., 2018) of one explanation method.

    Explains each image with the trained model and with :func:`randomised_copy` (or
    ``random_model``), and correlates the two maps by Spearman rank correlation. The method
    ``passes`` if the mean correlation is below ``threshold`` (0.5): its maps depend on the
    learned weights. Returns ``{method, n, spearman_mean, spearman_abs_mean, spearman (list),
    threshold, passes}``.
    """
    rand = random_model if random_model is not None else randomised_copy(model)
    pairs = [(explain.explain(model, img, method, class_index=class_index, layer=layer, **kw),
              explain.explain(rand, img, method, class_index=class_index, layer=layer, **kw))
             for img in np.asarray(images, dtype=np.float32)]
    return sanity_result(method, [a for a, _ in pairs], [b for _, b in pairs], threshold)


def sanity_result(method: str, trained, randomised, threshold: float = SANITY_THRESHOLD) -> dict:
    """The randomisation check's verdict from the maps of the trained and of the randomised model
    (same images, same order), as :func:`sanity_check` returns it."""
    rs = [spearman(a, b) for a, b in zip(trained, randomised, strict=True)]
    mean = float(np.mean(rs)) if rs else float("nan")
    return {
        "method": method,
        "n": len(rs),
        "spearman_mean": mean,
        "spearman_abs_mean": float(np.mean(np.abs(rs))) if rs else float("nan"),
        "spearman": [round(r, 4) for r in rs],
        "threshold": threshold,
        "passes": bool(mean < threshold),
        "rule": f"passes if the mean Spearman correlation between maps of the trained and the "
                f"re-initialised model is below {threshold}",
    }


# --------------------------------------------------------------------------- probes
def blank(images: np.ndarray, lung_masks: np.ndarray, keep: str, fill: str = "mean",
          dilate: float = 0.03) -> np.ndarray:
    """Copies of ``images`` with the lungs (``keep="outside"``) or all but the lungs (``keep="lungs"``) blanked.

    Blanked pixels get the image's mean (``fill="mean"``), a heavy blur of it (``"blur"``) or 0.
    For lungs-blanked the mask is first dilated by ``dilate`` x side, so lung edges do not leak.
    """
    images = np.asarray(images, dtype=np.float32)
    out = np.empty_like(images)
    for i, (img, m) in enumerate(zip(images, lung_masks, strict=True)):
        m = fit_mask(m, img.shape)
        if keep == "outside" and dilate > 0:
            k = max(1, int(round(dilate * max(img.shape)))) * 2 + 1
            m = cv2.dilate(m.astype(np.uint8), np.ones((k, k), np.uint8)) > 0
        if fill == "blur":  # a heavier blur than baseline_image's: nothing of the lungs survives it
            filler = cv2.GaussianBlur(img, (0, 0), max(img.shape) / 8)
        else:
            filler = baseline_image(img, "zero" if fill == "zero" else "mean")
        region = m if keep == "outside" else ~m
        out[i] = np.where(region, filler, img)
    return out


def _auc(y, p, groups=None, n_boot: int = 1000) -> dict:
    y = np.asarray(y, int)
    if len(np.unique(y)) < 2:
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
                "reason": "only one class present"}
    return metrics.ci("roc_auc", y, p, groups, n_boot=n_boot)


def probes(model, images, lung_masks, y, groups=None, sources=None, class_index: int = config.COVID_INDEX,
           fill: str = "mean", n_boot: int = 1000) -> dict:
    """The DeGrave test: the AUC that survives with the lungs blanked, and with only the lungs left.

    ``y`` is 1 for the class ``class_index`` (COVID-19) and 0 otherwise; ``groups`` are patient
    ids for the bootstrap CIs; ``sources`` (optional) adds the AUC within each source that holds
    both classes. Returns AUCs (``original``, ``lungs_blanked``, ``lungs_only``), mean
    probabilities, the share of images whose decision at 0.5 flips, and a plain-words verdict.
    """
    images = np.asarray(images, dtype=np.float32)
    y = np.asarray(y, int)
    p = {
        "original": _predict(model, images)[:, class_index],
        "lungs_blanked": _predict(model, blank(images, lung_masks, "outside", fill))[:, class_index],
        "lungs_only": _predict(model, blank(images, lung_masks, "lungs", fill))[:, class_index],
    }
    res = {"n": int(len(y)), "n_positive": int(y.sum()), "fill": fill, "auc": {}, "mean_p": {}, "flipped": {}}
    for k, v in p.items():
        res["auc"][k] = _auc(y, v, groups, n_boot)
        res["mean_p"][k] = {"positive": float(v[y == 1].mean()) if y.any() else float("nan"),
                            "negative": float(v[y == 0].mean()) if (y == 0).any() else float("nan")}
        res["flipped"][k] = float(np.mean((v >= 0.5) != (p["original"] >= 0.5)))
    if sources is not None:
        sources = np.asarray(sources)
        res["within_source"] = {}
        for s in sorted(set(sources.tolist())):
            sel = sources == s
            if len(np.unique(y[sel])) < 2:
                continue
            g = None if groups is None else np.asarray(groups)[sel]
            res["within_source"][s] = {"n": int(sel.sum()),
                                       **{k: _auc(y[sel], v[sel], g, n_boot) for k, v in p.items()}}
    res["verdict"] = probe_verdict(res)
    res["_p"] = p  # removed before writing JSON; used by run_audit for the per-image table
    return res


def probe_verdict(res: dict) -> str:
    """Plain words for the probe results: does the model need the lungs?"""
    auc = res["auc"]
    blanked, only, orig = (auc[k].get("value", float("nan")) for k in ("lungs_blanked", "lungs_only", "original"))
    parts = [f"ROC AUC on the test images is {_fmt(auc['original'])}."]
    if not np.isfinite(blanked):
        return parts[0] + " The probes could not be scored (one class only)."
    if blanked >= 0.8:
        parts.append(f"With the lungs blanked it is still {_fmt(auc['lungs_blanked'])}: the model separates "
                     "the classes without seeing the lungs, so it uses shortcuts outside the lungs "
                     "(image source, age, text, borders, body shape). Do not trust its predictions as "
                     "evidence of COVID-19.")
    elif blanked >= 0.65:
        parts.append(f"With the lungs blanked it is {_fmt(auc['lungs_blanked'])}: well above chance, so part of "
                     "what the model uses lies outside the lungs (a shortcut).")
    else:
        parts.append(f"With the lungs blanked it falls to {_fmt(auc['lungs_blanked'])}: the model needs the "
                     "lungs to separate the classes.")
    if np.isfinite(only):
        if only >= orig - 0.05:
            parts.append(f"With only the lungs visible it is {_fmt(auc['lungs_only'])}: the lung fields carry the "
                         "signal the model uses (which may still be a property of the source inside the "
                         "lungs, such as pediatric anatomy or film quality; see the within-source AUC).")
        else:
            parts.append(f"With only the lungs visible it drops to {_fmt(auc['lungs_only'])}.")
    return " ".join(parts)
