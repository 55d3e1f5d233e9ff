"""Explanations: a model trained on synthetic images whose class is a bright blob must have maps
that point at the blob; both engines agree; the model is never modified; pictures and CLI work."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest

from core import explain as E

SIZE = 64
BLOB_R = 6
BLOB_CLASS = 1  # class 1: a bright blob somewhere; class 0: noise only


def _blob_images(n: int, rng: np.random.Generator):
    """Noise images; half get a bright Gaussian blob at a random position. Returns x, y, centres."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    x = np.clip(rng.normal(90.0, 25.0, (n, SIZE, SIZE)), 0, 255).astype(np.float32)
    y = np.zeros(n, np.int64)
    centres = np.full((n, 2), -1, np.int64)
    for i in range(n):
        if i % 2 == 0:
            cy, cx = rng.integers(BLOB_R + 2, SIZE - BLOB_R - 2, size=2)
            blob = 140.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (BLOB_R / 1.5) ** 2))
            x[i] = np.clip(x[i] + blob, 0, 255)
            y[i], centres[i] = BLOB_CLASS, (cy, cx)
    return x, y, centres


def _small_cnn(size: int = SIZE) -> keras.Model:
    """A Functional CNN with the project's layer names (last_conv, logits, probs)."""
    inp = keras.Input((size, size, 1), name="image")
    x = keras.layers.Rescaling(1.0 / 64, offset=-1.5, name="rescale")(inp)  # noise ~ N(0, 0.4)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(2, name="logits")(x)
    out = keras.layers.Activation("softmax", name="probs")(x)
    return keras.Model(inp, out, name="blob_cnn")


@pytest.fixture(scope="module")
def blob():
    """(trained model, test images, labels, blob centres); trains in a few seconds."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y, _ = _blob_images(640, rng)
    model = _small_cnn()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x[..., None], y, epochs=5, batch_size=32, verbose=0)
    xt, yt, ct = _blob_images(40, np.random.default_rng(1))
    acc = float((model.predict(xt[..., None], verbose=0).argmax(1) == yt).mean())
    assert acc >= 0.95, f"blob model only reached {acc:.2f} accuracy"
    return model, xt, yt, ct


def _disc(centre, r):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r**2


ALL = list(E.METHODS)
# methods both engines compute (tf-keras-vis has no output-only methods)
BOTH_ENGINES = [m.name for m in E.REGISTRY if m.kind != "blackbox"]


@pytest.mark.parametrize("entry", E.REGISTRY, ids=lambda m: m.name)
def test_every_registered_method_points_at_the_blob(blob, entry):
    """Every method in the registry, called through its entry, finds the bright blob."""
    method = entry.name
    model, xt, yt, ct = blob
    idx = np.flatnonzero(yt == BLOB_CLASS)[:8]
    ratios, hits = [], []
    for i in idx:
        m = entry.function(model, xt[i], class_index=BLOB_CLASS)
        inside = _disc(ct[i], BLOB_R)
        ratios.append(m[inside].mean() / (m[~inside].mean() + 1e-6))
        peak = np.unravel_index(np.argmax(m), m.shape)
        hits.append(np.hypot(peak[0] - ct[i][0], peak[1] - ct[i][1]) <= 2 * BLOB_R)
    # pixel-gradient maps are noisier than CAMs, but still clearly on the blob
    assert np.median(ratios) > (2.0 if method in ("saliency", "smoothgrad") else 3.0), f"{method}: energy inside/outside blob {np.round(ratios, 2)}"
    assert np.mean(hits) >= 0.75, f"{method}: peak on the blob in only {np.mean(hits):.0%} of images"


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("class_index", [0, 1])
def test_shape_range_dtype_any_class(blob, method, class_index):
    model, xt, _, _ = blob
    m = E.explain(model, xt[0], method, class_index=class_index)
    assert m.shape == (SIZE, SIZE) and m.dtype == np.float32
    assert np.isfinite(m).all() and m.min() >= 0.0 and m.max() <= 1.0
    assert m.max() == pytest.approx(1.0) or m.max() == 0.0


def test_input_forms_and_other_sizes(blob):
    model, xt, _, _ = blob
    a = E.gradcam(model, xt[0])
    assert np.allclose(a, E.gradcam(model, xt[0][..., None]))  # (H, W, 1) accepted
    big = cv2.resize(xt[0], (128, 96))  # another size: resized for the model, map back at 96x128
    m = E.gradcam(model, big)
    assert m.shape == (96, 128) and m.dtype == np.float32
    with pytest.raises(ValueError):
        E.gradcam(model, np.zeros((2, SIZE, SIZE, 1), np.float32))
    with pytest.raises(ValueError, match="out of range"):
        E.gradcam(model, xt[0], class_index=2)
    with pytest.raises(ValueError, match="no layer"):
        E.gradcam(model, xt[0], layer="nope")
    with pytest.raises(ValueError, match="unknown method"):
        E.explain(model, xt[0], "nope")


def test_explain_many_matches_one_by_one(blob):
    model, xt, _, _ = blob
    for method in ("gradcam", "gradcam_pp", "layercam", "saliency", "scorecam_fast"):
        many = E.explain_many(model, xt[:5], method, class_index=1, batch_size=3)
        assert many.shape == (5, SIZE, SIZE) and many.dtype == np.float32
        one = np.stack([E.explain(model, im, method, class_index=1) for im in xt[:5]])
        assert np.allclose(many, one, atol=1e-4), method
    assert E.explain_many(model, xt[:0], "gradcam").shape == (0, SIZE, SIZE)


def test_non_default_layer_and_conv_layers(blob):
    model, xt, yt, ct = blob
    assert E.conv_layers(model) == ["conv1", "conv2", "last_conv"]
    assert E.default_layer(model) == "last_conv"
    i = int(np.flatnonzero(yt == BLOB_CLASS)[0])
    for method in ("gradcam", "gradcam_pp", "layercam", "scorecam_fast"):
        m = E.explain(model, xt[i], method, class_index=BLOB_CLASS, layer="conv2")
        d = E.explain(model, xt[i], method, class_index=BLOB_CLASS)
        assert m.shape == (SIZE, SIZE) and np.isfinite(m).all()
        assert not np.allclose(m, d), f"{method}: conv2 map equals last_conv map"
    with pytest.raises(ValueError, match="spatial"):
        E.gradcam(model, xt[i], layer="logits")


def test_blank_and_constant_images_give_zeros_not_nan(blob):
    model, _, _, _ = blob
    for img in (np.zeros((SIZE, SIZE), np.float32), np.full((SIZE, SIZE), 255.0, np.float32)):
        for method in ALL:
            m = E.explain(model, img, method)
            assert np.isfinite(m).all() and m.shape == (SIZE, SIZE)
    assert not E.finish(np.full((4, 4), 3.0), (8, 8)).any()
    assert not E.finish(np.full((4, 4), np.nan), (8, 8)).any()


def test_model_is_unchanged(blob):
    model, xt, _, _ = blob
    fresh = _small_cnn()  # explain a model never explained before, so the cache is built here
    fresh.set_weights(model.get_weights())
    before_w = [w.copy() for w in fresh.get_weights()]
    before_out = np.asarray(fresh(xt[:4, ..., None], training=False))
    for method in ALL:
        for engine in E.ENGINES if method in BOTH_ENGINES else ("tape",):
            E.explain(fresh, xt[0], method, engine=engine, class_index=1)
    after_out = np.asarray(fresh(xt[:4, ..., None], training=False))
    assert np.array_equal(before_out, after_out)
    assert all(np.array_equal(a, b) for a, b in zip(before_w, fresh.get_weights(), strict=True))
    assert np.allclose(after_out.sum(1), 1.0)  # still softmax
    assert fresh.get_layer("probs").activation.__name__ == "softmax"
    assert all("call" not in layer.__dict__ for layer in fresh.layers)
    assert E.linear_model(fresh) is E.linear_model(fresh)  # cached


def test_linear_view_follows_weight_changes(blob):
    model, xt, _, _ = blob
    m = _small_cnn()
    m.set_weights(model.get_weights())
    a = E.gradcam(m, xt[0], class_index=1)
    m.set_weights([np.random.default_rng(3).normal(0, 0.2, w.shape) for w in m.get_weights()])
    b = E.gradcam(m, xt[0], class_index=1)
    assert not np.allclose(a, b)


@pytest.mark.parametrize("method", BOTH_ENGINES)
def test_engines_agree(blob, method):
    """The compiled tape engine computes tf-keras-vis's maps (corr >= 0.99)."""
    model, xt, yt, _ = blob
    for i in (0, 1):
        a = E.explain(model, xt[i], method, class_index=1, engine="tape")
        b = E.explain(model, xt[i], method, class_index=1, engine="tf-keras-vis")
        if a.std() == 0 and b.std() == 0:
            continue
        corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert corr >= 0.99, f"{method} image {i}: corr {corr:.4f}"


def _nested(flat: keras.Model) -> keras.Model:
    """The same network with its convolutions wrapped in a sub-model (shares flat's layers)."""
    backbone = keras.Model(flat.inputs, flat.get_layer("last_conv").output, name="backbone")
    inp = keras.Input((SIZE, SIZE, 1), name="image")
    x = backbone(inp)
    for name in ("gap", "logits", "probs"):
        x = flat.get_layer(name)(x)
    return keras.Model(inp, x, name="nested_cnn")


def test_tape_matches_tf_keras_vis_and_handles_nested(blob):
    from tf_keras_vis.gradcam import Gradcam

    model, xt, yt, ct = blob
    nested = _nested(model)
    assert np.allclose(nested(xt[:2, ..., None]), model(xt[:2, ..., None]), atol=1e-6)
    assert "last_conv" in E.conv_layers(nested) and E.default_layer(nested) == "last_conv"
    idx = np.flatnonzero(yt == BLOB_CLASS)[:3]
    for i in idx:
        ref = Gradcam(E.linear_model(model), clone=False)(
            lambda o: o[:, 1], xt[i][None, ..., None], penultimate_layer="last_conv")[0]
        flat_tape = E.gradcam(model, xt[i], class_index=1, engine="tape")
        nested_tape = E.gradcam(nested, xt[i], class_index=1, engine="tape")
        assert np.corrcoef(ref.ravel(), flat_tape.ravel())[0, 1] >= 0.99
        assert np.corrcoef(ref.ravel(), nested_tape.ravel())[0, 1] >= 0.99
    # tf-keras-vis itself cannot reach into the sub-model (why the tape engine exists)
    with pytest.raises(Exception):  # noqa: B017
        Gradcam(E.linear_model(nested), clone=False)(
            lambda o: o[:, 1], xt[0][None, ..., None],
            penultimate_layer=nested.get_layer("backbone").get_layer("last_conv"))
    # every CAM method works on the nested model with the tape engine and matches the flat model
    for method in ("gradcam_pp", "layercam", "scorecam_fast", "saliency"):
        a = E.explain(nested, xt[idx[0]], method, class_index=1, engine="tape")
        b = E.explain(model, xt[idx[0]], method, class_index=1)
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.99, method
    assert all("call" not in layer.__dict__ for layer in nested.get_layer("backbone").layers)


@pytest.mark.parametrize("method", ["gradcam", "gradcam_pp", "layercam", "scorecam_fast"])
def test_tf_keras_vis_engine_never_falls_back(blob, method):
    """Asked for tf-keras-vis on a layer it cannot reach, explain raises instead of quietly
    running the tape engine (which would make test_engines_agree compare an engine with itself)."""
    model, xt, _, _ = blob
    with pytest.raises(E.EngineError, match="nested"):
        E.explain(_nested(model), xt[0], method, class_index=1, engine="tf-keras-vis")
    # our own input errors stay ValueErrors, whatever the engine
    with pytest.raises(ValueError, match="no layer"):
        E.explain(model, xt[0], method, layer="nope", engine="tf-keras-vis")


def test_model_loaded_from_keras_file(blob, tmp_path):
    model, xt, _, _ = blob
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True, compile=False)
    for method in ("gradcam", "saliency"):
        a = E.explain(model, xt[0], method, class_index=1)
        b = E.explain(loaded, xt[0], method, class_index=1)
        assert np.allclose(a, b, atol=1e-4)


def test_presets_of_core_model():
    from core import model as M

    img = np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE)).astype(np.float32)
    for preset in ("seed", "default"):
        m = M.build(preset, size=SIZE)
        for method in ("gradcam", "gradcam_pp", "layercam", "scorecam_fast", "saliency"):
            h = E.explain(m, img, method)
            assert h.shape == (SIZE, SIZE) and np.isfinite(h).all(), (preset, method)


def test_model_with_nested_lung_gate():
    """The lung-gated option nests a segmentation model; its layers are reachable too."""
    from core import model as M

    inp = keras.Input((32, 32, 1), name="lung_image")
    y = keras.layers.Rescaling(1.0 / 255)(inp)
    y = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="lung_conv")(y)
    y = keras.layers.Conv2D(1, 1, activation="sigmoid", name="lung_out")(y)
    lung = keras.Model(inp, y, name="lungs")
    m = M.build("default", size=SIZE, lung_model=lung)
    img = np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE)).astype(np.float32)
    assert "lung_conv" in E.conv_layers(m) and E.default_layer(m) == "last_conv"
    for engine in E.ENGINES:
        assert E.gradcam(m, img, engine=engine).shape == (SIZE, SIZE)
    h = E.gradcam(m, img, layer="lung_conv", engine="tape")  # a layer of the nested lung net
    assert h.shape == (SIZE, SIZE) and np.isfinite(h).all()
    with pytest.raises(E.EngineError):  # which tf-keras-vis cannot reach: said, not papered over
        E.gradcam(m, img, layer="lung_conv", engine="tf-keras-vis")


def test_sequential_and_dense_softmax_models():
    """Models without a logits layer: a separate Activation, or softmax inside the last Dense."""
    img = np.random.default_rng(0).uniform(0, 255, (32, 32)).astype(np.float32)
    seq = keras.Sequential([
        keras.Input((32, 32, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2, activation="softmax"),
    ])
    out = np.asarray(seq(img[None, ..., None]))
    for engine in E.ENGINES:
        assert E.gradcam(seq, img, engine=engine).shape == (32, 32)
    assert np.array_equal(out, np.asarray(seq(img[None, ..., None])))
    assert seq.layers[-1].activation.__name__ == "softmax"
    lin = E.linear_model(seq)
    logits = np.asarray(lin(img[None, ..., None]))
    assert np.allclose(np.exp(logits) / np.exp(logits).sum(), out, atol=1e-5)


# ---- the registry


def test_every_list_of_methods_comes_from_the_registry():
    from core import audit
    from core.explain import registry

    names = [m.name for m in E.REGISTRY]
    assert list(E.METHODS) == list(E.TITLES) == names and len(set(names)) == len(names)
    for m in E.REGISTRY:
        assert E.METHODS[m.name] is m.function and m.function.__name__ == m.name and m.function.__doc__
        assert m.kind in ("cam", "gradient", "blackbox") and m.routine in registry.CAMS | {"saliency", "occlusion", "rise"}
    assert audit.DEFAULT_METHODS == ("gradcam", "gradcam_pp", "scorecam_fast", "saliency")
    assert registry.SLOW == {"scorecam", "smoothgrad", "occlusion", "rise"}
    assert registry.BLACKBOX == ("occlusion", "rise")
    assert registry.BATCHABLE == {"gradcam", "gradcam_pp", "layercam", "saliency"}
    with pytest.raises(ValueError, match="unknown method"):
        registry.get("nope")


def test_drawing_and_registry_import_without_tensorflow():
    import subprocess
    import sys

    code = ("import sys, core.explain, core.explain.draw, core.explain.registry; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).resolve().parents[1]))


# ---- pictures


def test_overlay_and_panel():
    img = np.random.default_rng(0).uniform(0, 255, (50, 70)).astype(np.float32)
    heat = np.random.default_rng(1).uniform(0, 1, (7, 9)).astype(np.float32)
    ov = E.overlay(img, heat)
    assert ov.shape == (50, 70, 3) and ov.dtype == np.uint8
    plain = E.overlay(img, heat, alpha=0.0)
    assert np.array_equal(plain[..., 0], np.clip(img, 0, 255).round().astype(np.uint8))
    assert np.array_equal(plain[..., 0], plain[..., 2])
    full = E.overlay(img, heat, alpha=1.0, colormap="inferno")
    assert np.array_equal(full, E.colorize(heat, "inferno", (50, 70)))
    for cmap in ("jet", "inferno", "viridis", "turbo", "hot", "JET"):
        assert E.overlay(img, heat, 0.5, cmap).shape == (50, 70, 3)
    with pytest.raises(ValueError, match="colormap"):
        E.overlay(img, heat, colormap="nope")
    with pytest.raises(ValueError, match="alpha"):
        E.overlay(img, heat, alpha=1.5)
    p = E.panel(img, {"gradcam": heat, "saliency": heat}, alpha=0.4, colormap="jet")
    assert p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3
    assert p.shape[0] > 50 and p.shape[1] == 3 * 70 + 2 * 4
    title_band = p[: p.shape[0] - 50, :70]
    assert title_band.max() > 0  # text drawn
    assert E.panel(img, {"x": heat}, show_image=False).shape[1] == 70


# ---- CLI


def _make_run(model, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.keras")
    (run / "config.json").write_text(json.dumps({"task": "binary", "classes": ["covid", "other"], "size": SIZE}))
    return run


def test_cli_writes_png(blob, tmp_path, capsys):
    model, xt, yt, _ = blob
    run = _make_run(model, tmp_path)
    src = tmp_path / "x.png"
    cv2.imwrite(str(src), xt[0].astype(np.uint8))
    out = tmp_path / "o" / "overlay.png"
    rc = E.main([str(src), "--method", "gradcam", "--class", "other", "--run", str(run),
                 "--out", str(out), "--json", "--colormap", "inferno"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["class"] == "other" and res["class_index"] == 1 and 0.0 <= res["p_covid"] <= 1.0
    pic = cv2.imread(str(out))
    assert pic.shape == (SIZE, SIZE, 3)
    rc = E.main([str(src), "--method", "smoothgrad", "--run", str(run), "--out", str(out)])
    assert rc == 0 and "P(covid)" in capsys.readouterr().out


def test_cli_bad_image_exit_2(blob, tmp_path, capsys):
    model, _, _, _ = blob
    run = _make_run(model, tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    rc = E.main([str(bad), "--run", str(run), "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.png" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()
    rc = E.main([str(tmp_path / "missing.png"), "--run", str(run)])
    assert rc == 2
    rc = E.main([str(bad), "--run", str(run), "--class", "martian"])
    assert rc == 2


@pytest.mark.slow
def test_cli_on_tiny_run(tiny_run, cxr_root, tmp_path, capsys):
    """The CLI on a real run folder written by core.train (trains the shared tiny run)."""
    src = next(p for p in sorted((cxr_root / "kermany" / "NORMAL").iterdir()) if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    out = tmp_path / "tiny.png"
    rc = E.main([str(src), "--run", str(tiny_run), "--method", "scorecam_fast", "--out", str(out), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    from core import images, inputs

    film = images.decode(src)
    assert cv2.imread(str(out)).shape == film.shape + (3,)  # drawn on the original film
    assert abs(sum(res["probabilities"].values()) - 1.0) < 1e-4 and res["class"] == "covid"
    # the network saw the film's lung box (the tiny run crops to the lungs) and the map went back there
    cfg = json.loads((tiny_run / "config.json").read_text())
    _, box, _, _ = inputs.load(src, cfg["size"], inputs.settings(cfg))
    assert res["box"] == pytest.approx(list(box)) and not res["lung_crop_fell_back"]
    assert res["box"] != [0.0, 0.0, 1.0, 1.0]


# --------------------------------------------------------------------------------------------
# Ensembles: one saved model that averages members; its CAM is the mean of the members' maps


@pytest.fixture(scope="module")
def blob_ensemble(blob, tmp_path_factory):
    from core import model as model_lib

    first, xt, yt, ct = blob
    keras.utils.set_random_seed(1)
    x, y, _ = _blob_images(640, np.random.default_rng(5))
    second = _small_cnn()
    second.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    second.fit(x[..., None], y, epochs=5, batch_size=32, verbose=0)
    ens = model_lib.ensemble([first, second])
    path = tmp_path_factory.mktemp("ens") / "ensemble.keras"
    ens.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True, compile=False)
    return loaded, (first, second), xt, yt, ct


def test_ensemble_loads_in_safe_mode_and_averages_logits(blob_ensemble):
    from core import model as model_lib

    ens, (first, second), xt, _, _ = blob_ensemble
    assert [m.name for m in model_lib.members(ens)] == ["member_0", "member_1"]
    lin = lambda m: keras.Model(m.input, m.get_layer("logits").output)(xt[:6, ..., None], training=False)  # noqa: E731
    expected = (np.asarray(lin(first)) + np.asarray(lin(second))) / 2
    np.testing.assert_allclose(np.asarray(lin(ens)), expected, atol=1e-4)
    assert E.conv_layers(ens) == E.conv_layers(first)  # member layer names listed once


@pytest.mark.parametrize("method", ["gradcam", "gradcam_pp", "layercam", "scorecam_fast"])
def test_ensemble_cam_is_the_mean_of_member_maps_and_finds_the_blob(blob_ensemble, method):
    ens, (first, second), xt, yt, ct = blob_ensemble
    idx = np.flatnonzero(yt == BLOB_CLASS)[:6]
    hits = []
    for i in idx:
        m = E.explain(ens, xt[i], method, class_index=BLOB_CLASS)
        parts = [E.explain(net, xt[i], method, class_index=BLOB_CLASS) for net in (first, second)]
        mean = np.mean(parts, axis=0)
        mean = (mean - mean.min()) / (mean.max() - mean.min())
        np.testing.assert_allclose(m, mean, atol=2e-3)
        peak = np.unravel_index(np.argmax(m), m.shape)
        hits.append(np.hypot(peak[0] - ct[i][0], peak[1] - ct[i][1]) <= 2 * BLOB_R)
    assert np.mean(hits) >= 0.75
    many = E.explain_many(ens, xt[idx], method, class_index=BLOB_CLASS)
    one = np.stack([E.explain(ens, xt[i], method, class_index=BLOB_CLASS) for i in idx])
    np.testing.assert_allclose(many, one, atol=2e-3)
