"""The shortcut audit: can a model's explanations, and its predictions, be trusted?

Most published COVID-19 chest X-ray classifiers learned the image *source* (hospital, age,
text, borders) rather than the disease (DeGrave et al., Nature Machine Intelligence 2021). This
module measures that, per image and per explanation method, with checks a shortcut cannot pass:

- :func:`trust`: where a heatmap's energy lies: inside the lung fields (against the lungs'
  share of the image), in the border band and in the top band (where text and markers sit).
- :func:`deletion_insertion`: deletion and insertion AUC (Petsiuk et al., RISE, BMVC 2018),
  kept for comparison (``--di-methods``); the blank it leaves is itself a signal, so the audit
  scores faithfulness with ROAD (:mod:`core.road`) instead.
- :func:`sanity_check`: the model randomisation test (Adebayo et al., NeurIPS 2018): maps of the
  trained model against the same network with its learned weights re-initialised, compared by
  Spearman rank correlation. Rule: a method **passes** if the mean correlation is below 0.5
  (its maps depend on what the model learned); a method whose maps barely change fails.
- :func:`probes`: the counterfactual test of DeGrave et al., offline: re-predict every image
  with the lungs blanked and with everything but the lungs blanked; the ROC AUC (COVID-19 vs
  the rest) that survives each, with patient-bootstrap CIs. High AUC without lungs = shortcuts.
- :func:`run_audit` runs all of it over a run's test split, one named step after another
  (:func:`open_run`, :func:`load_images`, :func:`explain_all`, :func:`trust_table`,
  :func:`sanity_checks`, :func:`probes`, :func:`road_step`, :func:`pointing_step`,
  :func:`source_probe_step`, :func:`slices_step`, then :func:`core.findings.findings`), and
  writes ``audit.csv`` (per image and method), ``audit.json`` (summary, the findings as cards
  and a plain-words verdict) and ``audit_maps/`` (mean heatmaps per class and per source as
  ``.npy``) into the run folder. Images are prepared through ``core.inputs``: a lung-crop run
  is audited on what its network sees, with the lung masks and expert boxes mapped into that
  view by ``inputs.from_film``.

CLI (``--json`` prints the summary with the same findings; ``--markdown FILE`` rewrites the
generated block of ``assets/AUDIT.md``; audit_maps.png is drawn unless ``--no-png``)::

    python -m core.audit --run assets/model --data ../shared/cxr [--methods gradcam,scorecam_fast]
                         [--limit N] [--json] [--markdown assets/AUDIT.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from core import config, findings, metrics, pointing, road, slices, source_probe
from core.explain.registry import AUDIT_DEFAULT
from core.metrics import fmt as _fmt

# LayerCAM is left out by default: at a last convolution followed by global pooling its maps equal
# Grad-CAM++'s; full Score-CAM (scorecam_fast's slow original) and SmoothGrad (20 passes per map) would
# each add a minute or more to the audit on two cores (--methods adds any of them).
DEFAULT_METHODS = AUDIT_DEFAULT  # the methods marked audit=True in core.explain.registry
SANITY_THRESHOLD = 0.5  # mean Spearman correlation below this -> the method passes
SANITY_N = 8  # images per method for the randomisation check
RANDOM_PER_IMAGE = 8  # random maps per image for the pointing game's baseline
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
    for old in folder.glob("*.npy"):  # maps of methods or groups this audit no longer has
        if old.name not in written:
            old.unlink()
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


@contextlib.contextmanager
def _timed(timing: dict, key: str):
    t0 = time.time()
    yield
    timing[key] = time.time() - t0


# --------------------------------------------------------------------------- whole-run audit, step by step
def open_run(run=None, data=None, methods=DEFAULT_METHODS, limit: int | None = None, seed: int = config.SEED) -> dict:
    """Step 1: the run, its model and settings, and the rows to audit (test; external for the source probe).

    Returns a context dict: ``run``, ``cfg``, ``model``, ``size``, ``classes``, ``crop`` (the
    run's lung-crop settings or None), ``root`` (data root), ``test`` and ``external`` tables.
    """
    from core import evaluate, explain, inputs, runs
    from core import model as cxr_model

    run = runs.resolve_run(run)
    cfg = runs.read_config(run)
    unknown = [m for m in methods if m not in explain.METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(explain.METHODS)}")
    split = runs.read_split(run) if (run / "split.csv").is_file() else None
    # ``group``: the bootstrap's and the folds' unit, patients the split kept together (as core.evaluate)
    preds = evaluate.with_groups(runs.read_predictions(run), split)
    test = preds[preds["split"] == "test"]
    if test.empty:
        raise runs.RunError(f"run {run.name}: predictions.csv has no test rows to audit")
    test = _pick(test, limit, seed)
    external = preds[preds["split"] == "external"].reset_index(drop=True)
    if limit:
        external = external.head(0)
    root = config.data_dir(data if data is not None else None)
    if data is None and not (root / str(test["path"].iloc[0])).exists() and cfg.get("data_root"):
        root = Path(cfg["data_root"])  # fall back to where the run was trained
    clf = runs.load_model(run)
    return {"run": run, "cfg": cfg, "model": clf, "size": cxr_model.input_size(clf),
            "classes": list(cfg.get("classes") or config.classes(cfg.get("task", "binary"))),
            "crop": inputs.settings(cfg), "root": root, "test": test, "external": external,
            "methods": list(methods), "limit": limit}


def _small_film(film: np.ndarray, side: int = 256) -> np.ndarray:
    """The film with its longer side at most ``side`` (aspect kept): enough for masks and boxes."""
    h, w = film.shape
    s = min(1.0, side / max(h, w))
    if s >= 1.0:
        return film
    return cv2.resize(film, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def load_images(table: pd.DataFrame, root: Path, size: int, crop, boxes: dict | None = None,
                lung_model=None, progress: bool = True, desc: str = "load") -> dict:
    """Step 2: films -> what the network sees (``core.inputs``), with lungs and expert boxes in that view.

    Returns ``x`` (n, size, size), ``boxes`` (n, 4; the region of each film the network sees),
    ``fell_back`` (n,), ``lung`` (n, size, size) bool (the lung net's mask of the film, mapped
    with ``inputs.from_film``), ``expert`` (list: the expert lung boxes as a mask in the same
    view, None where the film has none), ``kept`` (row indices that loaded) and ``errors``.
    """
    from tqdm import tqdm

    from core import images, inputs, lungs

    boxes = boxes or {}
    out = {"x": [], "boxes": [], "fell_back": [], "lung": [], "expert": [], "kept": [], "errors": []}
    paths = table["path"].astype(str).tolist()
    for start in tqdm(range(0, len(paths), 16), desc=desc, disable=not progress, file=sys.stderr):
        films, idx = [], []
        for i in range(start, min(start + 16, len(paths))):
            try:
                films.append(images.decode(root / paths[i]))
                idx.append(i)
            except images.ImageError as exc:
                out["errors"].append({"path": paths[i], "reason": exc.reason})
        if not films:
            continue
        x, bx, fb = inputs.prepare(films, size, crop, lung_model)
        for film, b, i in zip(films, bx, idx, strict=True):
            small = _small_film(film)
            lung = lungs.mask(small, model=lung_model).astype(np.float32)
            out["lung"].append(inputs.from_film(lung, b, size) >= 0.5)
            ex = boxes.get(paths[i])
            out["expert"].append(None if ex is None else
                                 inputs.from_film(pointing.box_mask(ex, small.shape).astype(np.float32), b, size) >= 0.5)
        out["x"].append(x)
        out["boxes"].append(bx)
        out["fell_back"].append(fb)
        out["kept"] += idx
    out["x"] = np.concatenate(out["x"]) if out["x"] else np.zeros((0, size, size), np.float32)
    out["boxes"] = np.concatenate(out["boxes"]) if out["boxes"] else np.zeros((0, 4))
    out["fell_back"] = np.concatenate(out["fell_back"]) if out["fell_back"] else np.zeros(0, bool)
    out["lung"] = np.stack(out["lung"]) if out["lung"] else np.zeros((0, size, size), bool)
    return out


def test_rows(ctx: dict, loaded: dict) -> pd.DataFrame:
    """Step 2b: the test rows that loaded, with ``y`` (1 = the explained class) and the resampling ``group``."""
    test = ctx["test"].iloc[loaded["kept"]].reset_index(drop=True)
    if len(test) == 0:
        raise FileNotFoundError(f"none of the {len(ctx['test'])} test images could be read under {ctx['root']}")
    if "class" not in test:
        test["class"] = test["label"]
    if "label" not in test:
        test["label"] = test["class"]
    if "patient_id" not in test:
        test["patient_id"] = test["path"]
    # Images without a patient id are their own resampling unit.
    test["patient_id"] = test["patient_id"].where(test["patient_id"].notna(), test["path"]).astype(str)
    if "group" not in test:
        test["group"] = test["patient_id"]
    test["group"] = test["group"].where(test["group"].notna(), test["patient_id"]).astype(str)
    test["y"] = (test["class"].astype(str) == ctx["classes"][0]).astype(int)
    return test


def explain_all(model, x: np.ndarray, methods, progress: bool = True) -> dict[str, np.ndarray]:
    """Step 3: every method's maps of the explained class (COVID-19) for every image, (n, size, size)."""
    from core import explain

    out = {}
    for method in methods:
        t0 = time.time()
        out[method] = explain.explain_many(model, x, method, class_index=config.COVID_INDEX)
        if progress:
            print(f"audit: {method} maps for {len(x)} images in {time.time() - t0:.1f} s", file=sys.stderr)
    return out


def trust_table(model, test: pd.DataFrame, x, lung, maps: dict, di_methods=(), steps: int = 16) -> pd.DataFrame:
    """Step 4: one row per image and method: where the heat lies (:func:`trust`), and deletion/insertion
    AUCs for ``di_methods``."""
    rows = []
    for method, heat in maps.items():
        for i in range(len(test)):
            r = test.iloc[i]
            row = {"path": r["path"], "source": r["source"], "label": r["label"], "class": r["class"],
                   "patient_id": r["patient_id"], "group": r["group"], "method": method, **trust(heat[i], lung[i])}
            if method in di_methods:
                row["deletion_auc"], row["insertion_auc"] = deletion_insertion(
                    model, x[i], heat[i], config.COVID_INDEX, steps)
            rows.append(row)
    return pd.DataFrame(rows)


def mean_maps(test: pd.DataFrame, x, lung, maps: dict) -> tuple[dict, dict]:
    """Step 4b: sums and counts of images, lung masks and heatmaps per class and per source."""
    sums, counts = {}, {}

    def add(key, arr):
        sums[key] = sums.get(key, 0) + arr.astype(np.float64)
        counts[key] = counts.get(key, 0) + 1

    for i, (c, s) in enumerate(zip(test["class"], test["source"], strict=True)):
        for g in (f"class-{c}", f"source-{s}"):
            add(f"image__{g}", x[i])
            add(f"lungs__{g}", lung[i])
            for method, heat in maps.items():
                add(f"heat__{method}__{g}", heat[i])
    return sums, counts


def sanity_checks(model, x, methods, n: int, random_model, seed: int = config.SEED) -> dict:
    """Step 5: the randomisation check (:func:`sanity_check`) of each method on ``n`` images."""
    if not n:
        return {}
    pick = np.random.default_rng(seed).choice(len(x), size=min(n, len(x)), replace=False)
    return {m: {**sanity_check(model, x[pick], m, random_model=random_model), "_pick": pick} for m in methods}


def _group_means(values: np.ndarray, test: pd.DataFrame, classes, n_boot: int) -> dict:
    """Mean with a patient-bootstrap CI over all images, per class and per source (finite values only)."""
    out = {}
    ok = np.isfinite(values)
    for name, sel in [("all", ok)] + [(c, ok & (test["class"] == c).to_numpy()) for c in classes] + \
            [(f"source:{s}", ok & (test["source"] == s).to_numpy()) for s in sorted(test["source"].unique())]:
        if sel.any():
            out[name] = _mean_ci(values[sel], test["group"].to_numpy()[sel], n_boot)
    return out


def road_step(model, test: pd.DataFrame, x, lung, maps: dict, classes, fractions=road.FRACTIONS,
              n_boot: int = 1000, seed: int = config.SEED, progress: bool = True) -> tuple[dict, dict]:
    """Step 6: ROAD (:mod:`core.road`) of every method, of a random-map baseline and of the lungs.

    The ``lungs`` map ranks pixels by how deep inside the lung mask they lie: its ROAD says
    whether removing the lungs (with imputation) moves the score more than removing the rest.
    Returns the summary and per-image columns ``{name: combined (n,)}``.
    """
    from tqdm import tqdm

    all_maps = {**maps, "random": road.random_maps(len(x), x.shape[1:], seed),
                "lungs": np.stack([road.region_map(m) for m in lung]) if len(lung) else np.zeros(x.shape)}
    bar = tqdm(total=len(x), desc="audit ROAD", disable=not progress, file=sys.stderr)
    res = road.road(model, x, all_maps, config.COVID_INDEX, fractions, seed=seed, progress=bar.update)
    bar.close()
    summary = {"fractions": list(fractions), "grid": road.GRID, "noise": road.NOISE, "score": "P(COVID-19)",
               "maps": {}}
    for name, r in res.items():
        d = {k: _group_means(r[k], test, classes, n_boot) for k in ("combined", "morf_mean", "lerf_mean")}
        d["curve"] = {"morf": r["morf"].mean(axis=0).tolist(), "lerf": r["lerf"].mean(axis=0).tolist()}
        if name != "random":
            d["vs_random"] = _mean_ci(r["combined"] - res["random"]["combined"], test["group"].to_numpy(), n_boot)
        summary["maps"][name] = d
    return summary, {name: r["combined"] for name, r in res.items()}


def _point(heat: np.ndarray, region: np.ndarray) -> dict:
    """:func:`core.pointing.point` of one map, or the mean over a stack of (baseline) maps."""
    if heat.ndim == 2:
        return pointing.point(heat, region)
    pts = [pointing.point(h, region) for h in heat]
    return {k: float(np.mean([p[k] for p in pts])) for k in ("hit", "mass", "area")}


def pointing_step(test: pd.DataFrame, lung, expert: list, maps: dict, n_boot: int = 1000,
                  seed: int = config.SEED) -> tuple[dict, pd.DataFrame]:
    """Step 7: pointing game and heat mass of every method (and a random-map baseline) against the
    expert lung boxes (images that have them) and against the lung masks (every image)."""
    n = len(test)
    # The baseline: RANDOM_PER_IMAGE smooth random maps per image, averaged (several draws keep it from
    # being noisy). The peak of any smooth map over a bounded image lies on its edge more often than
    # the edge's share of the area, so a random map hits a central region somewhat less often than
    # that region's area share: compare a method with this baseline, not with the area.
    rand = road.random_maps(n * RANDOM_PER_IMAGE, lung.shape[1:], seed + 1).reshape(
        (n, RANDOM_PER_IMAGE) + lung.shape[1:]) if n else np.zeros((0, RANDOM_PER_IMAGE) + lung.shape[1:])
    with_box = np.array([e is not None for e in expert], bool)
    cols = {}
    summary = {"rule": "hit: the map's maximum lies in the region; mass: share of the map's energy inside",
               "boxes": {"n": int(with_box.sum()), "methods": {}},
               "lungs": {"n": n, "methods": {}}}
    g = test["group"].to_numpy()
    for name, heat in {**maps, "random": rand}.items():
        for region, masks, sel in (("boxes", expert, with_box), ("lungs", list(lung), np.ones(n, bool))):
            pts = [_point(heat[i], masks[i]) if sel[i] else {"hit": np.nan, "mass": np.nan, "area": np.nan}
                   for i in range(n)]
            hit = np.array([p["hit"] for p in pts])
            mass = np.array([p["mass"] for p in pts])
            area = np.array([p["area"] for p in pts])
            if name != "random":
                cols[(name, f"{region}_hit")] = hit
                cols[(name, f"{region}_mass")] = mass
            if not sel.any():
                continue
            summary[region]["methods"][name] = {
                "hit": _mean_ci(hit[sel], g[sel], n_boot), "mass": _mean_ci(mass[sel], g[sel], n_boot),
                "area": float(area[sel].mean())}
    return summary, cols


def source_probe_step(model, random_model, x, test: pd.DataFrame, ext: dict | None, n_boot: int = 1000,
                      seed: int = config.SEED) -> tuple[dict, dict]:
    """Step 8: the source probe (:mod:`core.source_probe`) on the trained features and on those of the
    random-weights copy (the floor), over the test images plus any external ones."""
    from core import model as cxr_model

    cols = ["path", "source", "label", "group"]
    pool = test[cols]
    xs = x
    if ext is not None and len(ext["x"]):
        rows = ext["rows"].assign(group=ext["rows"].get("group", ext["rows"]["patient_id"]))
        pool = pd.concat([pool, rows[cols]], ignore_index=True)
        xs = np.concatenate([x, ext["x"]])
    out = {"n": int(len(pool)), "n_external": int(len(pool) - len(test)), "min_images": source_probe.MIN_IMAGES,
           "folds": source_probe.FOLDS}
    p_true = {}
    for name, net in (("model", model), ("random", random_model)):
        try:
            feats = cxr_model.features(net, xs)
        except ValueError as exc:  # a network without a ``gap`` layer has no penultimate features
            return {**out, "reason": f"no penultimate features: {exc}"}, {}
        out["n_features"] = int(feats.shape[1])
        res = source_probe.source_probes(feats, pool["source"], pool["label"], pool["group"].astype(str),
                                         n_boot, seed)
        p_true[name] = {k: v.pop("_p_true")[: len(test)] for k, v in res.items()}
        out[name] = res
    return out, p_true


def slices_step(ctx: dict, test: pd.DataFrame, p: np.ndarray, n_boot: int = 1000, seed: int = config.SEED) -> dict:
    """Step 9: AUC, sensitivity and specificity per metadata slice (:mod:`core.slices`) at the run's
    validation-chosen threshold (0.5 without metrics.json)."""
    from core import datasets, runs

    meta = test[["path", "source", "label"]].copy()
    try:
        table = datasets.load_table(ctx["root"])
        extra = [c for c in slices.COLUMNS if c in table.columns and c not in meta.columns]
        meta = meta.merge(table[["path"] + extra].drop_duplicates("path"), on="path", how="left")
    except (FileNotFoundError, ValueError, OSError):
        pass
    threshold = 0.5
    try:
        threshold = float(runs.read_metrics(ctx["run"])["threshold"]["value"])
    except (runs.RunError, KeyError, TypeError, ValueError):
        pass
    return slices.slice_metrics(meta, test["y"], p, test["group"], threshold, n_boot=n_boot, seed=seed)


def _methods_summary(table: pd.DataFrame, classes, sanity: dict, n_boot: int) -> dict:
    """Per method: trust measures per group (all, class, source), and its sanity check."""
    from core import explain

    out = {}
    for method in table["method"].unique():
        t = table[table["method"] == method]
        per = {}
        for name, sub in [("all", t)] + [(c, t[t["class"] == c]) for c in classes] + \
                         [(f"source:{s}", t[t["source"] == s]) for s in sorted(t["source"].unique())]:
            if sub.empty:
                continue
            d = {"n": int(len(sub)),
                 "in_lung_share": _mean_ci(sub["in_lung_share"], sub["group"].astype(str).to_numpy(), n_boot),
                 **{k: float(sub[k].mean()) for k in ("lung_area_share", "lung_ratio", "border_share", "top_share")}}
            if "deletion_auc" in sub and sub["deletion_auc"].notna().any():
                d["deletion_auc"] = float(sub["deletion_auc"].mean())
                d["insertion_auc"] = float(sub["insertion_auc"].mean())
            per[name] = d
        s = sanity.get(method)
        out[method] = {"title": explain.TITLES.get(method, method), "groups": per,
                       "sanity": None if s is None else {k: v for k, v in s.items() if k != "_pick"}}
    return out


def run_audit(run=None, data=None, methods=DEFAULT_METHODS, limit: int | None = None,
              di_methods=(), sanity_n: int = SANITY_N, steps: int = 16, n_boot: int = 1000,
              write: bool = True, progress: bool = True, seed: int = config.SEED, lung_model=None,
              road_fractions=road.FRACTIONS) -> dict:
    """Audit a run over its test split (``predictions.csv`` rows with split == test).

    The steps, each a function of this module: :func:`open_run`, :func:`load_images` (through
    ``core.inputs``, so a lung-crop run is audited on what its network sees), :func:`explain_all`,
    :func:`trust_table` and :func:`mean_maps`, :func:`sanity_checks`, :func:`probes`,
    :func:`road_step`, :func:`pointing_step`, :func:`source_probe_step`, :func:`slices_step`,
    then the findings (:func:`core.findings.findings`). Heatmaps explain class 0 (COVID-19) for
    every image; ``di_methods`` also get RISE deletion/insertion AUCs (off by default: ROAD
    replaces them); ``lung_model`` replaces the shipped lung net (tests). Writes ``audit.csv``,
    ``audit.json``, ``audit_maps/*.npy`` into the run (``write=True``) and returns the summary.
    """
    t_start = time.time()
    timing: dict = {}
    with _timed(timing, "open_s"):
        ctx = open_run(run, data, methods, limit, seed)
    clf, size, classes = ctx["model"], ctx["size"], ctx["classes"]
    with _timed(timing, "load_s"):
        boxes, box_counts = pointing.read_boxes(ctx["root"])
        loaded = load_images(ctx["test"], ctx["root"], size, ctx["crop"], boxes, lung_model, progress)
        test = test_rows(ctx, loaded)
        x, lung = loaded["x"], loaded["lung"]
        ext = None
        if len(ctx["external"]):
            e = load_images(ctx["external"], ctx["root"], size, ctx["crop"], None, lung_model, progress, "external")
            ext = {"x": e["x"], "rows": ctx["external"].iloc[e["kept"]].reset_index(drop=True)}
    with _timed(timing, "explain_s"):
        maps = explain_all(clf, x, methods, progress)
    with _timed(timing, "trust_s"):
        table = trust_table(clf, test, x, lung, maps, di_methods or (), steps)
        sums, counts = mean_maps(test, x, lung, maps)
    with _timed(timing, "sanity_s"):
        rand = randomised_copy(clf, seed)
        sanity = sanity_checks(clf, x, methods, sanity_n, rand, seed)
        for v in sanity.values():
            v["paths"] = test["path"].to_numpy()[v["_pick"]].tolist()
    with _timed(timing, "probes_s"):
        pr = probes(clf, x, lung, test["y"].to_numpy(), test["group"].to_numpy(), test["source"].to_numpy(),
                    n_boot=n_boot)
        p_by = pr.pop("_p")
    with _timed(timing, "road_s"):
        road_res, road_cols = road_step(clf, test, x, lung, maps, classes, road_fractions, n_boot, seed, progress)
    with _timed(timing, "pointing_s"):
        point_res, point_cols = pointing_step(test, lung, loaded["expert"], maps, n_boot, seed)
        point_res["boxes"]["counts"] = box_counts
    with _timed(timing, "source_probe_s"):
        source_res, p_true = source_probe_step(clf, rand, x, test, ext, n_boot, seed)
    with _timed(timing, "slices_s"):
        slices_res = slices_step(ctx, test, p_by["original"], n_boot, seed)

    table = _per_image_columns(table, test, p_by, road_cols, point_cols, p_true)
    summary = _summary(ctx, test, loaded, table, sanity, pr, lung, counts, n_boot, steps, di_methods)
    summary.update({"road": road_res, "pointing_game": point_res, "source_probe": source_res, "slices": slices_res})
    summary["verdict"] = verdict(summary)
    summary["findings"] = findings.findings(summary, table)
    timing["total_s"] = time.time() - t_start
    summary["timing"] = {k: round(v, 2) for k, v in timing.items()}
    if write:
        from core import runs

        summary["maps"] = _save_maps(ctx["run"] / "audit_maps", sums, counts)
        runs.write_csv(ctx["run"] / "audit.csv", table)
        runs.write_json(ctx["run"] / "audit.json", summary)
    return summary


def _per_image_columns(table: pd.DataFrame, test: pd.DataFrame, p_by: dict, road_cols: dict, point_cols: dict,
                       p_true: dict) -> pd.DataFrame:
    """audit.csv: the trust rows plus, per image, the probe probabilities, ROAD, pointing and source-probe columns."""
    k = table["method"].nunique()
    table = table.copy()
    for name, v in p_by.items():
        table[f"p_covid_{name}"] = np.tile(v, k)
    for name, v in road_cols.items():
        if (table["method"] == name).any():
            table.loc[table["method"] == name, "road_combined"] = v
        else:  # the baselines are per image: the same on every method's row
            table[f"road_combined_{name}"] = np.tile(v, k)
    for (method, col), v in point_cols.items():
        table.loc[table["method"] == method, col] = v
    for net, per in p_true.items():
        suffix = "" if net == "model" else "_random"
        within = np.full(len(test), np.nan)
        for key, v in per.items():
            if key.startswith("label:"):
                within = np.where(np.isfinite(v), v, within)
        table[f"source_p_all{suffix}"] = np.tile(per["all"], k)
        table[f"source_p_label{suffix}"] = np.tile(within, k)
    return table


def _summary(ctx, test, loaded, table, sanity, pr, lung, counts, n_boot, steps, di_methods) -> dict:
    from core import lungs

    cfg = ctx["cfg"]
    pcol = f"p_{ctx['classes'][0]}"
    consistency = None
    if pcol in test:
        diff = np.abs(test[pcol].to_numpy(float) - table[table["method"] == table["method"].iloc[0]]
                      ["p_covid_original"].to_numpy(float))
        consistency = float(np.nanmax(diff)) if len(diff) else 0.0
    return {
        "run": ctx["run"].name,
        "run_name": cfg.get("name"),
        "model_sha256": cfg.get("model_sha256"),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "n_images": int(len(test)),
        "n_unreadable": len(loaded["errors"]),
        "unreadable": loaded["errors"][:20],
        "limit": ctx.get("limit"),
        "classes": ctx["classes"],
        "explained_class": ctx["classes"][0],
        "lung_crop": ctx["crop"],
        "n_fell_back": int(np.sum(loaded["fell_back"])),
        "methods": _methods_summary(table, ctx["classes"], sanity, n_boot),
        "probes": pr,
        "lungs": {"model": str(lungs.MODEL_PATH.relative_to(config.REPO_ROOT)),
                  "mean_area_share": float(np.mean([m.mean() for m in lung])) if len(lung) else float("nan")},
        "p_consistency_max_abs_diff": consistency,
        "settings": {"steps": steps, "di_methods": list(di_methods or ()), "deletion_baseline": "image mean",
                     "insertion_baseline": "Gaussian blur", "sanity_n": len(next(iter(sanity.values()))["_pick"])
                     if sanity else 0, "sanity_threshold": SANITY_THRESHOLD, "border": 0.1, "top": 0.15,
                     "probe_fill": pr["fill"], "probe_lung_dilation": 0.03},
        "map_counts": {k: v for k, v in counts.items() if k.startswith("heat__")},
    }


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


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.audit",
        description="Shortcut audit of a run over its test split: findings ranked by severity, from heatmap "
                    "trust measures, ROAD, the pointing game against expert lung boxes, the randomisation "
                    "check, lung-blanking probes, a source probe on the model's features and per-slice "
                    "metrics. Writes audit.csv, audit.json, audit_maps/ and audit_maps.png into the run.",
    )
    parser.add_argument("--run", help="run folder or name (default: the shipped model, assets/model)")
    parser.add_argument("--data", help="data root (default: $CXR_DATA_DIR or data/)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated explanation methods (default: %(default)s)")
    parser.add_argument("--di-methods", help="methods that also get RISE deletion/insertion AUCs (default: none; "
                                             "ROAD replaces them)")
    parser.add_argument("--limit", type=int, help="audit only N test images (both classes kept)")
    parser.add_argument("--sanity-n", type=int, default=SANITY_N, help="images per method for the randomisation check")
    parser.add_argument("--no-png", action="store_true", help="do not draw audit_maps.png (mean maps over mean X-rays)")
    parser.add_argument("--markdown", metavar="FILE",
                        help="also rewrite the generated block of FILE (e.g. assets/AUDIT.md) with the findings "
                             "and figures")
    parser.add_argument("--json", action="store_true", help="print the summary (with its findings) as one JSON object")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    di = [m.strip() for m in args.di_methods.split(",")] if args.di_methods else ()
    from core import runs

    try:
        summary = run_audit(args.run, args.data, methods, args.limit, di, args.sanity_n, progress=not args.json)
    except (FileNotFoundError, ValueError, runs.RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run = runs.resolve_run(args.run)
    if not args.no_png:
        mean_maps_png(run)
    if args.markdown:
        findings.update_markdown(args.markdown, summary, run)
    if args.json:
        print(json.dumps(summary, default=float))
    else:
        print(summary["verdict"])
        for f in summary["findings"]:
            print(f"[{f['severity']}] {f['claim']}")
        print(f"({summary['n_images']} images, {summary['timing']['total_s']:.0f} s; written to "
              f"audit.csv / audit.json in the run)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
