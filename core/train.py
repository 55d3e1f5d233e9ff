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

Class weights (balanced per source within a class by default), a checkpoint every epoch, fixed
seeds (same seed, same numbers on one machine) and ``--strategy mirrored|multiworker``
(tf.distribute, see :mod:`core.distribute`). ``--resume RUN`` continues a killed run exactly: the
finished members' weights, and for the member under way its weights, the optimizer's state and
schedule, the layers' random states (dropout; :func:`rng_states`) and its place in the seeded data
order (the batches already seen are skipped) at its last epoch checkpoint, so the resumed run has the
numbers of an uninterrupted one (``tests/test_hostile_runs.py``); epochs after that checkpoint are
trained again. A full disk stops training with one sentence (:class:`core.runs.DiskFull`), and ``--resume``
goes on from the last checkpoint.

The steps live in modules of their own: :mod:`core.train_data` (split, folds, weights),
:mod:`core.image_cache` (prepared films), :mod:`core.augment`, :mod:`core.adversarial` (the source
head), :mod:`core.calibration` and :mod:`core.ensemble` (out-of-fold logits, the averaged model,
predictions.csv); this module runs them, writes the run folder and holds the CLI.

The run folder (see :mod:`core.runs`) gets model.keras, config.json, split.csv, history.csv
(one row per member and epoch), predictions.csv, env.json and, through
:func:`core.evaluate.evaluate_run`, metrics.json.
"""


from __future__ import annotations

import argparse
import errno
import json
import math
import shutil
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from core import config, distribute, inputs, runs, splits
from core import model as model_lib
from core.adversarial import gradient_reversal, ramp, source_accuracy, source_loss, targets, with_source_head
from core.augment import AUGMENT, make_dataset
from core.calibration import apply_calibration, calibration_params, with_calibration
from core.ensemble import assemble, out_of_fold_logits, predictions_table
from core.evaluate import evaluate_run
from core.image_cache import prepare_images
from core.train_data import load_data, sample_weights

# The recipe: the shipped model's, chosen by the leave-one-source-out ablation (assets/MODEL_CARD.md).
DEFAULTS = dict(
    # where, what and which network
    data=None, runs=None, name="default", task="binary", preset="default", backbone=None, weights="none",
    # how long and how fast
    size=128, epochs=30, batch_size=32, lr=1e-3, seed=config.SEED,
    # the split, the folds and the ensemble
    split_seed=config.SEED, split_file=None, folds=3, members=3,
    # against shortcuts: lung crop, source head, augmentation, weights, held-out sources
    lung_crop=True, adversarial=0.0, augment="default", hflip=False, balance="source", holdout_source=None,
    exclude_sources=None, limit=None, mixup=0.0,
    # CLAHE on every prepared film; None: on with the lung crop (the shipped recipe), off without it
    clahe=None,
    # devices
    strategy=None, logical_cpus=None,
    # the default preset's knobs (None: the preset's own)
    crop=None, contrast=None, width=None, dropout=None, field="local", lung_mask=None,
    # what happens after training
    calibrate=True, cache=True, evaluate=True, verbose=1, resume=None,
)


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- held-out fold scores
def _auc(y: np.ndarray, p: np.ndarray) -> float:
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


# ----------------------------------------------------------------------------- networks
def _setup_tf(seed: int, logical_cpus: int | None):
    if logical_cpus and logical_cpus > 1:
        cpus = tf.config.list_physical_devices("CPU")
        try:
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(logical_cpus)]
            )
        except RuntimeError as exc:  # the runtime is already initialised in this process
            log(f"warning: cannot split the CPU into {logical_cpus} logical devices ({exc})")
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def _model_kwargs(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("crop", "contrast", "width", "dropout", "field") if cfg.get(k) is not None}


def _load_lung_model(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lung model {path} does not exist (train it with python -m core.lungs train)")
    return keras.saving.load_model(path, safe_mode=True, compile=False)


def build_net(cfg: dict, size: int):
    """The inference network of a config (preset or backbone; optional lung gate)."""
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
    net = build_net(cfg, size)
    classes = config.classes(cfg["task"])
    schedule = keras.optimizers.schedules.CosineDecay(float(cfg["lr"]), max(1, steps_total), alpha=0.05)
    adv = float(cfg.get("adversarial") or 0.0)
    if adv > 0 and len(sources) > 1:
        return with_source_head(net, len(classes), sources, schedule), net
    net.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.CategoricalCrossentropy(),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    return net, net


# ----------------------------------------------------------------------------- training one member
def _seed_states(model) -> list:
    # the layers' random-number state variables, in the model's (stable) variable order; their
    # paths are renumbered on loading (seed_generator -> seed_generator_1), so order is the key
    return [v for v in model.variables if "seed_generator" in v.path]


def rng_states(model) -> list[list[int]]:
    """The random-number states of the model's layers (dropout and any random layer), in order.

    A ``.keras`` checkpoint keeps the weights and the optimizer but not these counters (a loaded
    Dropout starts its mask sequence again), so they go into the checkpoint's state.json.
    """
    return [np.asarray(v).tolist() for v in _seed_states(model)]


def restore_rng_states(model, saved: list | None) -> None:
    """Put the states of :func:`rng_states` back into a model loaded from its checkpoint."""
    if saved:
        for v, value in zip(_seed_states(model), saved, strict=True):
            v.assign(np.asarray(value, dtype=v.dtype))


def _epoch_callback(run: Path, ckpt: Path, member: int, fold_table, x_fold, net, sources, state: dict,
                    cfg: dict):
    n_classes = len(config.classes(cfg["task"]))
    adv = float(cfg.get("adversarial") or 0.0)

    class EpochEnd(keras.callbacks.Callback):
        """Held-out fold scores, history.csv, a checkpoint every epoch, the adversarial ramp."""

        def on_epoch_begin(self, epoch, logs=None):
            if self.model is not net:
                self.model.get_layer("grl").lam.assign(ramp(adv, epoch, int(cfg["epochs"])))

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            row = {"member": member, "epoch": epoch + 1}
            row.update({k.replace("probs_", ""): float(v) for k, v in logs.items()})
            if len(fold_table):
                row.update(val_scores(fold_table, model_lib.probabilities(net, x_fold, batch_size=64)))
                if self.model is not net:
                    row["val_source_acc"] = source_accuracy(self.model, x_fold, fold_table, n_classes, sources)
                    row["grl_lambda"] = float(np.asarray(self.model.get_layer("grl").lam))
            state["history"].append(row)
            state["epoch"] = epoch + 1
            state["rng"] = rng_states(self.model)  # what the .keras checkpoint does not keep
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
            gradient_reversal(), source_loss(len(classes), len(sources))  # registered before loading
            model = keras.saving.load_model(ckpt / "last.keras", safe_mode=True)
            restore_rng_states(model, state.get("rng"))
            net = model if not isinstance(model.output, dict) else keras.Model(
                model.input, model.get_layer("probs").output, name="cxr_member")
        else:
            model, net = build_member(cfg, int(cfg["size"]), sources, steps * epochs)
    adversarial = model is not net
    y = targets(tr, len(classes), sources, adversarial)
    w = sample_weights(tr, classes, cfg["balance"])
    ds = distribute.shard(make_dataset(x_dev[~own], y, {"probs": w, "source": w} if adversarial else w, batch,
                                       seed, cfg["augment"], bool(cfg["hflip"]), float(cfg.get("mixup") or 0.0)))
    if state["epoch"]:
        ds = ds.skip(state["epoch"] * steps)
    cb = _epoch_callback(run, ckpt, member, fold, x_dev[own], net, sources, state, cfg)
    if state["epoch"] < epochs:
        model.fit(ds, epochs=epochs, initial_epoch=int(state["epoch"]), steps_per_epoch=steps,
                  callbacks=distribute.callbacks(strategy, model) + [cb], verbose=1 if cfg["verbose"] else 0)
    return net


def fit_members(data: dict, cfg: dict, run: Path, state: dict, strategy) -> list:
    """Every member's inference network: trained (checkpointed under ``run/checkpoint``) or, when
    ``state`` says a resumed run had finished it, loaded from its saved weights."""
    ckpt = run / "checkpoint"
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
    return nets


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


def resolve(cfg: dict) -> dict:
    """``cfg`` with the settings that follow others made explicit: ``clahe`` None follows the lung
    crop (CLAHE is applied to the crop; the whole film gets none), so config.json records what ran."""
    if cfg.get("clahe") is None:
        cfg = {**cfg, "clahe": bool(cfg.get("lung_crop"))}
    return cfg


def _check(cfg: dict) -> None:
    if isinstance(cfg["augment"], str) and cfg["augment"] not in AUGMENT:
        raise ValueError(f"unknown augment {cfg['augment']!r}; choose one of {sorted(AUGMENT)}")
    config.classes(cfg["task"])  # validates the task
    folds, members = int(cfg["folds"]), int(cfg["members"])
    if folds < 2 or not 1 <= members <= folds:
        raise ValueError(f"need folds >= 2 and 1 <= members <= folds (got folds {folds}, members {members})")


def _final_config(cfg: dict, state: dict, data: dict, calibration: dict, model, run: Path, timing: dict) -> dict:
    both = pd.concat([data["dev"], data["rest"]], ignore_index=True)
    keys = ("task", "preset", "backbone", "weights", "size", "seed", "split_seed", "epochs", "batch_size", "lr",
            "folds", "members", "adversarial", "augment", "hflip", "balance", "holdout_source", "exclude_sources",
            "limit", "strategy", "clahe", "mixup",
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
    (``None`` on the non-chief workers of a multi-worker run, which write none). A full disk
    raises :class:`core.runs.DiskFull` (one sentence; files are written atomically, so ``--resume`` goes on)."""
    cfg, state, run = _start(resolve({**DEFAULTS, **(cfg or {}), **kw}), kw)
    where = {"folder": run or config.runs_dir(cfg["runs"])}
    try:
        return _train(cfg, state, run, where)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise runs.DiskFull(runs.disk_full_sentence(where["folder"])) from None


def _train(cfg: dict, state: dict, run: Path | None, where: dict) -> Path | None:
    _check(cfg)
    distribute.check(cfg.get("strategy"), resume=bool(cfg.get("resume")))  # before any work (TF_CONFIG)
    _setup_tf(int(cfg["seed"]), cfg.get("logical_cpus"))
    # before TensorFlow runs anything (the lung crop does): collectives are configured at creation
    strategy = distribute.strategy(cfg.get("strategy"))
    root = config.data_dir(cfg["data"])
    runs_root = distribute.runs_root(config.runs_dir(cfg["runs"]), cfg.get("strategy"))  # chief only
    cfg["data"] = str(root)
    data = load_data(cfg, root, config.cache_dir(runs_root) if cfg.get("cache") else None)
    if run is None:
        run = runs.new_run(runs_root, cfg["name"])
        where["folder"] = run
        (run / "checkpoint").mkdir()
        runs.write_json(run / "checkpoint" / "train_config.json", cfg)
    ckpt = run / "checkpoint"
    splits.save_split(pd.concat([data["dev"], data["rest"][data["rest"]["split"] == "test"]]), run / "split.csv")
    log(f"development {len(data['dev'])} ({dict(data['dev']['class'].value_counts())}) in {cfg['folds']} folds, "
        f"{cfg['members']} member(s); test {int((data['rest']['split'] == 'test').sum())}, "
        f"external {int((data['rest']['split'] == 'external').sum())}")

    t1 = time.time()
    nets = fit_members(data, cfg, run, state, strategy)
    train_s = time.time() - t1

    oof = out_of_fold_logits(nets, data["x_dev"], data["dev"]["fold"].to_numpy())
    model, calibration = assemble(nets, oof, data["dev"], cfg)
    runs.write_csv(run / "predictions.csv", predictions_table(model, oof, calibration, data, config.classes(cfg["task"])))
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
    handle = runs.open_run(run)
    run, cfg = handle.path, handle.config
    model = handle.model()
    root = handle.data_root(data)
    pred = handle.predictions()
    x, _, _, kept, errors = prepare_images(root, pred["path"].tolist(), int(handle.size), handle.lung_crop,
                                           config.cache_dir(runs_root), progress=False)
    if errors:
        raise ValueError(f"{len(errors)} images of run {run.name} cannot be read under {root}")
    classes = list(handle.classes)
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
        evaluate_run(run, progress=False)
    log(f"run {run.name} recalibrated ({params['method']})")
    return run


# ----------------------------------------------------------------------------- CLI
def _lever_arguments(p: argparse.ArgumentParser) -> None:
    """The two cheap levers screened for issue 19 (the model card's ablation): CLAHE won and is on
    with the lung crop (the shipped recipe); mixup lost and is off."""
    p.add_argument("--clahe", action=argparse.BooleanOptionalAction, default=None,
                   help="CLAHE (clip 2, 8x8 tiles) on every prepared lung crop, in training, prediction and the "
                   "dashboard alike (default: on with the lung crop, off with --no-lung-crop)")
    p.add_argument("--mixup", type=float, help="mixup of pairs of training films, Beta(a, a) (0 = off, default)")


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
    _lever_arguments(p)
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
    handle = runs.open_run(run)
    result = {"run": str(run), "config": handle.config}
    if handle.has("metrics.json"):
        result["metrics"] = handle.metrics()
    print(json.dumps(result, default=str) if a.json else run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
