"""The shortcut audit: can a model's explanations, and its predictions, be trusted?

Most published COVID-19 chest X-ray classifiers learned the image *source* (hospital, age,
text, borders) rather than the disease (DeGrave et al., Nature Machine Intelligence 2021). This
module measures that, per image and per explanation method, with checks a shortcut cannot pass:

- :func:`trust`: where a heatmap's energy lies: inside the lung fields (against the lungs'
  share of the image), in the border band and in the top band (where text and markers sit).
- :func:`deletion_insertion`: deletion and insertion AUC (Petsiuk et al., RISE, BMVC 2018):
  does removing the hottest pixels first drop the score fast, and does inserting them first
  raise it fast? All steps run in one batched forward pass.
- :func:`sanity_check`: the model randomisation test (Adebayo et al., NeurIPS 2018): maps of the
  trained model against the same network with its learned weights re-initialised, compared by
  Spearman rank correlation. Rule: a method **passes** if the mean correlation is below 0.5
  (its maps depend on what the model learned); a method whose maps barely change fails.
- :func:`probes`: the counterfactual test of DeGrave et al., offline: re-predict every image
  with the lungs blanked and with everything but the lungs blanked; the ROC AUC (COVID-19 vs
  the rest) that survives each, with patient-bootstrap CIs. High AUC without lungs = shortcuts.
- :func:`run_audit` runs all of it over a run's test split and writes ``audit.csv`` (per image
  and method), ``audit.json`` (summary + a plain-words verdict) and ``audit_maps/`` (mean
  heatmaps per class and per source as ``.npy``) into the run folder.

CLI::

    python -m core.audit --run assets/model --data ../shared/cxr [--methods gradcam,scorecam_fast]
                         [--limit N] [--json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from core import config, metrics
from core.metrics import fmt as _fmt

DEFAULT_METHODS = ("gradcam", "scorecam_fast")
SANITY_THRESHOLD = 0.5  # mean Spearman correlation below this -> the method passes
SANITY_N = 8  # images per method for the randomisation check
MIN_MEAN_N = 10  # never draw a "mean" image over fewer images than this (it would be a copy)


# --------------------------------------------------------------------------- trust measures
def _fit(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == tuple(shape):
        return mask
    return cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0


def trust(heatmap: np.ndarray, lung_mask: np.ndarray, border: float = 0.1, top: float = 0.15) -> dict:
    """Where a heatmap's energy lies, as shares of its total (non-negative) energy.

    Returns ``in_lung_share`` (energy inside ``lung_mask``), ``lung_area_share`` (the lungs'
    share of the image: what a uniform map would give), ``lung_ratio`` (= in_lung_share /
    lung_area_share; above 1 means the map favours the lungs), ``border_share`` (energy in the
    band of ``border`` x side along all four edges) and ``top_share`` (energy in the top
    ``top`` x height rows). An all-zero map counts as uniform.
    """
    h = np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0)
    if h.ndim != 2:
        raise ValueError(f"trust() takes one heatmap (H, W); got shape {h.shape}")
    h = np.clip(h, 0, None)
    total = h.sum()
    if total <= 0:
        h = np.ones_like(h)
        total = h.sum()
    m = _fit(lung_mask, h.shape)
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


# --------------------------------------------------------------------------- deletion / insertion
def _predict(model, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    out = [np.asarray(model(x[i : i + batch_size], training=False)) for i in range(0, len(x), batch_size)]
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
def randomised_copy(model, seed: int = config.SEED):
    """The same network with every learned weight re-initialised (Adebayo et al.'s full randomisation).

    Layers whose weights are fixed by design (non-trainable: frozen lung net, fixed blur kernels)
    keep their weights, so only what the model *learned* is destroyed.
    """
    import keras

    keras.utils.set_random_seed(seed)
    fresh = keras.models.clone_model(model)
    fresh.build(model.input_shape)
    for src, dst in zip(_all_layers(model), _all_layers(fresh), strict=False):
        if not src.weights:
            continue
        if not src.trainable or not src.trainable_weights:
            dst.set_weights(src.get_weights())
    return fresh


def _all_layers(model):
    out = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers and not layer.trainable:
            out.append(layer)  # a frozen sub-model is kept whole
        elif hasattr(layer, "layers") and layer.layers:
            out.extend(_all_layers(layer))
        else:
            out.append(layer)
    return out


def spearman(a: np.ndarray, b: np.ndarray, side: int = 64) -> float:
    """Spearman rank correlation of two maps (downsampled to ``side`` x ``side``); 0 if one is constant."""
    from scipy.stats import spearmanr

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
    from core import explain

    rand = random_model if random_model is not None else randomised_copy(model)
    rs = []
    for img in np.asarray(images, dtype=np.float32):
        a = explain.explain(model, img, method, class_index=class_index, layer=layer, **kw)
        b = explain.explain(rand, img, method, class_index=class_index, layer=layer, **kw)
        rs.append(spearman(a, b))
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
        m = _fit(m, img.shape)
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


# --------------------------------------------------------------------------- whole-run audit
def _mean_ci(values, groups=None, n_boot: int = 1000) -> dict:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)] if groups is None else v
    if len(v) == 0:
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    r = metrics.ci(lambda _y, p: float(np.nanmean(p)), np.zeros(len(v)), v, groups, n_boot=n_boot)
    return {**r, "n": int(len(v))}


def _pick(test: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """All test rows, or ``limit`` of them taken round-robin over classes (both classes kept)."""
    if not limit or limit >= len(test):
        return test.reset_index(drop=True)
    shuffled = test.sample(frac=1.0, random_state=seed)
    rank = shuffled.groupby("class").cumcount()
    return shuffled.assign(_r=rank.values).sort_values(["_r"], kind="stable").head(limit).drop(columns="_r").reset_index(drop=True)


def _save_maps(folder: Path, sums: dict, counts: dict) -> list[str]:
    import os

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for key, arr in sums.items():
        n = counts[key]
        # A "mean" X-ray over a handful of images is close to a copy of one: not written.
        if n == 0 or (key.startswith("image__") and n < MIN_MEAN_N):
            continue
        path = folder / f"{key}.npy"
        tmp = folder / f".{key}.tmp.npy"
        np.save(tmp, (arr / n).astype(np.float32))
        os.replace(tmp, path)
        written.append(path.name)
    return written


def mean_maps_png(run, out=None, min_n: int = MIN_MEAN_N, tile: int = 224) -> Path | None:
    """One PNG of MEAN heatmaps over MEAN X-rays (per method; per class and per source), from ``audit_maps/``.

    Groups of fewer than ``min_n`` images are left out: a mean over a handful of images is close
    to a copy of one. The mean lung mask is drawn as a contour.
    """
    from core import explain

    run = Path(run)
    folder = run / "audit_maps"
    info = json.loads((run / "audit.json").read_text())
    counts = info.get("map_counts", {})
    tiles, labels = [], []
    for method in info["methods"]:
        row = []
        for key in sorted(k for k in counts if k.startswith(f"heat__{method}__")):
            group = key.split("__", 2)[2]
            if counts[key] < min_n:
                continue
            heat = np.load(folder / f"{key}.npy")
            if not (folder / f"image__{group}.npy").exists():
                continue
            img = np.load(folder / f"image__{group}.npy")
            lung = np.load(folder / f"lungs__{group}.npy")
            if img.shape[0] < tile:  # draw at a readable size
                img, heat, lung = (cv2.resize(a.astype(np.float32), (tile, tile)) for a in (img, heat, lung))
            rgb = explain.overlay(img, heat / max(float(heat.max()), 1e-8), alpha=0.45)
            rgb = np.ascontiguousarray(rgb)
            cnt, _ = cv2.findContours((lung >= 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(rgb, cnt, -1, (255, 255, 255), 1)
            for k, text in enumerate((method, f"{group} n={counts[key]}")):
                cv2.putText(rgb, text, (4, 14 + 14 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                            cv2.LINE_AA)
            row.append(rgb)
        if row:
            tiles.append(np.concatenate(row, axis=1))
            labels.append(method)
    if not tiles:
        return None
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tiles]
    sheet = np.concatenate(tiles, axis=0)
    out = Path(out) if out else run / "audit_maps.png"
    tmp = out.with_name("." + out.name + ".tmp.png")
    cv2.imwrite(str(tmp), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    tmp.replace(out)
    return out


def run_audit(run=None, data=None, methods=DEFAULT_METHODS, limit: int | None = None,
              di_methods=None, sanity_n: int = SANITY_N, steps: int = 16, n_boot: int = 1000,
              write: bool = True, progress: bool = True, seed: int = config.SEED, lung_model=None) -> dict:
    """Audit a run over its test split (``predictions.csv`` rows with split == test).

    Images are read from ``data`` (paths are relative to the data root) at the model's size;
    lungs come from :func:`core.lungs.masks`. Heatmaps explain class 0 (COVID-19) for every image.
    ``di_methods`` (default: ``methods``) get deletion/insertion AUCs; ``lung_model`` replaces the
    shipped lung net (tests). Writes ``audit.csv``,
    ``audit.json`` and ``audit_maps/*.npy`` into the run (``write=True``) and returns the summary.
    """
    from tqdm import tqdm

    from core import explain, images, lungs, runs
    from core import model as cxr_model

    t_start = time.time()
    run = runs.resolve_run(run)
    cfg = runs.read_config(run)
    clf = runs.load_model(run)
    size = cxr_model.input_size(clf)
    classes = list(cfg.get("classes") or config.classes(cfg.get("task", "binary")))
    preds = runs.read_predictions(run)
    test = preds[preds["split"] == "test"]
    if test.empty:
        raise runs.RunError(f"run {run.name}: predictions.csv has no test rows to audit")
    test = _pick(test, limit, seed)
    root = config.data_dir(data if data is not None else None)
    if data is None and not (root / str(test["path"].iloc[0])).exists() and cfg.get("data_root"):
        root = Path(cfg["data_root"])  # fall back to where the run was trained
    paths = [root / p for p in test["path"]]
    methods = list(methods)
    di_methods = methods if di_methods is None else list(di_methods)
    unknown = [m for m in methods if m not in explain.METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(explain.METHODS)}")
    timing = {}

    t0 = time.time()
    imgs, kept, errors = images.load_many(paths, size)
    test = test.iloc[list(kept)].reset_index(drop=True)
    if len(test) == 0:
        raise FileNotFoundError(f"none of the {len(paths)} test images could be read under {root}")
    timing["load_s"] = time.time() - t0

    t0 = time.time()
    lung = lungs.masks(imgs, model=lung_model)
    timing["lungs_s"] = time.time() - t0

    y = (test["label"].astype(str) == classes[0]).to_numpy().astype(int) if "label" in test else None
    if "class" in test:
        y = (test["class"].astype(str) == classes[0]).to_numpy().astype(int)
    if "patient_id" not in test:
        test["patient_id"] = test["path"]
    # Images without a patient id are their own resampling unit.
    test["patient_id"] = test["patient_id"].where(test["patient_id"].notna(), test["path"]).astype(str)
    groups = test["patient_id"].to_numpy()

    rows = []
    sums, counts = {}, {}

    def add(key, arr):
        sums[key] = sums.get(key, 0) + arr
        counts[key] = counts.get(key, 0) + 1

    group_keys = [[f"class-{c}", f"source-{s}"] for c, s in zip(test["class"], test["source"], strict=True)]
    for i in range(len(test)):
        for g in group_keys[i]:
            add(f"image__{g}", imgs[i].astype(np.float64))
            add(f"lungs__{g}", lung[i].astype(np.float64))
    for method in methods:
        t0 = time.time()
        it = tqdm(range(len(test)), desc=f"audit {method}", disable=not progress, file=sys.stderr)
        for i in it:
            heat = explain.explain(clf, imgs[i], method, class_index=config.COVID_INDEX)
            row = {"path": test["path"][i], "source": test["source"][i], "label": test.get("label", test["class"])[i],
                   "class": test["class"][i], "patient_id": test["patient_id"][i],
                   "method": method, **trust(heat, lung[i])}
            if method in di_methods:
                row["deletion_auc"], row["insertion_auc"] = deletion_insertion(
                    clf, imgs[i], heat, config.COVID_INDEX, steps)
            rows.append(row)
            for g in group_keys[i]:
                add(f"heat__{method}__{g}", heat.astype(np.float64))
        timing[f"{method}_s"] = time.time() - t0

    t0 = time.time()
    sanity = {}
    if sanity_n:
        rand = randomised_copy(clf, seed)
        pick = np.random.default_rng(seed).choice(len(test), size=min(sanity_n, len(test)), replace=False)
        for method in methods:
            sanity[method] = sanity_check(clf, imgs[pick], method, random_model=rand)
    timing["sanity_s"] = time.time() - t0

    t0 = time.time()
    pr = probes(clf, imgs, lung, y, groups, test["source"].to_numpy(), n_boot=n_boot)
    p_by = pr.pop("_p")
    timing["probes_s"] = time.time() - t0

    table = pd.DataFrame(rows)
    for k, v in p_by.items():
        table[f"p_covid_{k}"] = np.tile(v, len(methods))
    pcol = f"p_{classes[0]}"
    if pcol in test:
        diff = np.abs(test[pcol].to_numpy(float) - p_by["original"])
        consistency = float(np.nanmax(diff)) if len(diff) else 0.0
    else:
        consistency = None

    summary_methods = {}
    for method in methods:
        t = table[table["method"] == method]
        per = {}
        for name, sub in [("all", t)] + [(c, t[t["class"] == c]) for c in classes] + \
                         [(f"source:{s}", t[t["source"] == s]) for s in sorted(t["source"].unique())]:
            if sub.empty:
                continue
            g = sub["patient_id"].astype(str).to_numpy()
            d = {"n": int(len(sub)),
                 "in_lung_share": _mean_ci(sub["in_lung_share"], g, n_boot),
                 "lung_area_share": float(sub["lung_area_share"].mean()),
                 "lung_ratio": float(sub["lung_ratio"].mean()),
                 "border_share": float(sub["border_share"].mean()),
                 "top_share": float(sub["top_share"].mean())}
            if "deletion_auc" in sub and sub["deletion_auc"].notna().any():
                d["deletion_auc"] = float(sub["deletion_auc"].mean())
                d["insertion_auc"] = float(sub["insertion_auc"].mean())
            per[name] = d
        summary_methods[method] = {"title": getattr(explain, "TITLES", {}).get(method, method),
                                   "groups": per, "sanity": sanity.get(method)}
    summary = {
        "run": run.name,
        "run_name": cfg.get("name"),
        "model_sha256": cfg.get("model_sha256"),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "n_images": int(len(test)),
        "n_unreadable": len(errors),
        "limit": limit,
        "classes": classes,
        "explained_class": classes[0],
        "methods": summary_methods,
        "probes": pr,
        "lungs": {"model": str(lungs.MODEL_PATH.relative_to(config.REPO_ROOT)),
                  "mean_area_share": float(np.mean([m.mean() for m in lung]))},
        "p_consistency_max_abs_diff": consistency,
        "settings": {"steps": steps, "deletion_baseline": "image mean", "insertion_baseline": "Gaussian blur",
                     "sanity_n": sanity_n, "sanity_threshold": SANITY_THRESHOLD, "border": 0.1, "top": 0.15,
                     "probe_fill": pr["fill"], "probe_lung_dilation": 0.03},
        "map_counts": {k: v for k, v in counts.items() if k.startswith("heat__")},
    }
    summary["verdict"] = verdict(summary)
    timing["total_s"] = time.time() - t_start
    summary["timing"] = {k: round(v, 2) for k, v in timing.items()}
    if write:
        summary["maps"] = _save_maps(run / "audit_maps", sums, counts)
        runs.write_csv(run / "audit.csv", table)
        runs.write_json(run / "audit.json", summary)
    return summary


def verdict(summary: dict) -> str:
    """The audit in plain words: probes first (they decide), then where the heatmaps point."""
    parts = [summary["probes"]["verdict"]]
    for info in summary["methods"].values():
        g = info["groups"].get("all")
        if not g:
            continue
        share, area = g["in_lung_share"]["value"], g["lung_area_share"]
        where = "more than" if share > area * 1.1 else ("about as much as" if share > area * 0.9 else "less than")
        parts.append(f"{info['title']}: {share:.0%} of the heat lies in the lungs, which cover {area:.0%} of "
                     f"the image ({where} a uniform map); {g['border_share']:.0%} lies in the border band.")
        s = info.get("sanity")
        if s:
            parts.append(f"{info['title']} {'passes' if s['passes'] else 'FAILS'} the randomisation check "
                         f"(mean Spearman {s['spearman_mean']:.2f} vs threshold {s['threshold']}).")
    return " ".join(parts)


# --------------------------------------------------------------------------- comparing runs
def figures(run) -> dict:
    """The figures that decide between models, from a run's metrics.json and audit.json.

    Internal test ROC AUC, within-source AUC (ieee8023: COVID-19 vs other pneumonia, the only
    source holding both classes), the probe AUCs (lungs blanked / lungs only) and, per method,
    the in-lung share, lung ratio and border share. Missing files give missing keys.
    """
    run = Path(run)
    out = {"run": run.name}
    try:
        m = json.loads((run / "metrics.json").read_text())
        out["roc_auc"] = m.get("roc_auc")
        out["within_source"] = {s: v.get("roc_auc") for s, v in (m.get("within_source") or {}).items()}
        if m.get("external"):
            out["external"] = m["external"]
    except (OSError, ValueError):
        pass
    try:
        a = json.loads((run / "audit.json").read_text())
    except (OSError, ValueError):
        return out
    out["probe_auc"] = a["probes"]["auc"]
    out["probe_within_source"] = a["probes"].get("within_source", {})
    out["methods"] = {
        k: {"in_lung_share": v["groups"]["all"]["in_lung_share"], "lung_ratio": v["groups"]["all"]["lung_ratio"],
            "border_share": v["groups"]["all"]["border_share"],
            "deletion_auc": v["groups"]["all"].get("deletion_auc"),
            "insertion_auc": v["groups"]["all"].get("insertion_auc"),
            "sanity_passes": (v.get("sanity") or {}).get("passes")}
        for k, v in a["methods"].items()
    }
    out["verdict"] = a.get("verdict")
    return out


def compare_markdown(runs_by_name: dict) -> str:
    """A Markdown before/after table of :func:`figures` for ``{"label": run_folder, ...}``."""
    figs = {name: figures(r) for name, r in runs_by_name.items()}

    def cell(d):
        return _fmt(d) if isinstance(d, dict) else "n/a"

    methods = sorted({m for f in figs.values() for m in f.get("methods", {})})
    header = ["figure"] + list(figs)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(label, fn):
        vals = []
        for f in figs.values():
            try:
                vals.append(fn(f))
            except (KeyError, TypeError):
                vals.append("n/a")
        lines.append("| " + " | ".join([label] + vals) + " |")

    row("run folder", lambda f: f"`{f['run']}`")
    row("test ROC AUC (COVID-19 vs rest)", lambda f: cell(f["roc_auc"]))
    row("within-source AUC, ieee8023 (COVID-19 vs other pneumonia)", lambda f: cell(f["within_source"]["ieee8023"]))
    row("probe: AUC with the lungs blanked", lambda f: cell(f["probe_auc"]["lungs_blanked"]))
    row("probe: AUC with only the lungs", lambda f: cell(f["probe_auc"]["lungs_only"]))
    row("probe: ieee8023 AUC with the lungs blanked",
        lambda f: cell(f["probe_within_source"]["ieee8023"]["lungs_blanked"]))
    for m in methods:
        row(f"{m}: in-lung share of heat (lungs' area share)",
            lambda f, m=m: f"{cell(f['methods'][m]['in_lung_share'])} (ratio {f['methods'][m]['lung_ratio']:.2f})")
        row(f"{m}: heat in the border band", lambda f, m=m: f"{f['methods'][m]['border_share']:.0%}")
        row(f"{m}: deletion / insertion AUC",
            lambda f, m=m: f"{f['methods'][m]['deletion_auc']:.2f} / {f['methods'][m]['insertion_auc']:.2f}")
        row(f"{m}: randomisation check",
            lambda f, m=m: {True: "passes", False: "fails", None: "n/a"}[f["methods"][m]["sanity_passes"]])
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.audit",
        description="Shortcut audit of a run over its test split: heatmap trust measures, deletion/"
                    "insertion, randomisation sanity check and lung-blanking probes. Writes audit.csv, "
                    "audit.json and audit_maps/ into the run.",
    )
    parser.add_argument("--run", help="run folder or name (default: the shipped model, assets/model)")
    parser.add_argument("--data", help="data root (default: $CXR_DATA_DIR or data/)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated explanation methods (default: %(default)s)")
    parser.add_argument("--di-methods", help="methods that get deletion/insertion AUCs (default: all of --methods)")
    parser.add_argument("--limit", type=int, help="audit only N test images (both classes kept)")
    parser.add_argument("--sanity-n", type=int, default=SANITY_N, help="images per method for the randomisation check")
    parser.add_argument("--png", action="store_true", help="also draw audit_maps.png (mean maps over mean X-rays)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    di = [m.strip() for m in args.di_methods.split(",")] if args.di_methods else None
    try:
        summary = run_audit(args.run, args.data, methods, args.limit, di, args.sanity_n, progress=not args.json)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.png:
        from core import runs

        mean_maps_png(runs.resolve_run(args.run))
    if args.json:
        print(json.dumps(summary, default=float))
    else:
        print(summary["verdict"])
        print(f"({summary['n_images']} images, {summary['timing']['total_s']:.0f} s; written to "
              f"audit.csv / audit.json in the run)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
