"""Train a classifier and write a complete run folder.

``python -m core.train --data DIR`` trains the shipped model's recipe (the defaults below, chosen
by the leave-one-source-out ablation in assets/MODEL_CARD.md).

Recipe, in order:

1. :func:`core.splits.prepare` gives the patient-level split into a development set and a test
   set (``--holdout-source NAME`` moves one source out of both: its images become the
   "external" split). The development set is cut into ``--folds`` patient-grouped folds,
   stratified by source and label (:func:`core.splits.assign_folds`).
2. Every film is decoded once and prepared by :func:`core.inputs.prepare` (optionally cropped
   to the bounding box of its lungs), cached on disk under ``<runs>/.cache``.
3. ``--members`` networks are trained, member k on every fold but k, for a fixed number of
   epochs with a cosine schedule (no early stopping: choosing an epoch on a fold would bias
   that fold's predictions). Augmentations are chosen to survive the in-model standardisation
   (random resized crop, rotation, gamma, intensity windowing, noise, JPEG re-compression,
   cut-out, low resolution). With ``--adversarial W`` a source head behind a gradient-reversal
   layer learns to tell the collection of an image from the network's features among images of
   the same class, and the features are pushed to make that impossible.
4. Each member predicts its own held-out fold: these out-of-fold predictions of the whole
   development set (the ``val`` rows of predictions.csv) are what calibration (Platt scaling)
   and the decision threshold are fitted on, never the test split.
5. The members are averaged into one saved model (``model.keras``, safe-mode loadable, no
   source head), which predicts the test and external images.

Class weights (balanced per source within a class by default), a checkpoint every epoch
(``--resume RUN`` continues a killed run), fixed seeds (same seed, same numbers on one machine)
and ``--strategy mirrored|multiworker`` (tf.distribute, see :mod:`core.distribute`).

The run folder (see :mod:`core.runs`) gets model.keras, config.json, split.csv, history.csv
(one row per member and epoch), predictions.csv, env.json and, through
:func:`core.evaluate.evaluate_run`, metrics.json.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from core import config, distribute, images, inputs, runs

AUGMENT = {
    # Every knob survives the per-image standardisation inside the model (a linear brightness or
    # contrast change would not: standardisation undoes it exactly).
    # rot: degrees; scale: random resized crop, (min, max) share of the side kept; shift: fraction of
    # the side; gamma: log range; window: largest share of each image's pixels an intensity window clips at
    # each end (window/level); noise: Gaussian sigma as a share of 255; jpeg: probability of a JPEG re-encoding
    # (quality 30-90); cutout: probability of one blanked rectangle (up to 1/3 of each side);
    # lowres: probability of a down- then up-scaled copy.
    "none": dict(rot=0.0, scale=(1.0, 1.0), shift=0.0, gamma=0.0, window=0.0, noise=0.0, jpeg=0.0,
                 cutout=0.0, lowres=0.0),
    "light": dict(rot=5.0, scale=(0.9, 1.0), shift=0.03, gamma=0.1, window=0.05, noise=0.01, jpeg=0.2,
                  cutout=0.0, lowres=0.1),
    "default": dict(rot=10.0, scale=(0.8, 1.0), shift=0.05, gamma=0.25, window=0.1, noise=0.02, jpeg=0.3,
                    cutout=0.25, lowres=0.25),
    "strong": dict(rot=15.0, scale=(0.7, 1.0), shift=0.08, gamma=0.4, window=0.15, noise=0.03, jpeg=0.5,
                   cutout=0.5, lowres=0.4),
}

DEFAULTS = dict(
    data=None,
    runs=None,
    name="default",
    task="binary",
    preset="default",
    backbone=None,
    weights="none",
    size=128,
    epochs=30,
    batch_size=32,
    lr=1e-3,
    seed=config.SEED,
    split_seed=config.SEED,
    split_file=None,
    folds=3,
    members=3,
    lung_crop=True,
    adversarial=0.0,
    augment="default",
    hflip=False,
    balance="source",
    holdout_source=None,
    exclude_sources=None,
    limit=None,
    strategy=None,
    logical_cpus=None,
    crop=None,
    contrast=None,
    width=None,
    dropout=None,
    field="local",
    lung_mask=None,
    calibrate=True,
    cache=True,
    evaluate=True,
    verbose=1,
    resume=None,
)
# The development set is the whole non-test part of the split: validation comes from the folds.
SPLIT_FRACTIONS = (0.8, 0.0, 0.2)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data
def _cache_file(cache_dir: Path, root: Path, size: int, lung_crop: dict | None) -> Path:
    key = str(Path(root).resolve())
    if lung_crop is not None:
        from core import lungs

        key += json.dumps(lung_crop, sort_keys=True) + lungs.model_sha256()
    tag = "lungs" if lung_crop is not None else "pixels"
    return cache_dir / f"{tag}-{hashlib.sha1(key.encode()).hexdigest()[:10]}-{size}.npz"


def _read_cache(cfile: Path | None) -> dict:
    if not cfile or not cfile.exists():
        return {}
    try:
        with np.load(cfile, allow_pickle=False) as z:
            return {
                str(p): (int(s), int(m), img, box, bool(fb))
                for p, s, m, img, box, fb in zip(
                    z["paths"], z["sizes"], z["mtimes"], z["images"], z["boxes"], z["fell_back"], strict=True
                )
            }
    except Exception:  # a corrupt or old-format cache is rebuilt
        return {}


def _write_cache(cfile: Path, cached: dict) -> None:
    cfile.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted(cached)
    tmp = cfile.with_name(cfile.name + f".tmp{os.getpid()}.npz")
    np.savez(
        tmp,
        paths=np.array(keys),
        sizes=np.array([cached[k][0] for k in keys], np.int64),
        mtimes=np.array([cached[k][1] for k in keys], np.int64),
        images=np.stack([cached[k][2].astype(np.float32) for k in keys]),
        boxes=np.stack([np.asarray(cached[k][3], np.float64) for k in keys]),
        fell_back=np.array([cached[k][4] for k in keys], bool),
    )
    os.replace(tmp, cfile)


def prepare_images(root, paths: list[str], size: int, lung_crop: dict | None = None, cache_dir=None,
                   progress: bool = True):
    """Decode and prepare ``paths`` (relative to ``root``) once, through :func:`core.inputs.prepare`.

    Returns ``(x (n_ok, size, size), boxes (n_ok, 4), fell_back (n_ok,), kept, errors)``: ``kept``
    are the indices of the paths that loaded, ``errors`` one ImageError per path that did not.
    With ``cache_dir`` the prepared films are kept in an .npz there (keyed by path, file size and
    mtime, the crop settings and the lung model's sha256), so that later runs skip this step.
    """
    root = Path(root)
    cfile = _cache_file(Path(cache_dir), root, size, lung_crop) if cache_dir else None
    cached = _read_cache(cfile)
    out: list = [None] * len(paths)
    todo = []
    for i, rel in enumerate(paths):
        try:
            st = (root / rel).stat()
        except OSError:
            todo.append(i)
            continue
        hit = cached.get(rel)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            out[i] = hit[2:]
        else:
            todo.append(i)
    errors: list[images.ImageError] = []
    if todo:
        log(f"preparing {len(todo)} films at {size}x{size}{' (lung crop)' if lung_crop is not None else ''} "
            f"({len(paths) - len(todo)} cached)")
        chunks = [todo[k : k + 16] for k in range(0, len(todo), 16)]
        pbar = None
        if progress:
            from tqdm import tqdm

            pbar = tqdm(total=len(todo), desc="preparing", unit="img", file=sys.stderr)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            jobs = pool.map(lambda c: (c, inputs.load_many([root / paths[i] for i in c], size, lung_crop)), chunks)
            for chunk, (x, boxes, fb, ok, errs) in jobs:
                for j, k in enumerate(ok):
                    out[chunk[k]] = (x[j], boxes[j], bool(fb[j]))
                errors.extend(errs)
                if pbar:
                    pbar.update(len(chunk))
        if pbar:
            pbar.close()
        if cfile:
            for i in todo:
                if out[i] is not None:
                    st = (root / paths[i]).stat()
                    cached[paths[i]] = (st.st_size, st.st_mtime_ns, *out[i])
            _write_cache(cfile, cached)
    kept = [i for i, o in enumerate(out) if o is not None]
    x = np.stack([out[i][0] for i in kept]).astype(np.float32) if kept else np.zeros((0, size, size), np.float32)
    boxes = np.stack([out[i][1] for i in kept]) if kept else np.zeros((0, 4))
    fell_back = np.array([out[i][2] for i in kept], bool)
    return x, boxes, fell_back, kept, errors


def subset(table: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """At most ``limit`` images per (split, source, label) cell, sampled with ``seed`` (quick runs)."""
    if not limit or table.empty:
        return table
    parts = []
    for _, g in table.groupby(["split", "source", "label"], sort=True):
        parts.append(g.sample(n=min(limit, len(g)), random_state=seed))
    return pd.concat(parts).sort_index()


def sample_weights(table: pd.DataFrame, classes: tuple[str, ...], balance: str) -> np.ndarray:
    """Per-image weights with mean 1.

    ``class``: every class has the same total weight. ``source``: also, within a class, every
    source has the same share, so a source rare in one class (ieee8023 pneumonia) counts as much
    as the others: the model gains nothing by learning the source.
    ``none``: all ones.
    """
    n = len(table)
    if balance == "none" or n == 0:
        return np.ones(n, np.float32)
    w = np.zeros(n, np.float64)
    cls = table["class"].to_numpy()
    src = table["source"].to_numpy()
    present = [c for c in classes if (cls == c).any()]
    for c in present:
        in_c = cls == c
        if balance == "class":
            w[in_c] = 1.0 / (len(present) * in_c.sum())
        elif balance == "source":
            srcs = sorted(set(src[in_c]))
            for s in srcs:
                cell = in_c & (src == s)
                w[cell] = 1.0 / (len(present) * len(srcs) * cell.sum())
        else:
            raise ValueError(f"unknown balance {balance!r}; choose class, source or none")
    return (w * n / w.sum()).astype(np.float32)


def prepare_table(cfg: dict, root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(development + test table with a ``fold`` column, external table) for a config.

    The split (dev/test by patient), the held-out source, the ``--limit`` subset, class indices
    and the cross-validation folds of the development set (``fold`` -1 on test rows).
    """
    from core import splits

    table = splits.prepare(root, seed=cfg["split_seed"], split_file=cfg.get("split_file"),
                           fractions=SPLIT_FRACTIONS).copy()
    excluded = set(cfg.get("exclude_sources") or [])
    if excluded - set(table["source"]):
        raise ValueError(f"excluded source(s) {sorted(excluded - set(table['source']))} not in the data; "
                         f"sources: {sorted(set(table['source']))}")
    # dropped after the split is made, so every other image keeps the split it has in the full data
    table = table[~table["source"].isin(excluded)].copy()
    hold = cfg.get("holdout_source")
    if hold:
        if hold not in set(table["source"]):
            raise ValueError(f"holdout source {hold!r} not in the data; sources: {sorted(set(table['source']))}")
        external = table[table["source"] == hold].copy()
        external["split"] = "external"
        table = table[table["source"] != hold].copy()
    else:
        external = table.iloc[:0].copy()
    # a split file made with a validation split: its val images join the development set
    table.loc[table["split"] == "val", "split"] = "train"
    table = subset(table, cfg.get("limit"), cfg["split_seed"])
    external = subset(external, cfg.get("limit"), cfg["split_seed"])
    classes = config.classes(cfg["task"])
    for t in (table, external):
        t["class"] = [config.label_to_class(lab, cfg["task"]) for lab in t["label"]]
        t["y"] = np.array([classes.index(c) for c in t["class"]], dtype=np.int64)
    table = table.reset_index(drop=True)
    table["fold"] = splits.assign_folds(table, int(cfg["folds"]), int(cfg["split_seed"]))
    external["fold"] = -1
    return table, external.reset_index(drop=True)


# ----------------------------------------------------------------------------- augmentation
def _affine(x, u, p: dict, size: int, hflip: bool):
    """Random resized crop, rotation, shift and (optionally) horizontal flip, one transform per image."""
    import tensorflow as tf

    b = tf.shape(x)[0]
    c = (size - 1) / 2.0
    th = u(0, -math.radians(p["rot"]), math.radians(p["rot"]))
    # Random resized crop: keep a share s of the side (zoom in by 1/s), aspect jittered by +-10%.
    s = u(1, p["scale"][0], p["scale"][1])
    aspect = tf.exp(u(10, -0.1, 0.1)) if p["scale"][0] < 1.0 else tf.ones([b])
    sx, sy = s * tf.sqrt(aspect), s / tf.sqrt(aspect)
    tx, ty = u(2, -p["shift"], p["shift"]) * size, u(3, -p["shift"], p["shift"]) * size
    flip = tf.where(u(4, 0.0, 1.0) < 0.5, -1.0, 1.0) if hflip else tf.ones([b])
    cos, sin = tf.cos(th), tf.sin(th)
    # output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2)
    a0, a1, b0, b1 = cos * sx * flip, -sin * sx, sin * sy * flip, cos * sy
    a2 = c - a0 * c - a1 * c + tx
    b2 = c - b0 * c - b1 * c + ty
    zeros = tf.zeros([b])
    t = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=t, output_shape=tf.constant([size, size]), fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT",
    )


def _intensity(x, u, p: dict):
    """A random intensity window and gamma: non-linear grey-level changes a standardisation keeps.

    The window clips a random share (up to ``window``) of each image's darkest and brightest
    pixels, found from the image's own sorted values, and stretches the rest: as a radiologist's
    window/level, it always changes the picture, whatever the film's own range.
    """
    import tensorflow as tf

    v = tf.clip_by_value(x / 255.0, 0.0, 1.0)
    if p["window"]:
        flat = tf.sort(tf.reshape(v, [tf.shape(v)[0], -1]), axis=1)
        n = tf.cast(tf.shape(flat)[1] - 1, tf.float32)
        lo_i = tf.cast(tf.round(u(5, 0.0, p["window"]) * n), tf.int32)
        hi_i = tf.cast(tf.round(u(6, 1.0 - p["window"], 1.0) * n), tf.int32)
        lo = tf.reshape(tf.gather(flat, lo_i, batch_dims=1), [-1, 1, 1, 1])
        hi = tf.reshape(tf.gather(flat, hi_i, batch_dims=1), [-1, 1, 1, 1])
        v = tf.clip_by_value((v - lo) / tf.maximum(hi - lo, 1e-3), 0.0, 1.0)
    if p["gamma"]:
        g = tf.reshape(tf.exp(u(7, -p["gamma"], p["gamma"])), [-1, 1, 1, 1])
        v = tf.pow(v + 1e-6, g)
    return v * 255.0


def _jpeg(x, u, prob: float):
    """Re-encode a share ``prob`` of the images as JPEG at a random quality (30-90)."""
    import tensorflow as tf

    q = tf.cast(tf.round(u(8, 30.0, 90.0)), tf.int32)
    pick = u(9, 0.0, 1.0) < prob

    def one(args):
        img, quality, do = args
        enc = tf.image.adjust_jpeg_quality(tf.clip_by_value(img / 255.0, 0.0, 1.0), quality) * 255.0
        return tf.where(do, enc, img)

    return tf.map_fn(one, (x, q, pick), fn_output_signature=tf.float32)


def _cutout(x, u, prob: float, size: int):
    """Blank one random rectangle (up to a third of each side) to the image mean, in a share of the images."""
    import tensorflow as tf

    yy = tf.reshape(tf.range(size, dtype=tf.float32), [1, size, 1, 1])
    xx = tf.reshape(tf.range(size, dtype=tf.float32), [1, 1, size, 1])

    def r(i, lo, hi):
        return tf.reshape(u(i, lo, hi), [-1, 1, 1, 1])

    h, w = r(11, 0.1, 0.33) * size, r(12, 0.1, 0.33) * size
    cy, cx = r(13, 0.0, 1.0) * size, r(14, 0.0, 1.0) * size
    inside = (tf.abs(yy - cy) < h / 2) & (tf.abs(xx - cx) < w / 2) & (r(15, 0.0, 1.0) < prob)
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    return tf.where(inside, mean, x)


def _augment_fn(params: dict, size: int, hflip: bool, seed: int):
    """A batch map ``(step, x, y, w) -> (x', y, w)``; stateless: the same seed and step give the same batch."""
    import tensorflow as tf

    p = {**AUGMENT["none"], **params}
    p["scale"] = tuple(p["scale"])

    def fn(step, x, y, w):
        b = tf.shape(x)[0]
        base = tf.cast(step, tf.int64) * 32

        def u(i, lo, hi, shape=None):
            s = tf.stack([tf.constant(seed, tf.int64), base + i])
            return tf.random.stateless_uniform(shape if shape is not None else [b], seed=s, minval=lo, maxval=hi)

        if p["rot"] or p["scale"] != (1.0, 1.0) or p["shift"] or hflip:
            x = _affine(x, u, p, size, hflip)
        if p["lowres"]:
            # Sources differ in resolution: sometimes train on a blurred (down- then up-scaled) copy.
            f = u(16, 0.35, 0.8, shape=[])
            small = tf.cast(tf.round(f * size), tf.int32)
            lo = tf.image.resize(tf.image.resize(x, [small, small], antialias=True), [size, size])
            pick = tf.reshape(tf.cast(u(17, 0.0, 1.0) < p["lowres"], tf.float32), [-1, 1, 1, 1])
            x = pick * lo + (1.0 - pick) * x
        if p["window"] or p["gamma"]:
            x = _intensity(x, u, p)
        if p["jpeg"]:
            x = _jpeg(x, u, p["jpeg"])
        if p["noise"]:
            sd = tf.reshape(u(18, 0.0, p["noise"] * 255.0), [-1, 1, 1, 1])
            noise = tf.random.stateless_normal(tf.shape(x), seed=tf.stack([tf.constant(seed, tf.int64), base + 19]))
            x = x + sd * noise
        if p["cutout"]:
            x = _cutout(x, u, p["cutout"], size)
        return tf.clip_by_value(x, 0.0, 255.0), y, w

    return fn


def make_dataset(x, y, w, batch_size: int, seed: int, augment: str | dict = "default", hflip: bool = False):
    """An endless, shuffled, augmented, prefetched tf.data pipeline over in-memory images.

    ``y`` and ``w`` may be arrays or dicts of arrays keyed by output name (class and source heads).
    """
    import tensorflow as tf

    params = AUGMENT[augment] if isinstance(augment, str) else dict(augment)
    size = x.shape[1]

    def f32(v):
        return {k: np.asarray(a, np.float32) for k, a in v.items()} if isinstance(v, dict) else np.asarray(v, np.float32)

    ds = tf.data.Dataset.from_tensor_slices((x[..., None].astype(np.float32), f32(y), f32(w))).cache()
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True).repeat().batch(batch_size)
    fn = _augment_fn(params, size, hflip, seed)
    ds = tf.data.Dataset.zip(tf.data.Dataset.counter(), ds).map(lambda i, b: fn(i, *b), num_parallel_calls=1)
    return ds.prefetch(2)


# ----------------------------------------------------------------------------- scores and calibration
def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def val_scores(table: pd.DataFrame, probs: np.ndarray) -> dict:
    """val_auc (covid vs rest), val_ws_auc (mean within-source AUC) and val_loss of held-out images."""
    y = (table["class"].to_numpy() == "covid").astype(int)
    p = probs[:, config.COVID_INDEX]
    ws = []
    for _, g in table.assign(_y=y, _p=p).groupby("source"):
        if g["_y"].nunique() == 2:
            ws.append(_auc(g["_y"].to_numpy(), g["_p"].to_numpy()))
    onehot = np.eye(probs.shape[1], dtype=np.float32)[table["y"].to_numpy()]
    loss = float(-np.mean(np.sum(onehot * np.log(np.clip(probs, 1e-7, 1.0)), axis=1)))
    return {"val_auc": _auc(y, p), "val_ws_auc": float(np.mean(ws)) if ws else float("nan"), "val_loss": loss}


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature T minimising the log loss of softmax(logits / T) on (validation) data."""
    ts = np.exp(np.linspace(np.log(0.25), np.log(8.0), 241))
    best, best_t = np.inf, 1.0
    for t in ts:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nll = -np.mean(logp[np.arange(len(y)), y])
        if nll < best:
            best, best_t = nll, float(t)
    return best_t


def fit_platt(d: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt scaling: (a, b) of P(covid) = sigmoid(a * d + b) on (validation) logit differences d."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y)) < 2:
        return 1.0, 0.0
    lr = LogisticRegression(C=1e4).fit(np.asarray(d, np.float64)[:, None], y)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def calibration_params(logits: np.ndarray, y: np.ndarray, method: str) -> dict:
    """Fit a calibration map on validation logits: ``platt`` (binary) or ``temperature``.

    Returns ``{"method", "kernel", "bias", ...}`` for the fixed Dense layer of :func:`with_calibration`.
    ``y`` holds class indices (0 = covid).
    """
    n = logits.shape[1]
    if method == "platt" and n == 2:
        a, b = fit_platt(logits[:, 0] - logits[:, 1], (y == 0).astype(int))
        return {"method": "platt", "a": a, "b": b, "kernel": (a * np.eye(2)).tolist(), "bias": [b, 0.0]}
    if method in ("platt", "temperature"):
        t = fit_temperature(logits, y)
        return {"method": "temperature", "temperature": t, "kernel": (np.eye(n) / t).tolist(), "bias": [0.0] * n}
    raise ValueError(f"unknown calibration {method!r}; choose platt, temperature or none")


def with_calibration(model, params: dict):
    """A copy of ``model`` with a fixed Dense layer ``calibration`` between ``logits`` and ``probs``.

    Built-in layers only, so the model still loads with ``safe_mode=True``; the ranking of the
    logits (AUC) is unchanged for a positive slope.
    """
    import keras

    logits = model.get_layer("logits").output
    n = int(logits.shape[-1])
    layer = keras.layers.Dense(n, name="calibration", trainable=False)
    cal = layer(logits)
    layer.set_weights([np.asarray(params["kernel"], np.float32), np.asarray(params["bias"], np.float32)])
    probs = keras.layers.Activation("softmax", name="probs")(cal)
    return keras.Model(model.input, probs, name=model.name)


def _logits(model, x: np.ndarray) -> np.ndarray:
    """The pre-calibration logits of ``model`` (its ``logits`` layer) for raw images (n, H, W)."""
    import keras

    from core import model as model_lib

    return model_lib.probabilities(keras.Model(model.input, model.get_layer("logits").output), x, batch_size=64)


def apply_calibration(logits: np.ndarray, params: dict) -> np.ndarray:
    """Probabilities from logits through a fitted calibration (as the model's ``calibration`` layer does)."""
    z = np.asarray(logits, np.float64)
    if params.get("method", "none") != "none":
        z = z @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"], np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _calibration_method(cfg: dict) -> str:
    c = cfg.get("calibrate")
    if c is True or c is None:
        return "platt" if cfg["task"] == "binary" else "temperature"
    return str(c) if c else "none"


# ----------------------------------------------------------------------------- networks
def _setup_tf(seed: int, logical_cpus: int | None):
    import tensorflow as tf

    if logical_cpus and logical_cpus > 1:
        cpus = tf.config.list_physical_devices("CPU")
        try:
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(logical_cpus)]
            )
        except RuntimeError as exc:  # the runtime is already initialised in this process
            log(f"warning: cannot split the CPU into {logical_cpus} logical devices ({exc})")
    import keras

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def _model_kwargs(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("crop", "contrast", "width", "dropout", "field") if cfg.get(k) is not None}


def _load_lung_model(path):
    import keras

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lung model {path} does not exist (train it with python -m core.lungs train)")
    return keras.saving.load_model(path, safe_mode=True, compile=False)


@functools.lru_cache(maxsize=1)
def _gradient_reversal():
    """The identity going forward, -lambda times the gradient going back (Ganin & Lempitsky 2015).

    ``stop_gradient(x) * (1 + lam) - lam * x`` equals x, and its gradient with respect to x is
    ``-lam``; ``lam`` is a non-trainable weight that the training loop ramps up from 0.
    """
    import keras

    @keras.saving.register_keras_serializable(package="cxr_train")
    class GradientReversal(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.lam = self.add_weight(shape=(), initializer="zeros", trainable=False, name="lam")

        def call(self, x):
            ops = keras.ops
            return ops.stop_gradient(x) * (1.0 + self.lam) - self.lam * x

    return GradientReversal


@functools.cache
def _source_loss(n_classes: int, n_sources: int):
    """Cross-entropy of the source among the sources of the image's own class.

    The head has one block of ``n_sources`` logits per class; ``y_true`` is one-hot over
    (class, source) pairs, so only the block of the true class is scored: the head learns where
    an image came from *given its label*, which is the part of the source that is a shortcut.
    """
    import keras

    @keras.saving.register_keras_serializable(package="cxr_train", name=f"source_ce_{n_classes}x{n_sources}")
    def source_ce(y_true, y_pred):
        ops = keras.ops
        t = ops.reshape(y_true, (-1, n_classes, n_sources))
        z = ops.reshape(y_pred, (-1, n_classes, n_sources))
        in_class = ops.sum(t, axis=2, keepdims=True)
        return keras.losses.categorical_crossentropy(ops.sum(t, axis=1), ops.sum(z * in_class, axis=1),
                                                     from_logits=True)

    return source_ce


def build_net(cfg: dict, size: int):
    """The inference network of a config (preset or backbone; optional lung gate)."""
    from core import model as model_lib

    kwargs = _model_kwargs(cfg) if cfg["preset"] == "default" and not cfg.get("backbone") else {}
    if cfg.get("lung_mask"):
        kwargs["lung_model"] = _load_lung_model(cfg["lung_mask"])
    if cfg.get("backbone"):
        return model_lib.backbone(cfg["backbone"], cfg["task"], size, weights=cfg.get("weights") or "none")
    return model_lib.build(cfg["preset"], cfg["task"], size, **kwargs)


def build_member(cfg: dict, size: int, sources: list[str], steps_total: int):
    """(training model, inference network) of one member, compiled.

    With ``adversarial`` > 0 and more than one training source, the training model has a second
    output ``source`` (class-conditional source head behind gradient reversal on ``gap``); the
    inference network shares its layers and has no source head.
    """
    import keras

    net = build_net(cfg, size)
    classes = config.classes(cfg["task"])
    schedule = keras.optimizers.schedules.CosineDecay(float(cfg["lr"]), max(1, steps_total), alpha=0.05)
    adv = float(cfg.get("adversarial") or 0.0)
    if adv > 0 and len(sources) > 1:
        feats = _gradient_reversal()(name="grl")(net.get_layer("gap").output)
        h = keras.layers.Dense(64, activation="relu", name="source_hidden")(feats)
        src = keras.layers.Dense(len(classes) * len(sources), name="source")(h)
        model = keras.Model(net.input, {"probs": net.output, "source": src}, name="cxr_adversarial")
        model.compile(
            optimizer=keras.optimizers.Adam(schedule),
            loss={"probs": keras.losses.CategoricalCrossentropy(), "source": _source_loss(len(classes), len(sources))},
            metrics={"probs": [keras.metrics.CategoricalAccuracy(name="accuracy")]},
        )
        return model, net
    net.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.CategoricalCrossentropy(),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    return net, net


def _targets(table: pd.DataFrame, n_classes: int, sources: list[str], adversarial: bool):
    """Keras targets of a training table: one-hot classes, and (class, source) pairs for the source head."""
    y = np.eye(n_classes, dtype=np.float32)[table["y"].to_numpy()]
    if not adversarial:
        return y
    s = np.array([sources.index(v) for v in table["source"]])
    pair = np.zeros((len(table), n_classes * len(sources)), np.float32)
    pair[np.arange(len(table)), table["y"].to_numpy() * len(sources) + s] = 1.0
    return {"probs": y, "source": pair}


def _source_accuracy(model, x: np.ndarray, table: pd.DataFrame, n_classes: int, sources: list[str]) -> float:
    """Balanced accuracy of the source head on held-out images, within their class (chance = 1 / sources)."""
    import tensorflow as tf

    z = np.asarray(model(tf.constant(x[..., None]), training=False)["source"]).reshape(-1, n_classes, len(sources))
    pred = z[np.arange(len(table)), table["y"].to_numpy()].argmax(axis=1)
    true = np.array([sources.index(v) for v in table["source"]])
    per = [float((pred[true == s] == s).mean()) for s in np.unique(true)]
    return float(np.mean(per)) if per else float("nan")


# ----------------------------------------------------------------------------- training one member
def _ramp(adversarial: float, epoch: int, epochs: int) -> float:
    """Gradient-reversal weight at an epoch: 0 at the start, rising to ``adversarial`` (DANN schedule)."""
    p = epoch / max(1, epochs)
    return float(adversarial * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0))


def _epoch_callback(run: Path, ckpt: Path, member: int, fold_table, x_fold, net, sources, state: dict,
                    cfg: dict):
    import keras

    from core import model as model_lib

    n_classes = len(config.classes(cfg["task"]))
    adv = float(cfg.get("adversarial") or 0.0)

    class EpochEnd(keras.callbacks.Callback):
        """Held-out fold scores, history.csv, a checkpoint every epoch, the adversarial ramp."""

        def on_epoch_begin(self, epoch, logs=None):
            if self.model is not net:
                self.model.get_layer("grl").lam.assign(_ramp(adv, epoch, int(cfg["epochs"])))

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            row = {"member": member, "epoch": epoch + 1}
            row.update({k.replace("probs_", ""): float(v) for k, v in logs.items()})
            if len(fold_table):
                row.update(val_scores(fold_table, model_lib.probabilities(net, x_fold, batch_size=64)))
                if self.model is not net:
                    row["val_source_acc"] = _source_accuracy(self.model, x_fold, fold_table, n_classes, sources)
                    row["grl_lambda"] = float(np.asarray(self.model.get_layer("grl").lam))
            state["history"].append(row)
            state["epoch"] = epoch + 1
            # checkpoint first, history.csv last: a kill in between never leaves history.csv a row
            # ahead of the checkpoint (resume would train that epoch again and rewrite the row)
            runs.atomic_save_model(self.model, ckpt / "last.keras")
            runs.write_json(ckpt / "state.json", state)
            runs.write_csv(run / "history.csv", pd.DataFrame(state["history"]))
            if cfg["verbose"]:
                log(f"member {member} epoch {epoch + 1}: " + " ".join(
                    f"{k} {v:.3f}" for k, v in row.items() if k.startswith("val_") and np.isfinite(v)))

    return EpochEnd()


def fit_member(member: int, data: dict, cfg: dict, run: Path, ckpt: Path, state: dict, strategy):
    """Train member ``member`` on every development fold but its own; return its inference network.

    Resumes from ``checkpoint/last.keras`` when ``state`` says this member was under way.
    """
    import keras

    dev, x_dev = data["dev"], data["x_dev"]
    own = (dev["fold"] == member).to_numpy()
    tr, fold = dev[~own].reset_index(drop=True), dev[own].reset_index(drop=True)
    sources = sorted(set(tr["source"]))
    classes = config.classes(cfg["task"])
    batch, epochs = int(cfg["batch_size"]), int(cfg["epochs"])
    steps = max(1, math.ceil(len(tr) / batch))
    seed = int(cfg["seed"]) + 1000 * member
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        if state["epoch"]:  # resume this member: weights, optimizer state and schedule from the checkpoint
            _gradient_reversal(), _source_loss(len(classes), len(sources))  # registered before loading
            model = keras.saving.load_model(ckpt / "last.keras", safe_mode=True)
            net = model if not isinstance(model.output, dict) else keras.Model(
                model.input, model.get_layer("probs").output, name="cxr_member")
        else:
            model, net = build_member(cfg, int(cfg["size"]), sources, steps * epochs)
    adversarial = model is not net
    y = _targets(tr, len(classes), sources, adversarial)
    w = sample_weights(tr, classes, cfg["balance"])
    ds = distribute.shard(make_dataset(x_dev[~own], y, {"probs": w, "source": w} if adversarial else w, batch,
                                       seed, cfg["augment"], bool(cfg["hflip"])))
    if state["epoch"]:
        ds = ds.skip(state["epoch"] * steps)
    cb = _epoch_callback(run, ckpt, member, fold, x_dev[own], net, sources, state, cfg)
    if state["epoch"] < epochs:
        model.fit(ds, epochs=epochs, initial_epoch=int(state["epoch"]), steps_per_epoch=steps,
                  callbacks=distribute.callbacks(strategy, model) + [cb], verbose=1 if cfg["verbose"] else 0)
    return net


# ----------------------------------------------------------------------------- the whole recipe
def _start(cfg: dict, kw: dict) -> tuple[dict, dict, Path | None]:
    """(config, state, run folder or None) for a fresh run or one resumed from its checkpoint."""
    state = {"member": 0, "epoch": 0, "history": [], "done": []}
    resume = cfg.get("resume")
    if not resume:
        return cfg, state, None
    run = runs.resolve_run(resume)
    ckpt = run / "checkpoint"
    if not (ckpt / "state.json").is_file():
        raise runs.RunError(f"run {run.name!r} ({run}) has no checkpoint to resume from.")
    saved = json.loads((ckpt / "train_config.json").read_text())
    saved.update({k: cfg[k] for k in ("epochs", "verbose", "evaluate") if k in kw})
    state = {**state, **json.loads((ckpt / "state.json").read_text())}
    return {**saved, "resume": str(run)}, state, run


def _check(cfg: dict) -> None:
    if isinstance(cfg["augment"], str) and cfg["augment"] not in AUGMENT:
        raise ValueError(f"unknown augment {cfg['augment']!r}; choose one of {sorted(AUGMENT)}")
    config.classes(cfg["task"])  # validates the task
    folds, members = int(cfg["folds"]), int(cfg["members"])
    if folds < 2 or not 1 <= members <= folds:
        raise ValueError(f"need folds >= 2 and 1 <= members <= folds (got folds {folds}, members {members})")


def _load_data(cfg: dict, root: Path, cache_dir: Path | None) -> dict:
    """The tables and prepared pixels of a run: ``dev``/``x_dev`` (with folds), ``rest``/``x_rest`` (test, external)."""
    table, external = prepare_table(cfg, root)
    both = pd.concat([table, external], ignore_index=True)
    t0 = time.time()
    x, boxes, fell_back, kept, errors = prepare_images(
        root, both["path"].tolist(), int(cfg["size"]), inputs.settings(cfg), cache_dir, progress=cfg["verbose"] > 0)
    for err in errors:
        log(f"skipped {err}")
    both = both.iloc[kept].reset_index(drop=True)
    both[["box_y0", "box_x0", "box_y1", "box_x1"]] = boxes
    both["crop_fell_back"] = fell_back
    is_dev = (both["split"] == "train").to_numpy()
    dev, rest = both[is_dev].reset_index(drop=True), both[~is_dev].reset_index(drop=True)
    if len(dev) == 0:
        raise ValueError("the split has no development (training) images")
    return {"dev": dev, "x_dev": x[is_dev], "rest": rest, "x_rest": x[~is_dev], "errors": errors,
            "prepare_seconds": time.time() - t0}


def out_of_fold_logits(nets: list, x: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Pre-calibration logits of each image from the member that did not train on it.

    Row ``i`` is scored by ``nets[fold[i]]`` (member k left fold k out); rows whose fold names no
    member (a fold beyond ``members``, or -1) stay NaN. Training and ``--recalibrate`` both fit
    the calibration on these.
    """
    fold = np.asarray(fold)
    out = np.full((len(x), int(nets[0].output_shape[-1])), np.nan, np.float32)
    for k, net in enumerate(nets):
        own = fold == k
        if own.any():
            out[own] = _logits(net, x[own])
    return out


def _assemble(nets: list, oof_logits: np.ndarray, dev: pd.DataFrame, cfg: dict):
    """The saved model (members averaged, calibration fitted on out-of-fold logits) and its calibration."""
    from core import model as model_lib

    model = model_lib.ensemble(nets) if len(nets) > 1 else nets[0]
    method = _calibration_method(cfg)
    ok = np.isfinite(oof_logits).all(axis=1)
    if method == "none" or not ok.any():
        return model, {"method": "none"}
    params = calibration_params(oof_logits[ok], dev["y"].to_numpy()[ok], method)
    params["fitted_on"] = f"out-of-fold predictions of {int(ok.sum())} development images"
    log(f"calibration {params['method']} fitted on {int(ok.sum())} out-of-fold predictions")
    return with_calibration(model, params), params


def _predictions(model, oof_logits: np.ndarray, calibration: dict, data: dict, classes) -> pd.DataFrame:
    """predictions.csv: out-of-fold rows (split ``val``) and test/external rows from the saved model."""
    from core import model as model_lib

    dev, rest = data["dev"], data["rest"]
    ok = np.isfinite(oof_logits).all(axis=1)
    oof = dev[ok].assign(split="val")
    p_oof = apply_calibration(oof_logits[ok], calibration)
    p_rest = model_lib.probabilities(model, data["x_rest"], batch_size=64)
    nets = model_lib.members(model)
    cols = ["path", "source", "patient_id", "label", "class", "split"]
    extra = ["fold", "box_y0", "box_x0", "box_y1", "box_x1", "crop_fell_back"]
    both = pd.concat([oof, rest], ignore_index=True)
    out = both[cols].copy()
    probs = np.concatenate([p_oof, p_rest]) if len(p_rest) else p_oof
    for j, c in enumerate(classes):
        out[f"p_{c}"] = probs[:, j].astype(float)
    out[extra] = both[extra].to_numpy()
    # Each member's own (calibrated) P(covid) on the test/external rows: what one network alone
    # would have said, so that the ensemble's gain can be read from one run.
    for k, net in enumerate(nets):
        p_k = apply_calibration(_logits(net, data["x_rest"]), calibration) if len(rest) else np.zeros((0, 2))
        out[f"p_covid_member{k}"] = np.r_[np.full(len(oof), np.nan), p_k[:, config.COVID_INDEX]]
    return out


def _final_config(cfg: dict, state: dict, data: dict, calibration: dict, model, run: Path, timing: dict) -> dict:
    from core import model as model_lib

    both = pd.concat([data["dev"], data["rest"]], ignore_index=True)
    keys = ("task", "preset", "backbone", "weights", "size", "seed", "split_seed", "epochs", "batch_size", "lr",
            "folds", "members", "adversarial", "augment", "hflip", "balance", "holdout_source", "exclude_sources",
            "limit", "strategy",
            "calibrate")
    out = {k: cfg.get(k) for k in keys}
    out.update(
        classes=list(config.classes(cfg["task"])),
        name=cfg["name"],
        data_root=str(cfg["data"]),
        model_kwargs={**model_lib.DEFAULTS, **_model_kwargs(cfg)} if cfg["preset"] == "default" else {},
        lung_crop=inputs.settings(cfg),
        lung_mask=str(cfg["lung_mask"]) if cfg.get("lung_mask") else None,
        crop_fell_back={str(s): int(g["crop_fell_back"].sum()) for s, g in both.groupby("source")},
        calibration=calibration,
        member_seeds=[int(cfg["seed"]) + 1000 * k for k in range(int(cfg["members"]))],
        epochs_run=int(max([r["epoch"] for r in state["history"]], default=0)),
        n_train=int(len(data["dev"])),
        n_val=int((data["dev"]["fold"] < int(cfg["members"])).sum()),
        n_test=int((data["rest"]["split"] == "test").sum()),
        n_external=int((data["rest"]["split"] == "external").sum()),
        n_skipped=len(data["errors"]),
        prepare_seconds=round(timing["prepare"], 2),
        train_seconds=round(timing["train"], 2),
        resumed_from=cfg.get("resume"),
        **{k: v for k, v in runs.provenance().items() if k != "source_files"},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        model_sha256=runs.sha256(run / "model.keras"),
        model_bytes=(run / "model.keras").stat().st_size,
        n_params=int(model.count_params()),
        replicas=int(timing["replicas"]),
    )
    return out


def train(cfg: dict | None = None, **kw) -> Path | None:
    """Train per ``cfg`` (keys of :data:`DEFAULTS`, overridden by ``kw``); return the run folder
    (``None`` on the non-chief workers of a multi-worker run, which write none)."""
    cfg, state, run = _start({**DEFAULTS, **(cfg or {}), **kw}, kw)
    _check(cfg)
    distribute.check(cfg.get("strategy"), resume=bool(cfg.get("resume")))  # before any work (TF_CONFIG)
    _setup_tf(int(cfg["seed"]), cfg.get("logical_cpus"))
    # before TensorFlow runs anything (the lung crop does): collectives are configured at creation
    strategy = distribute.strategy(cfg.get("strategy"))
    root = config.data_dir(cfg["data"])
    runs_root = distribute.runs_root(config.runs_dir(cfg["runs"]), cfg.get("strategy"))  # chief only
    cfg["data"] = str(root)
    data = _load_data(cfg, root, config.cache_dir(runs_root) if cfg.get("cache") else None)
    if run is None:
        run = runs.new_run(runs_root, cfg["name"])
        (run / "checkpoint").mkdir()
        runs.write_json(run / "checkpoint" / "train_config.json", cfg)
    ckpt = run / "checkpoint"
    from core import splits

    splits.save_split(pd.concat([data["dev"], data["rest"][data["rest"]["split"] == "test"]]), run / "split.csv")
    log(f"development {len(data['dev'])} ({dict(data['dev']['class'].value_counts())}) in {cfg['folds']} folds, "
        f"{cfg['members']} member(s); test {int((data['rest']['split'] == 'test').sum())}, "
        f"external {int((data['rest']['split'] == 'external').sum())}")

    t1 = time.time()
    nets = []
    for member in range(int(cfg["members"])):
        if member in state["done"]:
            net = build_net(cfg, int(cfg["size"]))
            net.load_weights(ckpt / f"member_{member}.weights.h5")
        else:
            if state["member"] != member:
                state.update(member=member, epoch=0)
            net = fit_member(member, data, cfg, run, ckpt, state, strategy)
            net.save_weights(ckpt / f"member_{member}.weights.h5")
            state["done"].append(member)
            state.update(member=member + 1, epoch=0)
            runs.write_json(ckpt / "state.json", state)
        nets.append(net)
    train_s = time.time() - t1

    oof = out_of_fold_logits(nets, data["x_dev"], data["dev"]["fold"].to_numpy())
    model, calibration = _assemble(nets, oof, data["dev"], cfg)
    runs.write_csv(run / "predictions.csv", _predictions(model, oof, calibration, data, config.classes(cfg["task"])))
    runs.atomic_save_model(model, run / "model.keras")
    timing = {"prepare": data["prepare_seconds"], "train": train_s, "replicas": strategy.num_replicas_in_sync}
    runs.write_json(run / "config.json", _final_config(cfg, state, data, calibration, model, run, timing))
    runs.write_json(run / "env.json", runs.environment())
    shutil.rmtree(ckpt, ignore_errors=True)
    if not distribute.is_chief(cfg.get("strategy")):  # a worker of a multi-worker run: the chief wrote it
        distribute.discard(run, cfg.get("strategy"))
        distribute.barrier(strategy)  # stay in the cluster until the chief is done
        return None
    if cfg.get("evaluate"):
        from core.evaluate import evaluate_run

        evaluate_run(run, progress=False)
    distribute.barrier(strategy)
    log(f"run written to {run}")
    return run


def recalibrate_run(run, method: str = "platt", data=None, runs_root=None, evaluate: bool = True) -> Path:
    """Refit a finished run's calibration on its out-of-fold predictions; rewrite model and predictions.

    The networks (up to ``logits``) are unchanged: each ``val`` row of predictions.csv is scored
    again by the member that did not train on it (its ``fold``), the fixed ``calibration`` layer
    is refitted on those logits, predictions.csv and config.json (``calibration``,
    ``model_sha256``) are rewritten, and metrics.json is re-evaluated.
    """
    from core import model as model_lib

    run = runs.resolve_run(run)
    cfg = runs.read_config(run)
    model = runs.load_model(run)
    root = config.data_dir(data or cfg.get("data_root"))
    pred = runs.read_predictions(run)
    x, _, _, kept, errors = prepare_images(root, pred["path"].tolist(), int(cfg["size"]), inputs.settings(cfg),
                                           config.cache_dir(runs_root), progress=False)
    if errors:
        raise ValueError(f"{len(errors)} images of run {run.name} cannot be read under {root}")
    classes = list(cfg["classes"])
    y = np.array([classes.index(c) for c in pred["class"]])
    is_val = (pred["split"] == "val").to_numpy()
    folds = pred["fold"].fillna(0).astype(int).to_numpy() if "fold" in pred.columns else np.zeros(len(pred), int)
    logits = out_of_fold_logits(model_lib.members(model) or [model], x, np.where(is_val, folds, -1))
    ok = np.isfinite(logits).all(axis=1)
    params = calibration_params(logits[ok], y[ok], method)
    params["fitted_on"] = f"out-of-fold predictions of {int(ok.sum())} development images"
    model = with_calibration(model, params)
    probs = model_lib.probabilities(model, x, batch_size=64)
    probs[ok] = apply_calibration(logits[ok], params)
    for j, c in enumerate(classes):
        pred[f"p_{c}"] = probs[:, j].astype(float)
    runs.write_csv(run / "predictions.csv", pred)
    runs.atomic_save_model(model, run / "model.keras")
    cfg.update(calibration=params, model_sha256=runs.sha256(run / "model.keras"),
               model_bytes=(run / "model.keras").stat().st_size, recalibrated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    runs.write_json(run / "config.json", cfg)
    if evaluate:
        from core.evaluate import evaluate_run

        evaluate_run(run, progress=False)
    log(f"run {run.name} recalibrated ({params['method']})")
    return run


# ----------------------------------------------------------------------------- CLI
def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The options that make a recipe (shared by ``core.train`` and ``core.crossval``)."""
    p.add_argument("--data", help="data root (default: $CXR_DATA_DIR, else data/)")
    p.add_argument("--runs", help="runs root (default: $CXR_RUNS_DIR, else runs/)")
    p.add_argument("--name", default=DEFAULTS["name"], help="run name (folder suffix)")
    p.add_argument("--task", choices=sorted(config.TASKS), default=DEFAULTS["task"])
    p.add_argument("--preset", choices=["default", "seed"], default=DEFAULTS["preset"])
    p.add_argument("--backbone", choices=["densenet121", "resnet50"],
                   help="a keras.applications backbone instead of the preset (slow on a CPU)")
    p.add_argument("--weights", choices=["none", "imagenet"], default=DEFAULTS["weights"],
                   help="backbone start: random, or ImageNet weights (downloaded by Keras: needs internet)")
    p.add_argument("--size", type=int, default=DEFAULTS["size"], help="input side in pixels (default %(default)s)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="epochs per member (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="Adam learning rate (cosine decay)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="training seed (member k uses seed + 1000 k)")
    p.add_argument("--split-seed", type=int, default=DEFAULTS["split_seed"],
                   help="seed of the patient-level split and of the folds")
    p.add_argument("--split-file", help="use (or create) this split CSV")
    p.add_argument("--folds", type=int, default=DEFAULTS["folds"],
                   help="cross-validation folds of the development set (default %(default)s)")
    p.add_argument("--members", type=int, default=DEFAULTS["members"],
                   help="networks trained (member k leaves fold k out) and averaged (default %(default)s)")
    crop = p.add_mutually_exclusive_group()
    crop.add_argument("--lung-crop", dest="lung_crop", action="store_true", default=None,
                      help="crop every film to the bounding box of its lungs (default)")
    crop.add_argument("--no-lung-crop", dest="lung_crop", action="store_false", help="use the whole film")
    p.add_argument("--adversarial", type=float, default=DEFAULTS["adversarial"],
                   help="weight of the gradient-reversed, class-conditional source head (0 = off)")
    p.add_argument("--augment", choices=sorted(AUGMENT), default=DEFAULTS["augment"])
    p.add_argument("--hflip", action="store_true", help="also flip horizontally (off: the heart is on the left)")
    p.add_argument("--balance", choices=["class", "source", "none"], default=DEFAULTS["balance"],
                   help="sample weights: equal per class, or per class and source within a class")
    p.add_argument("--holdout-source", help="leave this source out of training; report it as 'external'")
    p.add_argument("--exclude-sources", type=lambda v: [s.strip() for s in v.split(",") if s.strip()],
                   help="comma-separated sources left out of the run entirely (e.g. to measure what a new "
                   "collection adds); the other images keep their split")
    p.add_argument("--limit", type=int, help="at most N images per split, source and label (quick runs)")
    p.add_argument("--strategy", choices=list(distribute.STRATEGIES),
                   help="tf.distribute strategy: mirrored = local devices; multiworker = several hosts "
                   "(TF_CONFIG on each, see README)")
    p.add_argument("--logical-cpus", type=int, help="split the CPU into N logical devices (to test mirrored)")
    p.add_argument("--crop", type=float, help="default preset: border fraction blanked (default 0.12)")
    p.add_argument("--contrast", choices=["standard", "local"],
                   help="default preset: contrast normalisation (default local)")
    p.add_argument("--width", type=float, help="default preset: channel multiplier")
    p.add_argument("--dropout", type=float, help="default preset: dropout before the head")
    p.add_argument("--field", choices=["global", "local"],
                   help="default preset: receptive field of the last layer (local: ~30%% of the film's side, a patch "
                   "classifier; global: ~60%%)")
    p.add_argument("--lung-mask", nargs="?", const=str(config.ASSETS_DIR / "lungs" / "lungs.keras"),
                   help="gate the image with a frozen lung-segmentation model (default path: assets/lungs/lungs.keras)")
    p.add_argument("--calibrate", choices=["platt", "temperature", "none"],
                   help="calibration fitted on out-of-fold predictions (default: platt for binary, temperature "
                   "for multiclass)")
    p.add_argument("--no-calibrate", action="store_true", help="same as --calibrate none")
    p.add_argument("--no-cache", action="store_true", help="do not cache prepared films under <runs>/.cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def recipe_from_args(a: argparse.Namespace) -> dict:
    """A training config from parsed recipe options (only those given; the rest are DEFAULTS)."""
    cfg = {k: v for k, v in vars(a).items() if k in DEFAULTS and v is not None}
    cfg.update(
        calibrate="none" if a.no_calibrate else (a.calibrate or True),
        cache=not a.no_cache,
        evaluate=not getattr(a, "no_evaluate", False),
        verbose=0 if a.quiet else 1,
    )
    return cfg


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m core.train",
        description="Train a COVID-19 chest X-ray classifier and write a run folder (model, split, history, "
        "predictions, metrics). Without options it trains the shipped model's recipe.",
    )
    add_recipe_arguments(p)
    p.add_argument("--recalibrate", metavar="RUN",
                   help="refit the calibration of a finished run on its out-of-fold predictions (no training)")
    p.add_argument("--no-evaluate", action="store_true", help="do not write metrics.json")
    p.add_argument("--resume", metavar="RUN", help="continue a killed run from its last epoch checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object (run, config, metrics) on stdout")
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    cfg = recipe_from_args(a)
    try:
        if a.recalibrate:
            run = recalibrate_run(a.recalibrate, a.calibrate or "platt", data=a.data, runs_root=a.runs)
        else:
            kw = {}
            if a.resume:
                kw = {"epochs": a.epochs} if "--epochs" in (argv or sys.argv) else {}
                kw["verbose"] = cfg["verbose"]
                cfg = {"resume": a.resume}
            run = train(cfg, **kw)
    except (ValueError, FileNotFoundError) as exc:
        log(f"error: {exc}")
        return 2
    if run is None:  # a non-chief worker of a multi-worker run
        log("worker finished; the chief wrote the run folder")
        return 0
    result = {"run": str(run), "config": runs.read_config(run)}
    if (run / "metrics.json").is_file():
        result["metrics"] = runs.read_metrics(run)
    print(json.dumps(result, default=str) if a.json else run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
