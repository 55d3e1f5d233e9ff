"""Train a classifier and write a complete run folder.

``python -m core.train --data DIR --task binary --preset default --seed 2`` (the shipped model's recipe:
the defaults are the configuration chosen on validation data, see assets/MODEL_CARD.md)

Pipeline: :func:`core.splits.prepare` gives the patient-level split; every image is decoded once
through :func:`core.images.load_many` (and cached on disk under ``<runs>/.cache``), held in a
``tf.data`` pipeline (cache, shuffle, augment, prefetch). Augmentation suits chest X-rays: small
rotation, zoom, shift, brightness/contrast/gamma, no horizontal flip by default (the heart is on
the left). Class weights (optionally balanced per source too), early stopping on a validation
score with the best weights kept, a checkpoint every epoch (``--resume RUN`` continues a killed
run with its optimizer state and history), fixed seeds (same seed, same metrics) and
``--strategy mirrored|multiworker`` (tf.distribute, see :mod:`core.distribute`).
``--holdout-source NAME`` leaves one source out of training and validation entirely; its images
become the "external" split of predictions.csv.

The run folder (see :mod:`core.runs`) gets model.keras, config.json, split.csv, history.csv,
predictions.csv, env.json and, through :func:`core.evaluate.evaluate_run`, metrics.json.
"""

from __future__ import annotations

import argparse
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

from core import config, distribute, images, runs

AUGMENT = {
    # rotation (degrees), zoom (fraction), shift (fraction of side), brightness, contrast,
    # gamma (log range), probability of a low-resolution copy (downscale factor range)
    "none": dict(rot=0.0, zoom=0.0, shift=0.0, bright=0.0, contrast=0.0, gamma=0.0, lowres=0.0),
    "light": dict(rot=5.0, zoom=0.05, shift=0.03, bright=0.05, contrast=0.1, gamma=0.1, lowres=0.0),
    "default": dict(rot=10.0, zoom=0.1, shift=0.06, bright=0.1, contrast=0.2, gamma=0.25, lowres=0.25),
    "strong": dict(rot=15.0, zoom=0.15, shift=0.1, bright=0.15, contrast=0.3, gamma=0.4, lowres=0.5),
}

DEFAULTS = dict(
    data=None,
    runs=None,
    name="default",
    task="binary",
    preset="default",
    size=128,
    epochs=60,
    batch_size=32,
    lr=1e-3,
    seed=config.SEED,
    split_seed=config.SEED,
    split_file=None,
    augment="default",
    hflip=False,
    balance="source",
    monitor="val_auc",
    patience=15,
    holdout_source=None,
    limit=None,
    strategy=None,
    logical_cpus=None,
    crop=None,
    contrast=None,
    width=None,
    dropout=None,
    lung_mask=None,
    calibrate=True,
    cache=True,
    evaluate=True,
    verbose=1,
    resume=None,
)

MONITORS = ("val_auc", "val_ws_auc", "val_score", "val_loss")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data
def _cache_file(cache_dir: Path, root: Path, size: int) -> Path:
    import hashlib

    key = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:10]
    return cache_dir / f"pixels-{key}-{size}.npz"


def decode_images(root, paths: list[str], size: int, cache_dir=None, progress: bool = True):
    """Decode ``paths`` (relative to ``root``) at ``size`` once; return (images, kept, errors).

    With ``cache_dir``, decoded pixels are kept in ``<cache_dir>/pixels-<root>-<size>.npz`` (keyed
    by path, file size and mtime) so that later runs skip decoding.
    """
    root = Path(root)
    cached: dict[str, tuple[int, int, np.ndarray]] = {}
    cfile = _cache_file(Path(cache_dir), root, size) if cache_dir else None
    if cfile and cfile.exists():
        try:
            with np.load(cfile, allow_pickle=False) as z:
                for p, s, m, img in zip(z["paths"], z["sizes"], z["mtimes"], z["images"], strict=True):
                    cached[str(p)] = (int(s), int(m), img)
        except Exception:  # a corrupt cache is rebuilt
            cached = {}
    out = [None] * len(paths)
    todo = []
    for i, rel in enumerate(paths):
        try:
            st = (root / rel).stat()
        except OSError:
            todo.append(i)
            continue
        hit = cached.get(rel)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            out[i] = hit[2].astype(np.float32)
        else:
            todo.append(i)
    errors: list[images.ImageError] = []
    if todo:
        log(f"decoding {len(todo)} images at {size}x{size} ({len(paths) - len(todo)} cached)")
        chunks = [todo[k : k + 16] for k in range(0, len(todo), 16)]

        def work(chunk):
            return chunk, images.load_many([root / paths[i] for i in chunk], size)

        pbar = None
        if progress:
            from tqdm import tqdm

            pbar = tqdm(total=len(todo), desc="decoding", unit="img", file=sys.stderr)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            for chunk, (imgs, kept, errs) in pool.map(work, chunks):
                for j, k in enumerate(kept):
                    out[chunk[k]] = imgs[j]
                errors.extend(errs)
                if pbar:
                    pbar.update(len(chunk))
        if pbar:
            pbar.close()
        if cfile:
            for i in todo:
                if out[i] is not None:
                    st = (root / paths[i]).stat()
                    cached[paths[i]] = (st.st_size, st.st_mtime_ns, out[i])
            _write_cache(cfile, cached)
    kept = [i for i, a in enumerate(out) if a is not None]
    arr = np.stack([out[i] for i in kept]).astype(np.float32) if kept else np.zeros((0, size, size), np.float32)
    return arr, kept, errors


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
    )
    os.replace(tmp, cfile)


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


def _augment_fn(params: dict, size: int, hflip: bool, seed: int):
    import tensorflow as tf

    rot = math.radians(params["rot"])
    zoom, shift = params["zoom"], params["shift"]
    bright, contrast, gamma, lowres = params["bright"], params["contrast"], params["gamma"], params["lowres"]
    c = (size - 1) / 2.0

    def fn(step, x, y, w):
        b = tf.shape(x)[0]
        base = tf.cast(step, tf.int64) * 16

        def u(i, lo, hi, shape=None):
            s = tf.stack([tf.constant(seed, tf.int64), base + i])
            return tf.random.stateless_uniform(shape if shape is not None else [b], seed=s, minval=lo, maxval=hi)

        if rot or zoom or shift or hflip:
            th = u(0, -rot, rot)
            z = u(1, 1.0 - zoom, 1.0 + zoom)
            tx, ty = u(2, -shift, shift) * size, u(3, -shift, shift) * size
            flip = tf.where(u(4, 0.0, 1.0) < 0.5, -1.0, 1.0) if hflip else tf.ones([b])
            cos, sin = tf.cos(th) / z, tf.sin(th) / z
            a0, a1, b0, b1 = cos * flip, -sin, sin * flip, cos
            a2 = c - a0 * c - a1 * c + tx
            b2 = c - b0 * c - b1 * c + ty
            zeros = tf.zeros([b])
            t = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
            x = tf.raw_ops.ImageProjectiveTransformV3(
                images=x,
                transforms=t,
                output_shape=tf.constant([size, size]),
                fill_value=0.0,
                interpolation="BILINEAR",
                fill_mode="REFLECT",
            )
        if lowres:
            # Sources differ in resolution: sometimes train on a blurred (down- then up-scaled) copy.
            f = u(5, 0.35, 0.8, shape=[])
            small = tf.cast(tf.round(f * size), tf.int32)
            lo = tf.image.resize(tf.image.resize(x, [small, small], antialias=True), [size, size])
            pick = tf.reshape(tf.cast(u(6, 0.0, 1.0) < lowres, tf.float32), [-1, 1, 1, 1])
            x = pick * lo + (1.0 - pick) * x
        if bright or contrast or gamma:
            v = tf.clip_by_value(x / 255.0, 0.0, 1.0)
            g = tf.reshape(tf.exp(u(7, -gamma, gamma)), [-1, 1, 1, 1])
            v = tf.pow(v + 1e-6, g)
            m = tf.reduce_mean(v, axis=[1, 2, 3], keepdims=True)
            k = tf.reshape(u(8, 1.0 - contrast, 1.0 + contrast), [-1, 1, 1, 1])
            d = tf.reshape(u(9, -bright, bright), [-1, 1, 1, 1])
            x = tf.clip_by_value((v - m) * k + m + d, 0.0, 1.0) * 255.0
        return x, y, w

    return fn


def make_dataset(x, y, w, batch_size: int, seed: int, augment: str | dict = "default", hflip: bool = False):
    """An endless, shuffled, augmented, prefetched tf.data pipeline over in-memory images."""
    import tensorflow as tf

    params = AUGMENT[augment] if isinstance(augment, str) else dict(augment)
    size = x.shape[1]
    ds = tf.data.Dataset.from_tensor_slices((x[..., None].astype(np.float32), y.astype(np.float32), w)).cache()
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True).repeat().batch(batch_size)
    ds = tf.data.Dataset.zip(tf.data.Dataset.counter(), ds).map(
        lambda i, b: _augment_fn(params, size, hflip, seed)(i, *b), num_parallel_calls=1
    )
    return ds.prefetch(2)


# ----------------------------------------------------------------------------- evaluation helpers
def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def val_scores(table: pd.DataFrame, probs: np.ndarray) -> dict:
    """val_auc (covid vs rest), val_ws_auc (mean within-source AUC), val_score, val_loss."""
    y = (table["class"].to_numpy() == "covid").astype(int)
    p = probs[:, config.COVID_INDEX]
    auc = _auc(y, p)
    ws = []
    for _, g in table.assign(_y=y, _p=p).groupby("source"):
        if g["_y"].nunique() == 2:
            ws.append(_auc(g["_y"].to_numpy(), g["_p"].to_numpy()))
    ws_auc = float(np.mean(ws)) if ws else float("nan")
    onehot = _onehot(table, probs.shape[1])
    loss = float(-np.mean(np.sum(onehot * np.log(np.clip(probs, 1e-7, 1.0)), axis=1)))
    score = np.nanmean([auc, ws_auc]) if not (np.isnan(auc) and np.isnan(ws_auc)) else float("nan")
    return {"val_auc": auc, "val_ws_auc": ws_auc, "val_score": float(score), "val_loss": loss}


def _onehot(table: pd.DataFrame, n: int) -> np.ndarray:
    return np.eye(n, dtype=np.float32)[table["y"].to_numpy()]


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


def _calibrate(model, x_val: np.ndarray, y_val: np.ndarray, method: str):
    import keras

    logit_model = keras.Model(model.input, model.get_layer("logits").output)
    logits = logit_model.predict(x_val[..., None], batch_size=64, verbose=0)
    params = calibration_params(logits, y_val, method)
    return with_calibration(model, params), params


def _calibration_method(cfg: dict) -> str:
    c = cfg.get("calibrate")
    if c is True or c is None:
        return "platt" if cfg["task"] == "binary" else "temperature"
    return str(c) if c else "none"


# ----------------------------------------------------------------------------- training
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
    try:
        tf.config.experimental.enable_op_determinism()
    except Exception:  # older TF
        pass


def _model_kwargs(cfg: dict) -> dict:
    kw = {k: cfg[k] for k in ("crop", "contrast", "width", "dropout") if cfg.get(k) is not None}
    return kw


def _load_lung_model(path):
    import keras

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lung model {path} does not exist (train it with python -m core.lungs train)")
    return keras.saving.load_model(path, safe_mode=True, compile=False)


def prepare_table(cfg: dict, root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table with train/val/test, external table) for a config: split, holdout, subset, classes."""
    from core import splits

    table = splits.prepare(root, seed=cfg["split_seed"], split_file=cfg.get("split_file"))
    table = table.copy()
    hold = cfg.get("holdout_source")
    if hold:
        if hold not in set(table["source"]):
            raise ValueError(f"holdout source {hold!r} not in the data; sources: {sorted(set(table['source']))}")
        external = table[table["source"] == hold].copy()
        external["split"] = "external"
        table = table[table["source"] != hold].copy()
    else:
        external = table.iloc[:0].copy()
    table = subset(table, cfg.get("limit"), cfg["split_seed"])
    external = subset(external, cfg.get("limit"), cfg["split_seed"])
    classes = config.classes(cfg["task"])
    for t in (table, external):
        t["class"] = [config.label_to_class(lab, cfg["task"]) for lab in t["label"]]
        t["y"] = np.array([classes.index(c) for c in t["class"]], dtype=np.int64)
    return table.reset_index(drop=True), external.reset_index(drop=True)


def _epoch_callback(run: Path, ckpt: Path, val_table, x_val, monitor: str, patience: int, state: dict, verbose: int):
    import keras

    mode_max = monitor != "val_loss"

    class EpochEnd(keras.callbacks.Callback):
        """Validation scores, history.csv, best weights, last checkpoint, early stopping."""

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            # One local call per worker (not Model.predict, which on several workers splits the
            # batch between them and may join the parts out of order): same weights, same answer.
            from core import model as model_lib

            probs = model_lib.probabilities(self.model, x_val, batch_size=64)
            scores = val_scores(val_table, probs)
            logs.update(scores)
            row = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}}
            state["history"].append(row)
            value = scores[monitor]
            better = (
                state["best"] is None
                or (not np.isnan(value) and (value > state["best"] if mode_max else value < state["best"]))
            )
            if better:
                state["best"], state["best_epoch"] = float(value), epoch + 1
                self.model.save_weights(ckpt / "best.weights.h5")
            state["epoch"] = epoch + 1
            runs.write_csv(run / "history.csv", pd.DataFrame(state["history"]))
            runs.atomic_save_model(self.model, ckpt / "last.keras")
            runs.write_json(ckpt / "state.json", state)
            if verbose:
                log(
                    f"epoch {epoch + 1}: val_auc {scores['val_auc']:.3f} val_ws_auc {scores['val_ws_auc']:.3f} "
                    f"val_loss {scores['val_loss']:.3f} (best {monitor} {state['best']:.3f} at {state['best_epoch']})"
                )
            if epoch + 1 - state["best_epoch"] >= patience:
                log(f"early stopping: no {monitor} improvement for {patience} epochs")
                self.model.stop_training = True

    return EpochEnd()


def train(cfg: dict | None = None, **kw) -> Path | None:
    """Train per ``cfg`` (keys of :data:`DEFAULTS`, overridden by ``kw``); return the run folder
    (``None`` on the non-chief workers of a multi-worker run, which write none)."""
    cfg = {**DEFAULTS, **(cfg or {}), **kw}
    resume = cfg.get("resume")
    state = {"epoch": 0, "best": None, "best_epoch": 0, "history": []}
    if resume:
        run = runs.resolve_run(resume)
        ckpt = run / "checkpoint"
        if not (ckpt / "last.keras").is_file():
            raise runs.RunError(f"run {run.name!r} ({run}) has no checkpoint/last.keras to resume from.")
        saved = json.loads((ckpt / "train_config.json").read_text())
        saved.update({k: cfg[k] for k in ("epochs", "verbose", "evaluate") if k in kw})
        cfg = {**saved, "resume": str(run)}
        state = json.loads((ckpt / "state.json").read_text())
    if cfg["monitor"] not in MONITORS:
        raise ValueError(f"unknown monitor {cfg['monitor']!r}; choose one of {MONITORS}")
    if isinstance(cfg["augment"], str) and cfg["augment"] not in AUGMENT:
        raise ValueError(f"unknown augment {cfg['augment']!r}; choose one of {sorted(AUGMENT)}")
    config.classes(cfg["task"])  # validates the task
    distribute.check(cfg.get("strategy"), resume=bool(resume))  # before any work (TF_CONFIG)

    _setup_tf(int(cfg["seed"]), cfg.get("logical_cpus"))
    import keras

    from core import model as model_lib

    root = config.data_dir(cfg["data"])
    runs_root = distribute.runs_root(config.runs_dir(cfg["runs"]), cfg.get("strategy"))  # chief only
    cfg["data"] = str(root)
    table, external = prepare_table(cfg, root)
    classes = config.classes(cfg["task"])
    cache_dir = runs_root / ".cache" if cfg.get("cache") else None

    if not resume:
        run = runs.new_run(runs_root, cfg["name"])
        ckpt = run / "checkpoint"
        ckpt.mkdir()
        runs.write_json(ckpt / "train_config.json", cfg)
    from core import splits

    splits.save_split(table, run / "split.csv")

    size = int(cfg["size"])
    t0 = time.time()
    both = pd.concat([table, external], ignore_index=True)
    pix, kept, errors = decode_images(root, both["path"].tolist(), size, cache_dir, progress=cfg["verbose"] > 0)
    for err in errors:
        log(f"skipped {err}")
    both = both.iloc[kept].reset_index(drop=True)
    both["y"] = both["y"].astype(np.int64)
    decode_s = time.time() - t0
    is_train = (both["split"] == "train").to_numpy()
    is_val = (both["split"] == "val").to_numpy()
    tr, va = both[is_train].reset_index(drop=True), both[is_val].reset_index(drop=True)
    x_tr, x_va = pix[is_train], pix[is_val]
    if len(tr) == 0 or len(va) == 0:
        raise ValueError("the split has no training or no validation images")
    y_tr = np.eye(len(classes), dtype=np.float32)[tr["y"].to_numpy()]
    w_tr = sample_weights(tr, classes, cfg["balance"])
    log(
        f"train {len(tr)} ({dict(tr['class'].value_counts())}), val {len(va)}, "
        f"test {int((both['split'] == 'test').sum())}, external {int((both['split'] == 'external').sum())}"
    )

    strategy = distribute.strategy(cfg.get("strategy"))
    lung = cfg.get("lung_mask")
    with strategy.scope():
        if resume:
            model = keras.saving.load_model(ckpt / "last.keras", safe_mode=True)
        else:
            kwargs = _model_kwargs(cfg) if cfg["preset"] == "default" else {}
            if lung:
                kwargs["lung_model"] = _load_lung_model(lung)
            model = model_lib.build(cfg["preset"], cfg["task"], size, **kwargs)
            steps_total = max(1, math.ceil(len(tr) / int(cfg["batch_size"]))) * int(cfg["epochs"])
            schedule = keras.optimizers.schedules.CosineDecay(float(cfg["lr"]), steps_total, alpha=0.05)
            model.compile(
                optimizer=keras.optimizers.Adam(schedule),
                loss=keras.losses.CategoricalCrossentropy(),
                metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            )
    batch = int(cfg["batch_size"])
    steps = max(1, math.ceil(len(tr) / batch))
    ds = distribute.shard(make_dataset(x_tr, y_tr, w_tr, batch, int(cfg["seed"]), cfg["augment"], bool(cfg["hflip"])))
    if state["epoch"]:
        ds = ds.skip(state["epoch"] * steps)
    cb = _epoch_callback(run, ckpt, va, x_va, cfg["monitor"], int(cfg["patience"]), state, cfg["verbose"])
    t1 = time.time()
    if state["epoch"] < int(cfg["epochs"]) and not _stopped(state, cfg):
        model.fit(
            ds,
            epochs=int(cfg["epochs"]),
            initial_epoch=int(state["epoch"]),
            steps_per_epoch=steps,
            callbacks=distribute.callbacks(strategy, model) + [cb],
            verbose=1 if cfg["verbose"] else 0,
        )
    train_s = time.time() - t1
    if (ckpt / "best.weights.h5").is_file():
        model.load_weights(ckpt / "best.weights.h5")

    # Calibration on validation data (never test): Platt scaling of the logits, same ranking.
    calibration = {"method": "none"}
    method = _calibration_method(cfg)
    if method != "none":
        model, calibration = _calibrate(model, x_va, va["y"].to_numpy(), method)
        log(f"calibration {calibration['method']} fitted on validation: {calibration}")

    # predictions for val, test and external images
    pred_mask = both["split"].isin(["val", "test", "external"]).to_numpy()
    pred = both[pred_mask].reset_index(drop=True)
    probs = model_lib.probabilities(model, pix[pred_mask], batch_size=64)
    cols = ["path", "source", "patient_id", "label", "class", "split"]
    out = pred[cols].copy()
    for j, c in enumerate(classes):
        out[f"p_{c}"] = probs[:, j].astype(float)
    runs.write_csv(run / "predictions.csv", out)

    runs.atomic_save_model(model, run / "model.keras")
    best = state["history"][state["best_epoch"] - 1] if state["best_epoch"] else {}
    final_cfg = {
        k: cfg[k]
        for k in (
            "task", "preset", "size", "seed", "split_seed", "epochs", "batch_size", "lr", "augment", "hflip",
            "balance", "monitor", "patience", "holdout_source", "limit", "strategy", "calibrate",
        )
    }
    final_cfg.update(
        classes=list(classes),
        name=cfg["name"],
        data_root=str(root),
        model_kwargs={**model_lib.DEFAULTS, **_model_kwargs(cfg)} if cfg["preset"] == "default" else {},
        lung_mask=str(lung) if lung else None,
        calibration=calibration,
        best_epoch=state["best_epoch"],
        best_score=state["best"],
        best_val=best,
        epochs_run=int(state["epoch"]),
        n_train=len(tr),
        n_val=len(va),
        n_test=int((both["split"] == "test").sum()),
        n_external=int((both["split"] == "external").sum()),
        n_skipped=len(errors),
        decode_seconds=round(decode_s, 2),
        train_seconds=round(train_s, 2),
        resumed_from=cfg.get("resume"),
        **{k: v for k, v in runs.provenance().items() if k != "source_files"},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        model_sha256=runs.sha256(run / "model.keras"),
        model_bytes=(run / "model.keras").stat().st_size,
        n_params=int(model.count_params()),
        replicas=int(strategy.num_replicas_in_sync),
    )
    runs.write_json(run / "config.json", final_cfg)
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
    """Refit a finished run's calibration on its validation images; rewrite model and predictions.

    The network (up to ``logits``) is unchanged; the fixed ``calibration`` layer is replaced,
    predictions.csv recomputed for its val/test/external rows, config.json updated
    (``calibration``, ``model_sha256``) and metrics.json re-evaluated.
    """
    from core import model as model_lib

    run = runs.resolve_run(run)
    cfg = runs.read_config(run)
    model = runs.load_model(run)
    root = config.data_dir(data or cfg.get("data_root"))
    pred = runs.read_predictions(run)
    size = int(cfg["size"])
    cache_dir = config.runs_dir(runs_root) / ".cache"
    pix, kept, errors = decode_images(root, pred["path"].tolist(), size, cache_dir, progress=False)
    if errors:
        raise ValueError(f"{len(errors)} images of run {run.name} cannot be read under {root}")
    classes = list(cfg["classes"])
    y = np.array([classes.index(c) for c in pred["class"]])
    is_val = (pred["split"] == "val").to_numpy()
    model, params = _calibrate(model, pix[is_val], y[is_val], method)
    probs = model_lib.probabilities(model, pix, batch_size=64)
    for j, c in enumerate(classes):
        pred[f"p_{c}"] = probs[:, j].astype(float)
    runs.write_csv(run / "predictions.csv", pred)
    runs.atomic_save_model(model, run / "model.keras")
    cfg.pop("temperature", None)
    cfg.update(
        calibration=params,
        model_sha256=runs.sha256(run / "model.keras"),
        model_bytes=(run / "model.keras").stat().st_size,
        recalibrated=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    runs.write_json(run / "config.json", cfg)
    if evaluate:
        from core.evaluate import evaluate_run

        evaluate_run(run, progress=False)
    log(f"run {run.name} recalibrated ({params['method']})")
    return run


def _stopped(state: dict, cfg: dict) -> bool:
    """True when a resumed run had already early-stopped."""
    return bool(state["best_epoch"]) and state["epoch"] - state["best_epoch"] >= int(cfg["patience"])


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m core.train",
        description="Train a COVID-19 chest X-ray classifier and write a run folder (model, split, history, "
        "predictions, metrics).",
    )
    p.add_argument("--data", help="data root (default: $CXR_DATA_DIR, else data/)")
    p.add_argument("--runs", help="runs root (default: $CXR_RUNS_DIR, else runs/)")
    p.add_argument("--name", default=DEFAULTS["name"], help="run name (folder suffix)")
    p.add_argument("--task", choices=sorted(config.TASKS), default=DEFAULTS["task"])
    p.add_argument("--preset", choices=["default", "seed"], default=DEFAULTS["preset"])
    p.add_argument("--size", type=int, default=DEFAULTS["size"], help="input side in pixels (default %(default)s)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="maximum epochs (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="Adam learning rate")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="training seed (weights, shuffling, augmentation)")
    p.add_argument("--split-seed", type=int, default=DEFAULTS["split_seed"], help="seed of the patient-level split")
    p.add_argument("--split-file", help="use (or create) this split CSV")
    p.add_argument("--augment", choices=sorted(AUGMENT), default=DEFAULTS["augment"])
    p.add_argument("--hflip", action="store_true", help="also flip horizontally (off: the heart is on the left)")
    p.add_argument(
        "--balance",
        choices=["class", "source", "none"],
        default=DEFAULTS["balance"],
        help="sample weights: equal per class, or per class and source within a class",
    )
    p.add_argument("--monitor", choices=MONITORS, default=DEFAULTS["monitor"], help="early-stopping score")
    p.add_argument("--patience", type=int, default=DEFAULTS["patience"])
    p.add_argument("--holdout-source", help="leave this source out of train/val; report it as 'external'")
    p.add_argument("--limit", type=int, help="at most N images per split and class (quick runs)")
    p.add_argument("--strategy", choices=list(distribute.STRATEGIES),
                   help="tf.distribute strategy: mirrored = local devices; multiworker = several hosts "
                   "(TF_CONFIG on each, see README)")
    p.add_argument("--logical-cpus", type=int, help="split the CPU into N logical devices (to test mirrored)")
    p.add_argument("--crop", type=float, help="default preset: border fraction blanked (default 0.12)")
    p.add_argument(
        "--contrast", choices=["standard", "local"], help="default preset: contrast normalisation (default local)"
    )
    p.add_argument("--width", type=float, help="default preset: channel multiplier")
    p.add_argument("--dropout", type=float, help="default preset: dropout before the head")
    p.add_argument(
        "--lung-mask",
        nargs="?",
        const=str(config.ASSETS_DIR / "lungs" / "lungs.keras"),
        help="gate the image with a frozen lung-segmentation model (default path: assets/lungs/lungs.keras)",
    )
    p.add_argument(
        "--calibrate",
        choices=["platt", "temperature", "none"],
        help="calibration fitted on validation data (default: platt for binary, temperature for multiclass)",
    )
    p.add_argument("--no-calibrate", action="store_true", help="same as --calibrate none")
    p.add_argument(
        "--recalibrate",
        metavar="RUN",
        help="refit the calibration of a finished run on its validation predictions (no training)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not cache decoded pixels under <runs>/.cache")
    p.add_argument("--no-evaluate", action="store_true", help="do not write metrics.json")
    p.add_argument("--resume", metavar="RUN", help="continue a killed run from its last epoch checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object (run, config, metrics) on stdout")
    a = p.parse_args(argv)
    cfg = {k: v for k, v in vars(a).items() if k in DEFAULTS and v is not None}
    cfg.update(
        calibrate="none" if a.no_calibrate else (a.calibrate or True),
        cache=not a.no_cache,
        evaluate=not a.no_evaluate,
        verbose=0 if a.quiet else 1,
    )
    if a.recalibrate:
        run = recalibrate_run(a.recalibrate, a.calibrate or "platt", data=a.data, runs_root=a.runs)
        result = {"run": str(run), "config": runs.read_config(run)}
        if (run / "metrics.json").is_file():
            result["metrics"] = runs.read_metrics(run)
        print(json.dumps(result, default=str) if a.json else run)
        return 0
    kw = {}
    if a.resume:
        kw = {"epochs": a.epochs} if "--epochs" in (argv or sys.argv) else {}
        kw["verbose"] = cfg["verbose"]
        cfg = {"resume": a.resume}
    try:
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
    if a.json:
        print(json.dumps(result, default=str))
    else:
        print(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
