"""core.adopt: every model kind it loads, the refusal of code, the run it writes, kill and resume.

Models are built small here; films are synthetic PNGs under a ``manifest.csv`` data root.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
import pytest
from keras import layers

from core import adopt, case, evaluate, predict, runs
from core import adopt_load as al
from core import model as model_lib

REPO = Path(__file__).resolve().parent.parent
SIZE = 32
LABELS = ("covid", "normal", "pneumonia")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))


def _films(root: Path, n: int = 24, side: int = 40) -> Path:
    """``n`` synthetic films (noise with a bright disc on covid ones), two per patient, and a bad file."""
    rng = np.random.RandomState(0)
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        img = rng.uniform(0, 200, (side + i % 3, side)).astype(np.uint8)
        if LABELS[i % 3] == "covid":
            cv2.circle(img, (side // 2, side // 2), side // 4, 255, -1)
        cv2.imwrite(str(root / "img" / f"f{i:03d}.png"), img)
        rows.append({"path": f"img/f{i:03d}.png", "label": LABELS[i % 3], "patient_id": f"p{i // 2}", "source": "syn"})
    (root / "img" / "zz_bad.png").write_bytes(b"not an image")
    rows.append({"path": "img/zz_bad.png", "label": "covid", "patient_id": "p99", "source": "syn"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


@pytest.fixture
def data(tmp_path) -> Path:
    return _films(tmp_path / "data")


def _trunk(x, name="conv"):
    x = layers.Conv2D(4, 3, activation="relu", name=name)(x)
    return layers.GlobalAveragePooling2D(name="pool")(x)


# Each kind: (builder, save format, preprocess, CLI-like options, (source output column)).
def _functional_softmax3():
    i = keras.Input((SIZE, SIZE, 3))
    return keras.Model(i, layers.Dense(3, activation="softmax", name="head")(_trunk(i)))


def _sequential_sigmoid():
    return keras.Sequential([keras.Input((SIZE, SIZE, 1)), layers.Conv2D(4, 3, name="conv"),
                             layers.GlobalAveragePooling2D(), layers.Dense(1, activation="sigmoid", name="head")])


def _nested_backbone():
    bi = keras.Input((SIZE, SIZE, 3))
    b = layers.Conv2D(4, 3, activation="relu", name="bb_conv")(bi)
    backbone = keras.Model(bi, layers.Conv2D(6, 3, activation="relu", name="bb_last")(b), name="backbone")
    i = keras.Input((SIZE, SIZE, 3))
    x = layers.GlobalAveragePooling2D(name="gap_src")(backbone(i))
    return keras.Model(i, layers.Dense(2, activation="softmax", name="head")(x))


def _multi_sigmoid():
    i = keras.Input((None, None, 1))
    z = layers.Dense(5, name="z")(_trunk(i))
    return keras.Model(i, layers.Activation("sigmoid", name="findings")(z))


def _two_outputs():
    i = keras.Input((SIZE, SIZE, 1))
    f = _trunk(i)
    return keras.Model(i, [layers.Dense(3, activation="softmax", name="kind")(f),
                           layers.Dense(1, activation="sigmoid", name="covid_out")(f)])


KINDS = {
    # name: (builder, suffix, preprocess, options, output picked, unit of that output)
    "functional_softmax3_keras": (_functional_softmax3, ".keras", "torch", {"classes": ["normal", "covid", "pneu"]},
                                  0, 1),
    "sequential_sigmoid_h5": (_sequential_sigmoid, ".h5", "grey01", {}, 0, 0),
    "nested_backbone_keras": (_nested_backbone, ".keras", "caffe", {"classes": ["covid", "other"]}, 0, 0),
    "multi_sigmoid_by_index": (_multi_sigmoid, ".keras", "grey_std", {"output_index": 3, "size": SIZE}, 0, 3),
    "multi_sigmoid_by_name": (_multi_sigmoid, ".h5", "grey01",
                              {"classes": ["a", "b", "covid", "d", "e"], "output": "covid", "size": SIZE}, 0, 2),
    "two_outputs_by_name": (_two_outputs, ".keras", "rgb255", {"output": "covid_out"}, 1, 0),
    "savedmodel_softmax3": (_functional_softmax3, "", "torch", {"classes": ["normal", "covid", "pneu"]}, 0, 1),
    "savedmodel_sigmoid": (_sequential_sigmoid, "", "grey01", {}, 0, 0),
}


def _preprocessed(x_raw: np.ndarray, spec: dict, channels: int) -> np.ndarray:
    """The preprocessing written in numpy, to feed the source model directly."""
    x = np.repeat(x_raw, channels, axis=-1) * spec.get("scale", 1.0) + spec.get("offset", 0.0)
    if spec.get("per_image"):
        x = (x - x.mean(axis=(1, 2, 3), keepdims=True)) / np.sqrt(x.var(axis=(1, 2, 3), keepdims=True) + 1e-6)
    if spec.get("mean") is not None:
        x = (x - np.asarray(spec["mean"])) / np.asarray(spec["std"])
    return x.astype(np.float32)


def _save(model, path: Path) -> Path:
    if path.suffix:
        model.save(path)
    else:
        model.export(path, verbose=False)
    return path


def _source_p(model, x, output_pos: int, unit: int) -> np.ndarray:
    out = model.predict(x, verbose=0)
    out = out[output_pos] if isinstance(out, list) else out
    return np.asarray(out)[:, unit]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_model_kind_gives_the_source_models_probability(kind, tmp_path):
    builder, suffix, pre, opts, out_pos, unit = KINDS[kind]
    src = builder()
    path = _save(src, tmp_path / f"m{suffix}")
    spec = al.preprocess_spec(pre)
    wrapper, info, fmt, _ = adopt.build_model(path, spec, opts.get("size"), opts.get("classes"), opts.get("output"),
                                             opts.get("output_index"))
    assert fmt == {".keras": "keras", ".h5": "h5", "": "savedmodel"}[suffix]
    assert wrapper.input_shape == (None, SIZE, SIZE, 1)
    assert wrapper.layers[-1].name == "probs"
    x_raw = np.random.RandomState(1).uniform(0, 255, (3, SIZE, SIZE, 1)).astype(np.float32)
    channels = int(src.inputs[0].shape[-1])
    want = _source_p(src, _preprocessed(x_raw, spec, channels), out_pos, unit)
    classes, positive = adopt.class_names(info, opts.get("classes"), ["covid"])
    got = model_lib.probabilities(wrapper, x_raw[..., 0])
    np.testing.assert_allclose(got[:, classes.index(positive)], want, atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    if fmt != "savedmodel":
        assert "adopted" in [la.name for la in wrapper.layers] and info["logits"]
        saved = runs.atomic_save_model(wrapper, tmp_path / "wrapped.keras")
        again = keras.saving.load_model(saved, safe_mode=True, compile=False)  # standard layers only
        np.testing.assert_allclose(model_lib.probabilities(again, x_raw[..., 0]), got, atol=1e-6)
        assert model_lib.features(again, x_raw[..., 0]).shape[0] == 3


def _lambda_model():
    i = keras.Input((SIZE, SIZE, 1))
    x = layers.Lambda(lambda t: t * 2.0, name="double")(i)
    return keras.Model(i, layers.Dense(1, activation="sigmoid", name="head")(_trunk(x)))


@keras.saving.register_keras_serializable(package="test_adopt")
class Scale(layers.Layer):
    """A custom layer (code a model file can carry)."""

    def call(self, x):
        return x * 0.5


def _custom_model():
    i = keras.Input((SIZE, SIZE, 1))
    return keras.Model(i, layers.Dense(1, activation="sigmoid", name="head")(_trunk(Scale(name="halve")(i))))


@pytest.mark.parametrize("builder,named", [(_lambda_model, r"double \(Lambda\)"),
                                           (_custom_model, r"halve \((test_adopt>)?Scale\)")])
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_code_is_refused_by_name_unless_trusted(builder, named, suffix, tmp_path):
    path = _save(builder(), tmp_path / f"m{suffix}")
    with pytest.raises(al.AdoptError) as err:
        adopt.build_model(path, al.preprocess_spec("grey01"))
    assert re.search(named, str(err.value)) and "--trust-code" in str(err.value)
    wrapper, info, _, found = adopt.build_model(path, al.preprocess_spec("grey01"), trust_code=True)
    assert re.search(named, " ".join(found["lambda"] + found["custom"]))
    assert wrapper(np.zeros((1, SIZE, SIZE, 1), np.float32)).shape == (1, 2)


def _adopt(model_path, data, out, *extra) -> int:
    return adopt.main([str(model_path), "--data", str(data), "--out", str(out), "--n-boot", "30",
                       "--batch-size", "4", "--chunk", "8", "--json", *extra])


def test_adopted_run_opens_everywhere(data, tmp_path, capsys):
    src = _functional_softmax3()
    path = _save(src, tmp_path / "m.keras")
    out = tmp_path / "run"
    assert _adopt(path, data, out, "--preprocess", "torch", "--classes", "normal,covid,pneu") == 0
    run = runs.open_run(out)
    assert run.adopted["format"] == "keras" and not run.blackbox and not run.training_data_known
    assert run.classes == ("normal", "covid", "pneu") and run.positive == "covid" and run.size == SIZE
    assert run.threshold == 0.5 and "no development data" in run.threshold_source
    pred = run.predictions()
    assert set(pred["split"]) == {"external"} and len(pred) == 24  # the bad file is reported, not scored
    assert {"path", "label", "source", "patient_id", "group", "p_normal", "p_covid", "p_pneu"} <= set(pred.columns)
    assert evaluate.main(["--run", str(out), "--n-boot", "30", "--no-write"]) == 0
    assert "Threshold 0.5000: 0.5: an adopted model" in capsys.readouterr().out
    m = evaluate.evaluate_run(run, n_boot=30, write=False)
    assert m["mode"] == "adopted" and m["n_test"] == 24 and "ci_low" in m["roc_auc"]
    assert "trained on are unknown" in m["warnings"][0]
    film = data / pred["path"][0]
    c = case.analyse(run, film)
    x = c.x[None, ..., None]
    want = src.predict(_preprocessed(x, al.preprocess_spec("torch"), 3), verbose=0)[0]
    np.testing.assert_allclose(c.probs, want, atol=1e-5)
    row = pred[pred["path"] == pred["path"][0]].iloc[0]
    assert abs(row["p_covid"] - c.p_positive) < 1e-5
    assert c.features.shape == (1, 4)
    got, _ = predict.predict_paths(run.model(), [film], run.size, run.classes)
    assert abs(got["p_covid"][0] - c.p_positive) < 1e-5


def test_trained_on_leaves_out_its_films_and_patients(data, tmp_path):
    path = _save(_sequential_sigmoid(), tmp_path / "m.h5")
    manifest = tmp_path / "trained.csv"
    pd.DataFrame({"path": ["img/f000.png", str(data / "img" / "f005.png")]}).to_csv(manifest, index=False)
    history = tmp_path / "log.csv"
    history.write_text("epoch,accuracy,loss,val_accuracy,val_loss\n0,0.5,0.9,0.5,1.0\n1,0.7,0.6,0.6,0.8\n")
    out = tmp_path / "run"
    assert _adopt(path, data, out, "--trained-on", str(manifest), "--threshold", "0.3", "--history", str(history)) == 0
    run = runs.open_run(out)
    assert set(runs.history_curves(run.history())["chart"]) == {"Loss", "Accuracy"}
    assert run.training_data_known and run.threshold == 0.3 and "--threshold" in run.threshold_source
    pred = run.predictions()
    assert set(pred["split"]) == {"test"}
    # f000/f001 are patient p0, f004/f005 patient p2: all four are left out
    assert not {"img/f000.png", "img/f001.png", "img/f004.png", "img/f005.png"} & set(pred["path"])
    assert len(pred) == 20 and list(run.split()["split"].unique()) == ["train"]
    ex = pd.read_json(out / "adopt.json", typ="series")["excluded"]
    assert ex == {"listed in the run's split.csv": 2, "patient seen by the run": 2}


def test_shards_then_resume_equal_one_uninterrupted_run(data, tmp_path):
    path = _save(_nested_backbone(), tmp_path / "m.keras")
    opts = ("--preprocess", "caffe", "--classes", "covid,other")
    assert _adopt(path, data, tmp_path / "whole", *opts) == 0
    part = tmp_path / "parts"
    assert _adopt(path, data, part, *opts, "--shard", "2/3") == 0
    assert not (part / "predictions.csv").exists()  # parts 1 and 3 are missing
    assert _adopt(path, data, part, *opts, "--shard", "1/3") == 0
    assert _adopt(path, data, part, *opts, "--resume") == 0  # finishes part 3
    assert (part / "predictions.csv").read_bytes() == (tmp_path / "whole" / "predictions.csv").read_bytes()
    assert _adopt(path, data, part, *opts) == 2  # an existing adoption is never overwritten


def _slow_model():
    i = keras.Input((256, 256, 1))
    x = i
    for k in range(4):
        x = layers.Conv2D(32, 3, padding="same", activation="relu", name=f"c{k}")(x)
    return keras.Model(i, layers.Dense(1, activation="sigmoid", name="head")(layers.GlobalAveragePooling2D()(x)))


@pytest.mark.slow  # three adoptions in child processes (~50 s on 2 busy cores)
def test_kill_and_resume_gives_the_uninterrupted_predictions(tmp_path):
    data = _films(tmp_path / "data", n=40, side=64)
    path = _save(_slow_model(), tmp_path / "m.keras")
    args = [sys.executable, "-m", "core.adopt", str(path), "--data", str(data), "--n-boot", "20",
            "--batch-size", "2", "--chunk", "2", "--workers", "1", "--json"]
    env = {**os.environ, "CXR_CACHE_DIR": str(tmp_path / "cache")}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(killed)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = killed / adopt.CHUNKS / "chunk-000002.csv"
    t0 = time.time()
    while not first.exists() and proc.poll() is None and time.time() - t0 < 240:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (killed / "predictions.csv").exists(), "the adoption was not stopped midway"
    done = len(list((killed / adopt.CHUNKS).glob("chunk-*.csv")))
    assert 0 < done < 21
    subprocess.run([*args, "--out", str(killed), "--resume"], cwd=REPO, env=env, check=True, capture_output=True)
    whole = tmp_path / "whole"
    subprocess.run([*args, "--out", str(whole)], cwd=REPO, env=env, check=True, capture_output=True)
    assert (killed / "predictions.csv").read_bytes() == (whole / "predictions.csv").read_bytes()
    assert len(pd.read_csv(whole / "predictions.csv")) == 40


def test_preprocess_spec_file_and_errors(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text('{"scale": 0.5, "offset": -1, "mean": 0.2, "std": 2}')
    got = al.preprocess_spec(str(spec))
    assert got["scale"] == 0.5 and got["name"] == "spec.json"
    bad = tmp_path / "bad.json"
    bad.write_text('{"gamma": 2}')
    with pytest.raises(al.AdoptError, match="gamma"):
        al.preprocess_spec(str(bad))
    with pytest.raises(al.AdoptError, match="grey01"):
        al.preprocess_spec("imagenet")
    with pytest.raises(al.AdoptError, match="--classes"):
        adopt.class_names({"activation": "softmax", "n_units": 3, "output": "head"}, None, ["covid"])
    with pytest.raises(al.AdoptError, match="--size"):
        al.wrap(_multi_sigmoid(), al.preprocess_spec("grey01"), unit=0)


def test_savedmodel_run_is_a_black_box_that_still_predicts(data, tmp_path):
    src = _sequential_sigmoid()
    path = _save(src, tmp_path / "sm")
    out = tmp_path / "run"
    assert _adopt(path, data, out, "--preprocess", "grey01") == 0
    run = runs.open_run(out)
    assert run.blackbox and run.adopted["format"] == "savedmodel" and not run.has("model.keras")
    assert run.has("model_savedmodel/saved_model.pb") and run.classes == ("covid", "other")
    pred = run.predictions()
    c = case.analyse(run, data / pred["path"][3])
    want = src.predict(c.x[None, ..., None] / 255.0, verbose=0)[0, 0]
    assert abs(c.p_positive - want) < 1e-5 and abs(pred["p_covid"][3] - want) < 1e-5


def test_trusted_code_run_loads_its_model(data, tmp_path, monkeypatch):
    monkeypatch.delenv("CXR_TRUST_CODE", raising=False)  # adopt --trust-code sets it in-process; undone after
    path = _save(_lambda_model(), tmp_path / "m.keras")
    assert _adopt(path, data, tmp_path / "refused") == 2
    assert not (tmp_path / "refused" / "config.json").exists()  # refused before the run folder is written
    out = tmp_path / "run"
    assert _adopt(path, data, out, "--trust-code") == 0
    run = runs.open_run(out)
    assert run.adopted["trust_code"] and run.adopted["found_code"]["lambda"] == ["double (Lambda)"]
    # the run folder's own config never switches safe mode off: the person opening it must
    monkeypatch.delenv("CXR_TRUST_CODE", raising=False)
    with pytest.raises(runs.RunError, match="CXR_TRUST_CODE=1"):
        runs.load_model(out)
    monkeypatch.setenv("CXR_TRUST_CODE", "1")
    got = model_lib.probabilities(run.model(), np.full((1, SIZE, SIZE), 100.0, np.float32))
    assert got.shape == (1, 2)


def test_an_unlabelled_archive_is_scored_without_metrics(tmp_path, capsys):
    archive = tmp_path / "archive" / "2024"
    archive.mkdir(parents=True)
    for i in range(6):
        cv2.imwrite(str(archive / f"film{i}.png"), np.full((40, 40), 20 * i, np.uint8))
    path = _save(_sequential_sigmoid(), tmp_path / "m.keras")
    out = tmp_path / "run"
    assert adopt.main([str(path), "--data", str(tmp_path / "archive"), "--out", str(out), "--chunk", "4",
                       "--batch-size", "2"]) == 0
    assert "6 films scored" in capsys.readouterr().out
    run = runs.open_run(out)
    pred = run.predictions()
    assert len(pred) == 6 and set(pred["label"]) == {"unknown"} and run.threshold == 0.5
    assert run.metrics()["n_test"] == 0 and any("nothing to measure" in w for w in run.metrics()["warnings"])


@pytest.mark.parametrize("page,says", [
    ("training", ["No history was given", "Training data unknown"]),
    ("evaluation", ["No leave-one-source-out table for an adopted run, because"]),
    ("errors", []),
])
def test_pages_on_an_adopted_run_say_what_it_lacks(page, says, data, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest  # lazy: only the page tests need Streamlit's test harness

    path = _save(_functional_softmax3(), tmp_path / "m.keras")
    out = tmp_path / "runs" / "20990101-000000-adopted"
    assert _adopt(path, data, out, "--preprocess", "torch", "--classes", "normal,covid,pneu") == 0
    monkeypatch.setenv("CXR_DATA_DIR", str(data))
    monkeypatch.setenv("CXR_RUNS_DIR", str(out.parent))
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=120)
    at.session_state["run"] = str(out)
    at.run()
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    shown = "\n".join(str(e.value) for kind in ("info", "warning", "error", "caption", "markdown")
                      for e in getattr(at, kind))
    for text in says:
        assert text in shown, shown
