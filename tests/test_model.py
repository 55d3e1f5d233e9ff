"""core.model: presets, layer names, preprocessing inside the model, safe loading, lung gate."""

from __future__ import annotations

import gc
import weakref

import keras
import numpy as np
import pytest

from core import config, explain, lungs
from core import model as M

SIZE = 64


def _images(n=3, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    base = 120 + 60 * np.sin(xx / 7.0) * np.cos(yy / 5.0)
    return np.stack([np.clip(base + rng.normal(0, 20, (size, size)), 0, 255) for _ in range(n)]).astype(np.float32)


def lung_standin(size=SIZE, seed=0) -> keras.Model:
    """A small U-Net-like segmentation model with random weights: raw (H,W,1) -> sigmoid map."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 1))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    d1 = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    d2 = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(keras.layers.MaxPooling2D()(d1))
    u1 = keras.layers.UpSampling2D()(d2)
    x = keras.layers.Concatenate()([u1, d1])
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    out = keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask")(x)
    return keras.Model(inp, out, name="lung_standin")


@pytest.mark.parametrize("preset", ["default", "seed"])
@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_presets_contract(preset, task):
    m = M.build(preset, task, size=SIZE)
    assert m.input_shape == (None, SIZE, SIZE, 1)
    assert m.inputs[0].name.startswith("image") or m.layers[0].name == "image"
    names = [layer.name for layer in m.layers]
    for required in ("last_conv", "logits", "probs"):
        assert required in names
    assert explain.default_layer(m) == "last_conv"
    assert m.get_layer("probs").get_config()["activation"] == "softmax"
    n = len(config.classes(task))
    assert m.output_shape == (None, n)
    p = M.probabilities(m, _images())
    assert p.shape == (3, n)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)


def test_seed_preset_is_the_original_network():
    m = M.build("seed", size=224)
    convs = [layer for layer in m.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [32, 64, 64, 128]
    assert any(isinstance(layer, keras.layers.Flatten) for layer in m.layers)
    assert m.get_layer("dense64").units == 64
    assert m.count_params() > 5_000_000  # the Flatten head dominates, as in the original


def test_default_is_small():
    m = M.build("default", size=224)
    assert m.count_params() < 500_000  # well under 10 MB as float32
    assert any(isinstance(layer, keras.layers.GlobalAveragePooling2D) for layer in m.layers)
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in m.layers)


def test_probabilities_shapes_and_errors():
    m = M.build("default", size=SIZE)
    x = _images(2)
    single = M.probabilities(m, x[0])
    assert single.shape == (1, 2)
    np.testing.assert_allclose(single[0], M.probabilities(m, x)[0], atol=1e-5)
    np.testing.assert_allclose(M.probabilities(m, x[..., None]), M.probabilities(m, x), atol=1e-6)
    with pytest.raises(ValueError, match="expects 64x64"):
        M.probabilities(m, np.zeros((32, 32), np.float32))
    assert M.probabilities(m, np.zeros((0, SIZE, SIZE), np.float32)).shape == (0, 2)


def test_brightness_and_contrast_do_not_matter():
    """Per-image standardisation inside the model: a*x+b gives the same output."""
    m = M.build("default", size=SIZE)
    x = _images(2)
    p = M.probabilities(m, x)
    p2 = M.probabilities(m, 0.6 * x + 40.0)
    np.testing.assert_allclose(p, p2, atol=2e-3)


def test_border_band_is_ignored():
    """Text and markers in the border band (12%) cannot reach the classifier."""
    m = M.build("default", size=SIZE, crop=0.12)
    x = _images(1)
    y = x.copy()
    c = int(round(0.12 * SIZE))
    y[:, :c, :] = 255.0  # burn a "label" into the top band and the left band
    y[:, :, :c] = 0.0
    # standardisation statistics come from the inner region only, so the output is identical
    np.testing.assert_allclose(M.probabilities(m, x), M.probabilities(m, y), atol=1e-5)
    no_crop = M.build("default", size=SIZE, crop=0.0)
    assert not np.allclose(M.probabilities(no_crop, x), M.probabilities(no_crop, y), atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"contrast": "local"}, {"crop": 0.0, "width": 0.5}])
def test_save_load_safe_mode_without_our_code(tmp_path, kw):
    m = M.build("default", size=SIZE, **kw)
    path = tmp_path / "m.keras"
    m.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = _images(2)
    np.testing.assert_allclose(M.probabilities(m, x), M.probabilities(loaded, x), atol=1e-6)
    # fixed blur weights of the local contrast normalisation are not trainable
    for layer in loaded.layers:
        if layer.name.startswith("lcn_blur"):
            assert not layer.trainable


def test_local_contrast_changes_the_input_representation():
    m = M.build("default", size=SIZE, contrast="local")
    assert m.get_layer("lcn_channels").output.shape[-1] == 2


def test_lung_gate_with_a_real_segmentation_model(tmp_path):
    lung = lung_standin()
    m = M.build("default", size=SIZE, lung_model=lung)
    assert "lung_gate" in [layer.name for layer in m.layers]
    # the lung model is frozen inside the classifier
    assert all(not w.trainable for w in m.get_layer("lung_standin").weights)
    path = tmp_path / "gated.keras"
    m.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = _images(2)
    np.testing.assert_allclose(M.probabilities(m, x), M.probabilities(loaded, x), atol=1e-6)

    # A lung model that finds no lung anywhere hides the whole image: output independent of input.
    w, _ = lung.get_layer("mask").get_weights()
    lung.get_layer("mask").set_weights([np.zeros_like(w), np.array([-30.0], np.float32)])
    blind = M.build("default", size=SIZE, lung_model=lung, crop=0.0)
    p = M.probabilities(blind, _images(3, seed=5))
    np.testing.assert_allclose(p, np.repeat(p[:1], 3, axis=0), atol=1e-5)


def test_lung_gate_resizes_for_a_model_of_another_size():
    m = M.build("default", size=SIZE, lung_model=lung_standin(size=32))
    assert M.probabilities(m, _images(1)).shape == (1, 2)


def test_unknown_preset_and_task():
    with pytest.raises(ValueError, match="unknown preset"):
        M.build("resnet", size=SIZE)
    with pytest.raises(ValueError, match="unknown task"):
        M.build("default", "ternary", size=SIZE)
    with pytest.raises(ValueError, match="unknown contrast"):
        M.build("default", size=SIZE, contrast="clahe")


def test_features_are_the_pooled_penultimate_layer():
    net = M.build("default", "binary", 32, width=0.5)
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32)).astype(np.float32)
    f = M.features(net, x)
    ref = keras.Model(net.input, net.get_layer("gap").output)(x[..., None], training=False)
    assert f.shape == (3, ref.shape[-1]) and np.allclose(f, np.asarray(ref), atol=1e-5)
    assert M.members(net) == []


def test_the_one_compiled_cache_does_not_keep_a_deleted_model_alive():
    """Inference, features, the explainers' tapes and the lung net's inference share one weakly
    keyed cache (core.model.cached): once the caller drops a model, nothing of ours keeps it."""
    net = M.build("default", "binary", 32, width=0.5)
    lung = lung_standin(32)
    x = _images(2, size=32)
    M.probabilities(net, x)
    M.features(net, x)
    explain.gradcam(net, x[0])
    explain.saliency(net, x[0])
    lungs.probabilities(x, model=lung, size=32)
    refs = [weakref.ref(net), weakref.ref(lung)]
    del net, lung
    gc.collect()
    assert [r() for r in refs] == [None, None], "a cache still holds a model nobody uses"
