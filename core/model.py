"""Classifier networks (Keras Functional API) that take raw grey pixels.

Every model takes one input named ``image`` of shape (size, size, 1) holding raw pixel values in
[0, 255], exactly as :func:`core.images.load` returns them. All preprocessing lives inside the
model and uses built-in Keras layers only, so a saved ``.keras`` file loads with
``keras.saving.load_model(path, safe_mode=True)`` without this module.

Layer names are a contract: the last convolution is ``last_conv`` (Grad-CAM), the pooled
penultimate features come from ``gap``, the pre-softmax layer is ``logits`` and the softmax output
layer is ``probs``. An ensemble is one Functional model whose nested member networks are named
``member_0``, ``member_1``, ... (each with the layer names above, each ending in its own
``logits``); their logits are averaged by a top-level layer named ``logits``, followed (as for a
single network) by an optional fixed ``calibration`` layer and ``probs``. The output is a softmax over
the task's classes (two units for the binary task), with COVID-19 at index 0.

Presets:

- ``seed``: the original project's network (Conv32, Conv64, pool, dropout, Conv64, pool,
  dropout, Conv128, pool, dropout, Flatten, Dense64, dropout, head). The original took 224x224x3
  RGB scaled to [0, 1]; ours rescales the grey input and repeats it to three channels inside.
- ``default``: a small, fast network with batch normalisation and global average pooling, whose
  preprocessing removes cues that identify the image's source: a band of every border is blanked
  (text, markers, figure borders), each image is standardised (brightness and contrast), and an
  optional local contrast normalisation equalises the image like CLAHE.
"""

from __future__ import annotations

import math
import threading
import weakref

import keras
import numpy as np
import tensorflow as tf
from keras import applications, layers

from core import config, keras_adapter

PRESETS = {
    "seed": "the original project's network: 4 convolutions, Flatten, Dense64 (224x224x3 in the original)",
    "default": "small network: border crop, per-image standardisation, BN, global average pooling",
}

# Default preprocessing of the ``default`` preset (chosen on validation data, see MODEL_CARD.md).
DEFAULTS = {
    "crop": 0.12,  # fraction of each border blanked
    "contrast": "local",  # "standard" (per-image standardisation) or "local" (+ local contrast norm.)
    "width": 1.0,  # channel multiplier
    "dropout": 0.3,
    "field": "global",  # "global": each output sees ~77 px of a 128 px film; "local": ~37 px
}


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _blur(x, sigma: float, name: str):
    """Fixed (non-trainable) separable Gaussian blur of a 1-channel tensor."""
    k = _gaussian_kernel(sigma)
    n = len(k)
    out = x
    for axis, shape in (("v", (n, 1)), ("h", (1, n))):
        conv = layers.DepthwiseConv2D(
            shape, padding="same", use_bias=False, trainable=False, name=f"{name}_{axis}"
        )
        out = conv(out)
        conv.set_weights([k.reshape(shape + (1, 1))])
    return out


def _standardise(x, name: str):
    # Per-image zero mean / unit variance over all pixels: removes brightness and contrast cues.
    return layers.LayerNormalization(axis=[1, 2, 3], center=False, scale=False, epsilon=1.0, name=name)(x)


def _lung_gate(raw, x, lung_model: keras.Model, size: int, crop: int, dilate: int):
    """Multiply the preprocessed image ``x`` by a frozen, dilated soft lung mask of ``raw``."""
    lung_model.trainable = False
    in_hw = tuple(lung_model.input_shape[1:3])
    inp = raw
    if in_hw != (size, size) and None not in in_hw:
        inp = layers.Resizing(*in_hw, name="lung_in_resize")(raw)
    m = lung_model(inp, training=False)
    if tuple(m.shape[1:3]) != (size, size):
        m = layers.Resizing(size, size, name="lung_out_resize")(m)
    if m.shape[-1] != 1:
        m = layers.Conv2D(1, 1, use_bias=False, trainable=False, name="lung_channel")(m)
    if dilate > 1:
        m = layers.MaxPooling2D(dilate, strides=1, padding="same", name="lung_dilate")(m)
    if crop:
        m = layers.Cropping2D(crop, name="lung_crop")(m)
    if x.shape[-1] != 1:
        m = layers.Concatenate(name="lung_mask_channels")([m] * x.shape[-1])
    return layers.Multiply(name="lung_gate")([x, m])


def _preprocess(
    raw, size: int, crop: float, contrast: str, lung_model: keras.Model | None, lung_dilate: int
):
    """Raw pixels -> standardised image with a blanked border band (same spatial size)."""
    c = int(round(crop * size))
    x = layers.Cropping2D(c, name="border_crop")(raw) if c else raw
    x = _standardise(x, "standardise")
    if contrast == "local":
        # Local contrast normalisation (CLAHE-like): remove the slowly varying background
        # (a blurred copy), standardise again, keep both channels.
        sigma = max(1.0, 0.04 * size)
        hp = layers.Subtract(name="lcn_highpass")([x, _blur(x, sigma, "lcn_blur")])
        hp = _standardise(hp, "lcn_standardise")
        x = layers.Concatenate(name="lcn_channels")([x, hp])
    elif contrast != "standard":
        raise ValueError(f"unknown contrast {contrast!r}; choose 'standard' or 'local'")
    if lung_model is not None:
        x = _lung_gate(raw, x, lung_model, size, c, lung_dilate)
    if c:
        # Pad back with zeros (= the mean after standardisation) so heatmaps align with the input.
        x = layers.ZeroPadding2D(c, name="border_pad")(x)
    return x


def _conv_bn(x, filters: int, name: str, strides: int = 1):
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _default(
    size: int,
    n_classes: int,
    crop: float = DEFAULTS["crop"],
    contrast: str = DEFAULTS["contrast"],
    width: float = DEFAULTS["width"],
    dropout: float = DEFAULTS["dropout"],
    field: str = DEFAULTS["field"],
    lung_model: keras.Model | None = None,
    lung_dilate: int = 7,
) -> keras.Model:
    if field not in ("global", "local"):
        raise ValueError(f"unknown field {field!r}; choose global or local")
    raw = keras.Input((size, size, 1), name="image")
    x = _preprocess(raw, size, crop, contrast, lung_model, lung_dilate)

    def w(n):
        return max(8, int(round(n * width)))

    x = _conv_bn(x, w(24), "stem", strides=2)  # strided first layer: 4x fewer pixels downstream
    for i, f in enumerate((32, 64, 96), start=1):
        x = _conv_bn(x, w(f), f"block{i}")
        if i < 3 or field == "global":
            x = layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    # "local": no third pooling and a 1x1 last convolution, so every position of last_conv sees a
    # patch of about 30 % of the film's side (a patch classifier averaged by the pooling, as in
    # Oh, Park & Ye, IEEE TMI 2020): it can read lung texture, not the body's outline or size;
    # its maps are twice as fine (16x16 at 128 px).
    x = layers.Conv2D(w(128), 3 if field == "global" else 1, padding="same", activation="relu", name="last_conv")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(n_classes, name="logits")(x)
    out = layers.Activation("softmax", name="probs")(x)
    return keras.Model(raw, out, name="cxr_default")


def _seed(size: int, n_classes: int, lung_model: keras.Model | None = None, lung_dilate: int = 7) -> keras.Model:
    raw = keras.Input((size, size, 1), name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale")(raw)
    if lung_model is not None:
        x = _lung_gate(raw, x, lung_model, size, 0, lung_dilate)
    x = layers.Concatenate(name="to_rgb")([x, x, x])  # the original took RGB input
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Dropout(0.25, name="drop1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv3")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Dropout(0.25, name="drop2")(x)
    x = layers.Conv2D(128, 3, activation="relu", name="last_conv")(x)
    x = layers.MaxPooling2D(2, name="pool3")(x)
    x = layers.Dropout(0.25, name="drop3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name="dense64")(x)
    x = layers.Dropout(0.5, name="drop4")(x)
    x = layers.Dense(n_classes, name="logits")(x)
    out = layers.Activation("softmax", name="probs")(x)
    return keras.Model(raw, out, name="cxr_seed")


def build(preset: str = "default", task: str = "binary", size: int = config.BUILD_SIZE, **kw) -> keras.Model:
    """Build an uncompiled classifier.

    ``preset`` is a key of :data:`PRESETS`; ``task`` a key of ``config.TASKS``; ``size`` the
    input side in pixels. Keyword options of ``default``: ``crop`` (border fraction blanked),
    ``contrast`` ("standard" | "local"), ``width``, ``dropout``, ``field`` ("global" | "local"). Both presets take
    ``lung_model``: a Keras model mapping raw (H, W, 1) pixels to a lung probability map; the
    classifier then only sees the image inside the frozen, slightly dilated soft lung mask.
    """
    n = len(config.classes(task))
    if preset == "default":
        return _default(size, n, **kw)
    if preset == "seed":
        kw = {k: v for k, v in kw.items() if k in ("lung_model", "lung_dilate")}
        return _seed(size, n, **kw)
    raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")


def ensemble(nets: list[keras.Model], name: str = "cxr_ensemble") -> keras.Model:
    """One model that averages the logits of ``nets`` (each a network with a ``logits`` layer).

    Every member becomes a nested model ``member_<k>`` from the shared ``image`` input to its
    logits; a top-level ``Average`` named ``logits`` and a softmax ``probs`` follow, so the result
    has the same contract as one network (calibration can be inserted after ``logits``) and loads
    in safe mode.
    """
    size = input_size(nets[0])
    raw = keras.Input((size, size, 1), name="image")
    outs = [keras.Model(n.input, n.get_layer("logits").output, name=f"member_{k}")(raw) for k, n in enumerate(nets)]
    logits = layers.Average(name="logits")(outs) if len(outs) > 1 else layers.Identity(name="logits")(outs[0])
    return keras.Model(raw, layers.Activation("softmax", name="probs")(logits), name=name)


BACKBONES = {"densenet121": "DenseNet121", "resnet50": "ResNet50"}
# ImageNet statistics of keras.applications' "torch" (DenseNet) and "caffe" (ResNet) preprocessing,
# as fixed Normalization layers so that the saved model needs no custom code.
_IMAGENET_NORM = {
    "densenet121": ([0.485 * 255, 0.456 * 255, 0.406 * 255], [(0.229 * 255) ** 2, (0.224 * 255) ** 2, (0.225 * 255) ** 2]),
    "resnet50": ([103.939, 116.779, 123.68], [1.0, 1.0, 1.0]),
}


def backbone(name: str, task: str = "binary", size: int = 224, weights: str = "none", dropout: float = 0.3):
    """A ``keras.applications`` network (DenseNet-121 or ResNet-50) with our input and head.

    The grey input is repeated to three channels and normalised as the backbone expects; then
    the backbone's convolutional part, ``gap``, dropout, ``logits`` and ``probs``. ``weights``:
    ``"none"`` (random, what this project trains with) or ``"imagenet"``, which Keras downloads on
    first use; without internet that raises a RuntimeError saying so.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    if weights not in ("none", "imagenet"):
        raise ValueError(f"unknown weights {weights!r}; choose none or imagenet")
    raw = keras.Input((size, size, 1), name="image")
    x = layers.Concatenate(name="to_rgb")([raw, raw, raw])
    mean, var = _IMAGENET_NORM[name]
    x = layers.Normalization(mean=mean, variance=var, name="imagenet_norm")(x)
    try:
        base = getattr(applications, BACKBONES[name])(
            include_top=False, weights="imagenet" if weights == "imagenet" else None, input_tensor=x
        )
    except Exception as exc:  # the weights come from the internet: say so instead of a urllib trace
        raise RuntimeError(
            f"could not get the ImageNet weights of {name} ({type(exc).__name__}: {exc}); they are downloaded by "
            "Keras on first use, so this needs internet access (or a copy in ~/.keras/models); "
            "use --weights none to train from scratch"
        ) from None
    x = layers.GlobalAveragePooling2D(name="gap")(base.output)
    x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(len(config.classes(task)), name="logits")(x)
    return keras.Model(raw, layers.Activation("softmax", name="probs")(x), name=f"cxr_{name}")


def input_size(model: keras.Model) -> int:
    """The side in pixels that ``model`` expects, as one int (its input is square).

    Not to be confused with ``core.explain``'s ``input_hw``, which returns ``(height, width)``.
    """
    return int(model.input_shape[1])


# The one cache of what is derived from a model (compiled inference, feature extractors, the
# explainers' linear view and tapes). Weak keys: an entry goes when its model goes.
_PER_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PER_MODEL_LOCK = threading.RLock()


def cached(model: keras.Model, key, build):
    """``build(model)``, computed once per model and ``key`` and kept only while the model lives.

    ``build`` must not return anything that holds ``model`` itself (a closure over it, say), or
    the weak key would never die: call the model through :func:`inference` or a ``weakref``.
    """
    with _PER_MODEL_LOCK:
        slot = _PER_MODEL.get(model)
        if slot is None:
            slot = _PER_MODEL[model] = {}
        if key not in slot:
            slot[key] = build(model)
        return slot[key]


def _inference(model: keras.Model):

    ref = weakref.ref(model)  # not the model itself: the cache must not keep it alive
    spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)
    return tf.function(lambda x: ref()(x, training=False), input_signature=[spec])


def inference(model: keras.Model):
    """The model's traced inference call ``fn(x) -> outputs`` (about 10x faster than eager calls
    for one image), cached per model (:func:`cached`)."""
    return cached(model, "inference", _inference)


def probabilities(model: keras.Model, images, batch_size: int = 32) -> np.ndarray:
    """Class probabilities (n, n_classes) for raw grey images (n, H, W), (H, W) or (n, H, W, 1).

    A single (H, W) image gives shape (1, n_classes). P(covid) is column ``config.COVID_INDEX``.
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] != 1:
        raise ValueError(f"expected grey images (n, H, W); got shape {np.shape(images)}")
    size = input_size(model)
    if x.shape[1:3] != (size, size):
        raise ValueError(f"images are {x.shape[1]}x{x.shape[2]} but the model expects {size}x{size}")
    fn = inference(model)
    out = [np.asarray(fn(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    if not out:
        return np.zeros((0, int(model.output_shape[-1])), np.float32)
    return np.concatenate(out).astype(np.float32)


def members(model: keras.Model) -> list[keras.Model]:
    """The member networks of an ensemble (nested models named ``member_<k>``); [] for one network."""
    return [layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name.startswith("member_")]


def walk(model: keras.Model, path: tuple = ()):
    """Yield (layer, path of enclosing sub-models) for every layer, depth first, in model order
    (nested Functional and Sequential models included, at any depth)."""
    for layer in model.layers:
        yield layer, path
        if isinstance(layer, keras.Model):
            yield from walk(layer, path + (layer,))


def qualified(layer, path: tuple) -> str:
    """A layer's name with the sub-models that hold it: ``adopted/conv5`` (plain at the top level)."""
    return "/".join([p.name for p in path] + [layer.name])


def find_layer(model: keras.Model, name: str):
    """The layer called ``name`` (plain, or a path such as ``adopted/conv5``) anywhere in ``model``.

    A plain name shared by several layers means the top-level one, else the first in model order.
    ValueError when there is none.
    """
    found = [(lyr, path) for lyr, path in walk(model) if name in (lyr.name, qualified(lyr, path))]
    if not found:
        raise ValueError(f"the model has no layer {name!r}")
    top = [f for f in found if not f[1]]
    return (top or found)[0]


def penultimate(model: keras.Model, layer: str | None = None) -> tuple:
    """Where the penultimate features are read: (layer, "output" | "input").

    ``layer`` named (config ``adopted.penultimate``): its output. Else ``gap`` when the model has
    one (our networks), else the input of the last Dense layer found by walking nested models
    (any classifier's head; a top-level Dense after the nested network only picks an output). ValueError when none is reachable (a SavedModel signature).
    """
    if layer:
        return find_layer(model, layer)[0], "output"
    names = [lyr.name for lyr in model.layers]
    if "gap" in names:
        return model.get_layer("gap"), "output"
    walked = [(lyr, path) for lyr, path in walk(model) if isinstance(lyr, keras.layers.Dense)]
    # a Dense inside the nested network is its head; one after it at the top picks an output unit
    dense = [lyr for lyr, path in walked if path] or [lyr for lyr, _ in walked]
    if not dense:
        raise ValueError(f"model {model.name!r} has no reachable Dense layer to read penultimate features from")
    return dense[-1], "input"


def _features_fn(model: keras.Model, layer: str | None = None):
    spec = [tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)]
    nets = members(model)
    if nets and layer is None:
        parts = [keras.Model(m.input, m.get_layer("gap").output) for m in nets]
        return tf.function(lambda x: tf.concat([p(x, training=False) for p in parts], axis=-1), input_signature=spec)
    target, what = penultimate(model, layer)
    ref = weakref.ref(model)  # not the model itself: the cache must not keep it alive

    def read(x):
        # The layer may sit inside nested models, where its tensors are not the outer graph's:
        # record them during the forward pass instead (core.keras_adapter).
        store: dict = {}
        with keras_adapter.capture_output(target, store, "f", what=what):
            ref()(x, training=False)
        f = store["f"]
        if len(f.shape) == 4:  # a feature map (e.g. an adopted backbone cut before its head): pool it as gap does
            f = tf.reduce_mean(f, axis=[1, 2])
        return tf.reshape(f, [tf.shape(f)[0], -1])

    return tf.function(read, input_signature=spec)


def features(model: keras.Model, images, batch_size: int = 32, layer: str | None = None) -> np.ndarray:
    """Penultimate features of raw grey images (n, H, W) at the model's size (:func:`penultimate`):
    the output of ``gap`` for our networks, the input of the last Dense layer for any other model,
    or the output of ``layer`` when named. For an ensemble, the members' features side by side
    (n, sum of widths), member 0 first.
    """
    fn = cached(model, ("features", layer), lambda m: _features_fn(m, layer))
    x = np.asarray(images, np.float32)
    x = x[None] if x.ndim == 2 else x
    x = x[..., None] if x.ndim == 3 else x
    out = [np.asarray(fn(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)
