"""core.train: the training loop on a small real subset, artifacts, determinism, resume, mirrored."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core import calibration, config, runs, train, train_data
from core.augment import AUGMENT, augment_fn

REPO = config.REPO_ROOT
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}


# ----------------------------------------------------------------------------- pure helpers
def test_class_weights_balance_classes():
    t = pd.DataFrame({"class": ["covid"] * 10 + ["other"] * 30, "source": ["a"] * 40})
    w = train_data.sample_weights(t, ("covid", "other"), "class")
    assert w.mean() == pytest.approx(1.0)
    assert w[:10].sum() == pytest.approx(w[10:].sum())


def test_source_weights_balance_sources_within_a_class():
    t = pd.DataFrame(
        {
            "class": ["covid"] * 30 + ["other"] * 5 + ["other"] * 20 + ["other"] * 15,
            "source": ["ieee"] * 30 + ["ieee"] * 5 + ["kermany"] * 20 + ["nih"] * 15,
        }
    )
    w = train_data.sample_weights(t, ("covid", "other"), "source")
    assert w.mean() == pytest.approx(1.0)
    covid, ieee_o, ker, nih = w[:30].sum(), w[30:35].sum(), w[35:55].sum(), w[55:].sum()
    assert covid == pytest.approx(ieee_o + ker + nih)
    assert ieee_o == pytest.approx(ker) and ker == pytest.approx(nih)
    with pytest.raises(ValueError, match="unknown balance"):
        train_data.sample_weights(t, ("covid", "other"), "patient")


def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 2))
    z = logits / 2.0
    p1 = np.exp(z[:, 1]) / np.exp(z).sum(1)
    y = (rng.random(4000) < p1).astype(int)
    assert calibration.fit_temperature(logits, y) == pytest.approx(2.0, rel=0.15)


def test_subset_caps_each_cell():
    t = pd.DataFrame(
        {"split": ["train"] * 20 + ["val"] * 4, "source": ["a"] * 24, "label": ["covid", "normal"] * 12}
    )
    s = train_data.subset(t, 3, seed=0)
    assert s.groupby(["split", "label"]).size().tolist() == [3, 3, 2, 2]
    assert train_data.subset(t, None, 0) is t


def _batch(augment, hflip=False, step=0, seed=1):
    import tensorflow as tf

    size = 32
    x = np.zeros((8, size, size, 1), np.float32)
    x[:, 8:24, 2:12] = 200.0  # bright blob on the left only
    x[:, 8:24, 12:30] = 60.0
    fn = augment_fn(AUGMENT[augment] if isinstance(augment, str) else augment, size, hflip, seed)
    out, _, _ = fn(tf.constant(step), tf.constant(x), tf.zeros((8, 2)), tf.ones(8))
    return x, out.numpy()


def test_augmentation_none_is_identity_and_default_is_seeded():
    x, out = _batch("none")
    np.testing.assert_allclose(out, x, atol=1e-3)
    _, a = _batch("default", step=3)
    _, b = _batch("default", step=3)
    _, c = _batch("default", step=4)
    np.testing.assert_array_equal(a, b)  # same seed and step: same batch
    assert not np.allclose(a, c)
    assert not np.allclose(a, x)
    assert a.min() >= 0.0 and a.max() <= 255.0


def test_no_horizontal_flip_by_default():
    """The heart is on the left: default augmentation keeps the left/right layout."""
    geo = dict(AUGMENT["none"], rot=10.0, scale=(0.8, 1.0), shift=0.05)
    for step in range(5):
        _, out = _batch(geo, step=step)
        assert (out[:, :, :16].mean(axis=(1, 2, 3)) > out[:, :, 16:].mean(axis=(1, 2, 3))).all()
    flipped = 0
    for step in range(5):
        _, out = _batch(geo, hflip=True, step=step)
        flipped += int((out[:, :, :16].mean(axis=(1, 2, 3)) < out[:, :, 16:].mean(axis=(1, 2, 3))).sum())
    assert flipped > 0


def _standardise(x):
    """What the model's first layer does to every image: zero mean, unit variance."""
    x = x.reshape(len(x), -1).astype(np.float64)
    return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)


@pytest.mark.parametrize("knob", [k for k, v in AUGMENT["default"].items() if v != AUGMENT["none"][k]])
def test_every_augmentation_survives_the_in_model_standardisation(knob):
    """A knob whose effect per-image standardisation removes exactly (a linear brightness or
    contrast change) teaches the network nothing; every knob of the default augmentation must
    change the standardised image."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(120, 40, (16, 32, 32, 1)), 0, 255).astype(np.float32)
    x[:, 8:20, 6:14] += 60.0
    x = np.clip(x, 0, 255)
    params = dict(AUGMENT["none"], **{knob: AUGMENT["strong"][knob]})
    if knob == "jpeg":
        params[knob] = 1.0  # every image re-encoded
    if knob in ("cutout", "lowres"):
        params[knob] = 1.0
    fn = augment_fn(params, 32, False, seed=3)
    out, _, _ = fn(tf.constant(1), tf.constant(x), tf.zeros((16, 2)), tf.ones(16))
    change = np.abs(_standardise(out.numpy()) - _standardise(x)).mean(axis=1)
    assert (change > 0.02).mean() >= 0.5, f"{knob}: standardised images barely change ({np.round(change, 3)})"


def test_a_linear_brightness_change_is_undone_by_standardisation():
    """Why brightness/contrast jitter was removed: the standardised image is the same."""
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 200, (4, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_standardise(1.3 * x + 20.0), _standardise(x), atol=1e-6)


def test_cli_help():
    out = subprocess.run(
        [sys.executable, "-m", "core.train", "--help"], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120
    )
    assert out.returncode == 0
    for opt in ("--resume", "--strategy", "--holdout-source", "--lung-mask", "--task", "--preset", "--seed"):
        assert opt in out.stdout


# ----------------------------------------------------------------------------- a real tiny run
def test_run_folder_is_complete(tiny_run, cxr_root):
    for name in ("model.keras", "config.json", "split.csv", "history.csv", "predictions.csv", "env.json"):
        assert (tiny_run / name).is_file(), name
    assert not (tiny_run / "checkpoint").exists()
    assert not [p for p in tiny_run.iterdir() if p.name.startswith(".")]  # no temporary files left
    cfg = runs.read_config(tiny_run)
    for key in (
        "task", "classes", "preset", "size", "seed", "data_root", "epochs", "batch_size", "lr", "augment",
        "holdout_source", "git_commit", "created", "model_sha256",
    ):
        assert key in cfg, key
    assert cfg["model_sha256"] == runs.sha256(tiny_run / "model.keras")
    assert cfg["size"] == 64 and cfg["name"] == "tiny"
    pred = runs.read_predictions(tiny_run)
    assert list(pred.columns[:8]) == ["path", "source", "patient_id", "label", "class", "split", "p_covid", "p_other"]
    assert set(pred["split"]) == {"val", "test"}
    # val rows are out-of-fold: each predicted by the member that left its fold out
    val = pred[pred["split"] == "val"]
    assert set(val["fold"].astype(int)) == set(range(cfg["members"]))
    assert len(val) == cfg["n_val"] and cfg["n_train"] >= len(val)
    np.testing.assert_allclose(pred["p_covid"] + pred["p_other"], 1.0, atol=1e-5)
    assert (pred.loc[pred["label"] == "covid", "class"] == "covid").all()
    assert (pred.loc[pred["label"] != "covid", "class"] == "other").all()
    for p in pred["path"]:
        assert not Path(p).is_absolute() and (cxr_root / p).is_file()
    split = runs.read_split(tiny_run)
    # patient-level: no patient in two splits
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    hist = runs.read_history(tiny_run)
    for member, h in hist.groupby("member"):
        assert h["epoch"].tolist() == list(range(1, cfg["epochs"] + 1)), member
    assert sorted(set(hist["member"])) == list(range(cfg["members"]))
    assert {"loss", "val_auc", "val_ws_auc", "val_loss"} <= set(hist.columns)
    env = runs.read_env(tiny_run)
    assert env["packages"]["keras"] and "git_commit" in env
    model = runs.load_model(tiny_run)
    assert model.get_layer("probs") is not None


def test_recalibrate_refits_on_the_out_of_fold_logits(tiny_run, cxr_root, tmp_path):
    """``--recalibrate`` scores each ``val`` row again by the member that left its fold out: with
    the run's own method it gives back the run's calibration and predictions; with another it
    rewrites model.keras, predictions.csv and config.json so that they agree with each other."""
    from core import inputs
    from core import model as model_lib

    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run)
    cfg0, pred0 = runs.read_config(run), runs.read_predictions(run)
    method = cfg0["calibration"]["method"]
    assert method == "platt"
    train.recalibrate_run(run, method, data=str(cxr_root), runs_root=str(tmp_path), evaluate=False)
    cfg1, pred1 = runs.read_config(run), runs.read_predictions(run)
    for key in ("a", "b"):
        assert cfg1["calibration"][key] == pytest.approx(cfg0["calibration"][key], abs=1e-6), key
    np.testing.assert_allclose(pred1["p_covid"], pred0["p_covid"], atol=1e-5)

    train.recalibrate_run(run, "temperature", data=str(cxr_root), runs_root=str(tmp_path), evaluate=False)
    cfg2, pred2 = runs.read_config(run), runs.read_predictions(run)
    assert cfg2["calibration"]["method"] == "temperature" and cfg2["model_sha256"] == runs.sha256(run / "model.keras")
    assert not np.allclose(pred2["p_covid"], pred0["p_covid"], atol=1e-3)  # the refit changed something
    # the rewritten model says what the rewritten predictions.csv says on its test rows
    test = pred2[pred2["split"] == "test"].head(6)
    model = runs.load_model(run)
    x = np.stack([inputs.load(cxr_root / rel, model_lib.input_size(model), inputs.settings(cfg2))[0]
                  for rel in test["path"]])
    np.testing.assert_allclose(model_lib.probabilities(model, x)[:, 0], test["p_covid"], atol=1e-4)
    # val rows: the same out-of-fold logits through the new map. Platt gave logit(p) = a d + b and
    # temperature gives d / T, for d the members' logit difference (covid - other).
    val0, val2 = pred0[pred0["split"] == "val"], pred2[pred2["split"] == "val"]
    c0, c2 = cfg0["calibration"], cfg2["calibration"]
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    d = (logit(val0["p_covid"].to_numpy()) - c0["b"]) / c0["a"]
    np.testing.assert_allclose(logit(val2["p_covid"].to_numpy()), d / c2["temperature"], atol=1e-3)


@pytest.mark.slow
def test_same_seed_same_metrics(tiny_run, cxr_root, tmp_path):
    """Trains the tiny run a second time (15-30 s): slow."""
    cfg = runs.read_config(tiny_run)
    same = {k: cfg[k] for k in ("task", "size", "limit", "epochs", "batch_size", "seed", "folds", "members", "name")}
    again = train.train(data=str(cxr_root), runs=str(tmp_path), verbose=0, evaluate=False, **same)
    a, b = runs.read_predictions(tiny_run), runs.read_predictions(again)
    assert a["path"].tolist() == b["path"].tolist()
    np.testing.assert_allclose(a["p_covid"], b["p_covid"], atol=1e-6)
    pd.testing.assert_frame_equal(runs.read_history(tiny_run), runs.read_history(again), atol=1e-6)


@pytest.mark.slow
def test_holdout_source_and_lung_mask(cxr_root, tmp_path):
    import keras

    # a small U-Net-like lung model with random weights (a real Keras model, not a mock)
    inp = keras.Input((64, 64, 1))
    d1 = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(keras.layers.Rescaling(1 / 255.0)(inp))
    d2 = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(keras.layers.MaxPooling2D()(d1))
    x = keras.layers.Concatenate()([keras.layers.UpSampling2D()(d2), d1])
    out = keras.layers.Conv2D(1, 1, activation="sigmoid")(x)
    lung_path = tmp_path / "lungs.keras"
    keras.Model(inp, out).save(lung_path)
    run = train.train(
        data=str(cxr_root),
        runs=str(tmp_path / "runs"),
        verbose=0,
        size=64,
        limit=3,
        epochs=1,
        batch_size=16,
        holdout_source="nih",
        lung_mask=str(lung_path),
        name="holdout",
        folds=2,
        members=1,
    )
    pred = runs.read_predictions(run)
    ext = pred[pred["split"] == "external"]
    assert len(ext) and (ext["source"] == "nih").all()
    assert "nih" not in set(pred.loc[pred["split"] != "external", "source"])
    assert "nih" not in set(runs.read_split(run)["source"])
    cfg = runs.read_config(run)
    assert cfg["holdout_source"] == "nih" and cfg["lung_mask"] == str(lung_path)
    model = runs.load_model(run)  # safe_mode load of the gated model
    assert "lung_gate" in [layer.name for layer in model.layers]
    assert cfg["lung_crop"] is not None  # the gate works on the lung-cropped film too
    with pytest.raises(ValueError, match="holdout source"):
        train.train(data=str(cxr_root), runs=str(tmp_path / "runs"), holdout_source="mars", verbose=0, limit=2)


@pytest.mark.slow
def test_resume_after_a_killed_run(cxr_root, tmp_path):
    """Killed while the second member trains: the first member is kept, the second continues."""
    cmd = [
        sys.executable, "-m", "core.train", "--data", str(cxr_root), "--runs", str(tmp_path), "--size", "64",
        "--limit", "3", "--epochs", "4", "--batch-size", "16", "--folds", "2", "--members", "2", "--name", "killed",
        "--quiet", "--no-evaluate",
    ]
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = None
    deadline = time.time() + 900  # generous: CI machines may be shared
    try:
        while time.time() < deadline:
            found = list(tmp_path.glob("*-killed/checkpoint/state.json"))
            if found:
                try:
                    state = json.loads(found[0].read_text())
                except json.JSONDecodeError:
                    state = None
                if state and state["member"] == 1 and state["epoch"] >= 2:
                    break
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert state and state["member"] == 1 and 2 <= state["epoch"] < 4, "the run should be killed mid-way"
    assert state["done"] == [0]
    run = next(tmp_path.glob("*-killed"))
    assert not (run / "model.keras").exists()
    before = runs.read_history(run)
    resumed = train.train(resume=str(run), verbose=0, evaluate=False)
    assert resumed == run
    hist = runs.read_history(run)
    assert hist[["member", "epoch"]].values.tolist() == [[m, e] for m in (0, 1) for e in (1, 2, 3, 4)]
    pd.testing.assert_frame_equal(hist.iloc[: len(before)], before)  # history kept
    cfg = runs.read_config(run)
    assert cfg["resumed_from"] == str(run) and cfg["epochs_run"] == 4
    assert not (run / "checkpoint").exists()
    assert len(runs.read_predictions(run).query("split == 'val'")) == cfg["n_val"]


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(cxr_root, tmp_path):
    cmd = [
        sys.executable, "-m", "core.train", "--data", str(cxr_root), "--runs", str(tmp_path), "--size", "64",
        "--limit", "3", "--epochs", "1", "--batch-size", "16", "--strategy", "mirrored", "--logical-cpus", "2",
        "--quiet", "--no-evaluate", "--json",
    ]
    out = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["config"]["strategy"] == "mirrored"
    assert result["config"]["replicas"] == 2
    assert (Path(result["run"]) / "model.keras").is_file()
