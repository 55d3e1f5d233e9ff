"""Heatmaps that explain a classifier's decision: the Grad-CAM family, Score-CAM and saliency.

Every method takes one raw grey image (H, W) or (H, W, 1), float in [0, 255], exactly as
:func:`core.images.load` returns it at the model's input size, and returns a float32 (H, W) map in
[0, 1] at the input's size (an image of another size is resized for the model and the map is
resized back). A map that carries no signal (constant, or non-finite gradients) comes back as
zeros, never NaN.

Methods (``METHODS``): ``gradcam``, ``gradcam_pp`` (Grad-CAM++), ``scorecam`` (all channels) and
``scorecam_fast`` (Faster Score-CAM, the ``max_n`` channels of highest spatial variance),
``layercam``, ``saliency`` (vanilla gradients) and ``smoothgrad`` (20 noisy samples, one batch).
Any class can be explained (``class_index``; 0 is always COVID-19) at any convolution layer
(``layer``; default ``last_conv`` or else the last convolution, see :func:`conv_layers`).

Two engines compute the same maps:

- ``"tf-keras-vis"``: the reference implementations of tf-keras-vis 0.8.7 (Gradcam,
  GradcamPlusPlus, Scorecam, Layercam, Saliency).
- ``"tape"`` (default): the same formulas on a cached, ``tf.function``-compiled GradientTape,
  with tf-keras-vis's upsampling (corner-aligned linear, as scipy's zoom). It is 2-15x faster
  (tf-keras-vis rebuilds a Keras model and runs it eagerly on every call, and SmoothGrad loops
  over its samples), which is what keeps Grad-CAM under 100 ms per image; the tests check that
  both engines agree (correlation >= 0.99 on the same model). The tape engine also works where tf-keras-vis cannot:
  a target layer inside a nested sub-model (for example a backbone wrapped in the classifier).

The engine asked for is the engine that runs: with ``engine="tf-keras-vis"`` a layer it cannot
reach, a failure inside it or a non-finite map raises :class:`EngineError` (never a silent
switch to the tape engine), so a comparison of the two engines compares two implementations.

Why logits: every method explains the pre-softmax score (the ``logits`` layer). A saturated
softmax has near-zero gradients and gives blank maps. The model itself is never modified: the
explanations run on a cached "linear" view of it (a sub-model ending at ``logits`` that shares
the original's layers, so it also follows any later change to the weights). Only a model without
a ``logits`` layer or a separate softmax Activation is cloned, with its final activation set to
linear (that copy is a snapshot of the weights at first use).

Score-CAM: the weight of each activation channel is the class *probability* of the input masked
by that channel (Wang et al., 2020). tf-keras-vis applies a softmax to the model output for this,
which is right only when it is given the linear model: softmax(logits) is the model's own
probability. Given the softmax model it would apply softmax twice (squashing the scores), and a
one-unit sigmoid head would give softmax == 1 for every mask, hence a blank map: that is why the
binary models have two softmax units. Both engines here use softmax(logits).

Grad-CAM++: tf-keras-vis multiplies the gradients by exp(score); this positive per-image factor
cancels after normalisation but overflows to inf (NaN maps) for logits above ~88, so the tape
engine leaves it out.

:func:`explain_many` batches Grad-CAM, Grad-CAM++, LayerCAM and saliency over many images (for
audits). :func:`overlay` blends a map over the image with an OpenCV colour map and :func:`panel`
puts several overlays side by side with titles. :func:`film_views` draws a map on the original film
(overlay, side by side, or a wipe), with the lungs' outline when asked.

CLI::

    python -m core.explain IMAGE --method gradcam [--class covid] [--layer NAME] [--run R]
        --out overlay.png [--alpha 0.4] [--colormap jet] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from core import config  # noqa: E402
from core.model import members  # noqa: E402

ENGINES = ("tape", "tf-keras-vis")
DEFAULT_ENGINE = "tape"
SCORECAM_FAST_N = 10  # channels kept by Faster Score-CAM (highest spatial std; tf-keras-vis example value)
SMOOTHGRAD_SAMPLES = 20
SMOOTHGRAD_NOISE = 0.20  # noise sigma as a fraction of the image's value range (tf-keras-vis default)
BATCH = 32  # masked / noisy images per forward pass

_CONV_TYPES = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv2DTranspose,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
)

_LOCK = threading.RLock()


class EngineError(RuntimeError):
    """The requested engine cannot compute this map (e.g. tf-keras-vis and a nested layer)."""


# --------------------------------------------------------------------------------------------
# Model plumbing


def _walk(model, path=()):
    """Yield (layer, path of enclosing sub-models) for every layer, depth first, in model order."""
    for layer in model.layers:
        yield layer, path
        if isinstance(layer, keras.Model):
            yield from _walk(layer, path + (layer,))


def _is_conv(layer) -> bool:
    return isinstance(layer, _CONV_TYPES)


def conv_layers(model: keras.Model) -> list[str]:
    """Names of the convolution layers that can be explained, input to output.

    Layers inside nested sub-models (a wrapped backbone, a lung-segmentation gate) are included;
    the tape engine handles them. The default layer is the last of the classifier's own layers.
    An ensemble's members share their layer names, so each name is listed once.
    """
    return list(dict.fromkeys(layer.name for layer, _ in _walk(model) if _is_conv(layer)))


def default_layer(model: keras.Model) -> str:
    """``last_conv`` if the model has it (anywhere), else the last top-level convolution."""
    names = [layer.name for layer, _ in _walk(model)]
    if "last_conv" in names:
        return "last_conv"
    for layer in reversed(model.layers):
        if _is_conv(layer):
            return layer.name
    convs = conv_layers(model)
    if not convs:
        raise ValueError(f"model {model.name!r} has no convolution layer to explain")
    return convs[-1]


def _target(model: keras.Model, layer=None):
    """(layer, nested?) in the linear view of ``model``, from a name, a layer or None (default)."""
    if layer is None:
        layer = default_layer(model)
    if isinstance(layer, keras.layers.Layer):
        layer = layer.name
    return _find_layer(linear_model(model), layer)


def _find_layer(model: keras.Model, layer):
    """(layer object, nested?) for a layer name in ``model``."""
    found = [lyr for lyr, _ in _walk(model) if lyr.name == layer]
    if not found:
        raise ValueError(f"the model has no layer {layer!r}; conv layers: {conv_layers(model)}")
    top = [lyr for lyr in found if any(lyr is t for t in model.layers)]  # prefer a top-level one
    target = (top or found)[0]
    nested = not any(target is t for t in model.layers)
    shape = (_output_in(model, target) if not nested else target.output).shape
    if len(shape) != 4:
        raise ValueError(f"layer {target.name!r} has output shape {tuple(shape)}; "
                         "a CAM needs a spatial (batch, h, w, channels) layer")
    return target, nested


def _node(model: keras.Model, layer):
    """The node of ``layer`` that belongs to ``model``'s graph (a layer shared by several models,
    or called twice, has several; ``layer.output`` is only the first one's)."""
    keys = getattr(model, "_nodes", None) or ()  # Keras 3 keys: f"{id(op)}_ib-{node_index}"
    for i in reversed(range(len(layer._inbound_nodes))):
        if f"{id(layer)}_ib-{i}" in keys:
            return layer._inbound_nodes[i]
    return layer._inbound_nodes[0] if layer._inbound_nodes else None


def _output_in(model: keras.Model, layer):
    node = _node(model, layer)
    return node.outputs[0] if node is not None else layer.output


def _make_linear(model: keras.Model) -> keras.Model:
    names = [layer.name for layer in model.layers]
    if "logits" in names:
        out = _output_in(model, model.get_layer("logits"))
        return keras.Model(model.inputs, out, name=f"{model.name}_logits")
    last = model.layers[-1]
    act = getattr(last, "activation", None)
    act_name = getattr(act, "__name__", str(act))
    if isinstance(last, keras.layers.Activation) and act_name in ("softmax", "sigmoid"):
        node = _node(model, last)
        inp = node.input_tensors[0] if node is not None else last.input
        return keras.Model(model.inputs, inp, name=f"{model.name}_logits")
    if act_name in ("softmax", "sigmoid"):
        # Only case that needs a copy: the final layer computes and activates in one step.
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        clone.layers[-1].activation = keras.activations.linear
        return clone
    return model


def _state(model: keras.Model) -> dict:
    """{"linear": the pre-softmax view, "fns": compiled tapes}, in core.model's per-model cache."""
    from core import model as cmodel

    return cmodel.cached(model, "explain", lambda m: {"linear": _make_linear(m), "fns": {}})


def linear_model(model: keras.Model) -> keras.Model:
    """The cached pre-softmax view of ``model`` (outputs logits); ``model`` is not modified."""
    return _state(model)["linear"]


def input_size(model: keras.Model) -> tuple[int | None, int | None]:
    """(height, width) the model expects (None where it takes any size)."""
    shape = model.inputs[0].shape
    return tuple(None if d is None else int(d) for d in shape[1:3])


def _prepare(model: keras.Model, image) -> tuple[np.ndarray, tuple[int, int]]:
    """A (1, h, w, 1) float32 batch at the model's size, and the caller's (H, W)."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim != 2:
        raise ValueError(f"expected one grey image (H, W) or (H, W, 1); got shape {np.shape(image)}")
    out_hw = img.shape
    img = np.nan_to_num(img, nan=0.0, posinf=255.0, neginf=0.0)
    h, w = input_size(model)
    h, w = h or img.shape[0], w or img.shape[1]
    if img.shape != (h, w):
        interp = cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_LINEAR
        img = cv2.resize(img, (w, h), interpolation=interp)
    return img[None, :, :, None], out_hw


def _finish(m, out_hw) -> np.ndarray:
    """Resize to (H, W), scale to [0, 1]; NaN/inf become 0 and a flat map becomes zeros."""
    m = np.nan_to_num(np.asarray(m, dtype=np.float32).squeeze(), nan=0.0, posinf=0.0, neginf=0.0)
    if m.ndim != 2:
        raise ValueError(f"internal error: map of shape {m.shape}")
    if m.shape != tuple(out_hw):
        m = cv2.resize(m, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_LINEAR)
    lo, hi = float(m.min()), float(m.max())
    if not hi - lo > 1e-12 * max(1.0, abs(hi)):
        return np.zeros(out_hw, np.float32)
    return np.clip((m - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _check_class(model: keras.Model, class_index: int) -> int:
    n = int(linear_model(model).outputs[0].shape[-1])
    ci = int(class_index)
    if not 0 <= ci < n:
        raise ValueError(f"class_index {class_index} out of range for a model with {n} classes")
    return ci


@contextlib.contextmanager
def _capture(layer, store: dict, key: str):
    """Temporarily record ``layer``'s output (used while tracing the nested-layer tape).

    The instance attribute shadows the class's ``call`` and is removed on exit, so the layer is
    back to its original state; the lock keeps two traces from patching it at once.
    """
    with _LOCK:
        original = layer.call

        def recording_call(*args, **kwargs):
            out = original(*args, **kwargs)
            store[key] = out
            return out

        layer.call = recording_call
        try:
            yield
        finally:
            layer.__dict__.pop("call", None)


def _cam_fn(model: keras.Model, target, nested: bool, grads: bool = True):
    """Compiled fn(x, class_index) -> (activations, d logit / d activations, logits);
    with ``grads=False`` fn(x) -> activations (forward only, for Score-CAM)."""
    st = _state(model)
    key = ("cam" if grads else "acts", id(target))
    with _LOCK:
        fn = st["fns"].get(key)
        if fn is not None:
            return fn
        lin = st["linear"]
        if not nested:
            graph = keras.Model(lin.inputs, [_output_in(lin, target), lin.outputs[0]])

            def forward(x):
                acts, logits = graph(x, training=False)
                return acts, logits
        else:
            # The layer lives in a sub-model, so its output is not a tensor of the outer graph
            # (why tf-keras-vis fails): record it during the forward pass instead.
            def forward(x):
                store: dict = {}
                with _capture(target, store, "acts"):
                    logits = lin(x, training=False)
                return store["acts"], logits

        if grads:

            @tf.function(reduce_retracing=True)
            def fn(x, class_index):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    acts, logits = forward(x)
                    score = tf.gather(logits, class_index, axis=-1)
                return acts, tape.gradient(score, acts), logits
        else:

            @tf.function(reduce_retracing=True)
            def fn(x):
                return forward(x)[0]

        st["fns"][key] = fn
        return fn


def _input_grad_fn(model: keras.Model):
    """Compiled fn(x batch, class_index) -> d logit / d x (same shape as x)."""
    st = _state(model)
    with _LOCK:
        fn = st["fns"].get("input_grad")
        if fn is None:
            lin = st["linear"]

            @tf.function(reduce_retracing=True)
            def fn(x, class_index):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    score = tf.gather(lin(x, training=False), class_index, axis=-1)
                return tape.gradient(score, x)

            st["fns"]["input_grad"] = fn
        return fn


def _scorecam_fn(model: keras.Model):
    """Compiled fn(x, acts (h, w, c), mh (H, h), mw (W, w), class_index) -> (c,) probabilities of
    the class for the image masked by each upsampled, [0, 1]-scaled channel (one batch)."""
    st = _state(model)
    with _LOCK:
        fn = st["fns"].get("scorecam")
        if fn is None:
            lin = st["linear"]

            @tf.function(reduce_retracing=True)
            def fn(x, acts, mh, mw, class_index):
                up = tf.einsum("Hh,hwc,Ww->cHW", mh, acts, mw)
                lo = tf.reduce_min(up, axis=(1, 2), keepdims=True)
                hi = tf.reduce_max(up, axis=(1, 2), keepdims=True)
                masks = (up - lo) / (hi - lo + 1e-7)
                masked = (x[:, :, :, 0] * masks)[..., None]
                probs = tf.nn.softmax(lin(masked, training=False), axis=-1)
                return tf.gather(probs, class_index, axis=-1)

            st["fns"]["scorecam"] = fn
        return fn


def _acts_grads(model, x, class_index, layer):
    target, nested = _target(model, layer)
    fn = _cam_fn(model, target, nested)
    acts, grads, logits = fn(tf.constant(x), tf.constant(class_index, tf.int32))
    if grads is None:
        raise ValueError(f"layer {target.name!r} does not influence the output")
    return acts.numpy(), grads.numpy(), logits.numpy()


# --------------------------------------------------------------------------------------------
# Tape engine (the formulas of tf-keras-vis 0.8.7 on a compiled tape)


def _relu(a):
    return np.maximum(a, 0.0)


@functools.lru_cache(maxsize=64)
def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of linear interpolation with the end points aligned."""
    pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def _upsample(a, hw):
    """Linear upsampling of (h, w[, c]) to hw with corners aligned: what tf-keras-vis does with
    scipy's zoom(order=1), so both engines give the same maps, as two small matrix products
    (10-50x faster than zoom over many channels)."""
    a = np.asarray(a, dtype=np.float64)
    mh, mw = _interp_matrix(a.shape[0], int(hw[0])), _interp_matrix(a.shape[1], int(hw[1]))
    if a.ndim == 2:
        return mh @ a @ mw.T
    return np.einsum("Hh,hwc,Ww->HWc", mh, a, mw, optimize=True)


def _upsample_batch(a, hw):
    """(n, h, w) -> (n, H, W) as :func:`_upsample`."""
    mh, mw = _interp_matrix(a.shape[1], int(hw[0])), _interp_matrix(a.shape[2], int(hw[1]))
    return np.einsum("Hh,nhw,Ww->nHW", mh, np.asarray(a, np.float64), mw, optimize=True)


def _tape_gradcam(model, x, class_index, layer):
    acts, grads, _ = _acts_grads(model, x, class_index, layer)
    weights = grads.mean(axis=(1, 2), keepdims=True)
    return _upsample_batch(_relu((acts * weights).sum(-1)), x.shape[1:3])


def _tape_gradcam_pp(model, x, class_index, layer):
    acts, grads, _ = _acts_grads(model, x, class_index, layer)
    acts, grads = acts.astype(np.float64), grads.astype(np.float64)
    first = grads  # exp(score) left out: a positive factor that normalisation cancels
    second = first * grads
    third = second * grads
    global_sum = acts.sum(axis=(1, 2), keepdims=True)
    denom = 2.0 * second + third * global_sum
    denom = denom + (second == 0.0)
    alphas = second / denom
    norm = alphas.sum(axis=(1, 2), keepdims=True)
    alphas = alphas / (norm + (norm == 0.0))
    weights = (_relu(first) * alphas).sum(axis=(1, 2), keepdims=True)
    return _upsample_batch(_relu((acts * weights).sum(-1)), x.shape[1:3])


def _tape_layercam(model, x, class_index, layer):
    acts, grads, _ = _acts_grads(model, x, class_index, layer)
    return _upsample_batch(_relu((acts * _relu(grads)).sum(-1)), x.shape[1:3])


def _tape_scorecam(model, x, class_index, layer, max_n=None):
    target, nested = _target(model, layer)
    acts = _cam_fn(model, target, nested, grads=False)(tf.constant(x)).numpy()[0]
    channels = acts.shape[-1]
    if max_n is not None and max_n > 0:
        if max_n > channels:
            raise ValueError(f"max_n must be 1..{channels}; got {max_n}")
        keep = np.argsort(-acts.std(axis=(0, 1)), kind="stable")[:max_n]
        acts = acts[..., keep]
    h, w = x.shape[1:3]
    fn = _scorecam_fn(model)
    mh = tf.constant(_interp_matrix(acts.shape[0], h), tf.float32)
    mw = tf.constant(_interp_matrix(acts.shape[1], w), tf.float32)
    xt, ct = tf.constant(x), tf.constant(class_index, tf.int32)
    weights = np.concatenate([
        fn(xt, tf.constant(acts[..., s : s + BATCH]), mh, mw, ct).numpy()
        for s in range(0, acts.shape[-1], BATCH)
    ]).astype(np.float64)
    return _upsample(_relu((acts * weights).sum(-1)), (h, w))[None]


def _smooth_inputs(x, n, noise, seed):
    rng = np.random.default_rng(seed)
    sigma = noise * float(x.max() - x.min())
    return (x + rng.normal(0.0, sigma, (n,) + x.shape[1:])).astype(np.float32)


def _tape_saliency(model, x, class_index, n=0, noise=SMOOTHGRAD_NOISE, seed=0):
    fn = _input_grad_fn(model)
    if n <= 0:  # vanilla saliency, for a whole batch of images at once
        return np.abs(fn(tf.constant(x), tf.constant(class_index, tf.int32)).numpy()).max(axis=-1)
    batch = _smooth_inputs(x, n, noise, seed)
    total = None
    for start in range(0, len(batch), BATCH):
        g = fn(tf.constant(batch[start : start + BATCH]), tf.constant(class_index, tf.int32)).numpy()
        g = np.abs(g).max(axis=-1).sum(axis=0)
        total = g if total is None else total + g
    return (total / len(batch))[None]


# --------------------------------------------------------------------------------------------
# tf-keras-vis engine


class _QuietModel:
    """Forwards to a Keras model but predicts without a progress bar (Scorecam calls predict)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def predict(self, x, batch_size=BATCH, **kw):
        return self._model.predict(x, batch_size=batch_size, verbose=0)


def _tkv_score(class_index):
    return lambda output: output[:, class_index]


def _tkv_cam(kind, model, x, class_index, layer, max_n=None):
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.layercam import Layercam
    from tf_keras_vis.scorecam import Scorecam

    target, nested = _target(model, layer)
    if nested:
        raise EngineError(f"tf-keras-vis cannot explain layer {target.name!r}: it lies inside a nested model; "
                          "use engine='tape'")
    lin = linear_model(model)
    cls = {"gradcam": Gradcam, "gradcam_pp": GradcamPlusPlus, "layercam": Layercam, "scorecam": Scorecam}[kind]
    vis = cls(lin, clone=False)  # no modifier: lin already ends at the logits, and is not changed
    kw = dict(penultimate_layer=target, seek_penultimate_conv_layer=False, normalize_cam=False)
    if kind == "scorecam":
        vis.model = _QuietModel(lin)
        kw.update(max_N=max_n, batch_size=BATCH)
    with contextlib.redirect_stdout(io.StringIO()):
        cam = vis(_tkv_score(class_index), x, **kw)
    return np.asarray(cam)[0]


def _tkv_saliency(model, x, class_index, n=0, noise=SMOOTHGRAD_NOISE, seed=0):
    from tf_keras_vis.saliency import Saliency

    vis = Saliency(linear_model(model), clone=False)
    # SmoothGrad as one batch of noisy copies (tf-keras-vis would loop over them one by one).
    batch = _smooth_inputs(x, n, noise, seed) if n > 0 else x
    grads = [np.asarray(vis(_tkv_score(class_index), batch[s : s + BATCH], normalize_map=False))
             for s in range(0, len(batch), BATCH)]
    return np.concatenate(grads).mean(axis=0)


# --------------------------------------------------------------------------------------------
# Public methods


_CAMS = ("gradcam", "gradcam_pp", "layercam", "scorecam")


def _run(kind, model, image, class_index, layer, engine, **kw):
    nets = members(model)
    if nets and kind in _CAMS:
        # An ensemble's CAM is the mean of its members' maps, each taken at the member's own
        # layer of that name (members are averaged at their logits, so each has its own CAM).
        name = layer.name if isinstance(layer, keras.layers.Layer) else layer
        maps = [_run(kind, net, image, class_index, name, engine, **kw) for net in nets]
        return _finish(np.mean(maps, axis=0), maps[0].shape)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    x, out_hw = _prepare(model, image)
    ci = _check_class(model, class_index)
    if engine == "tape":
        return _finish(_TAPE[kind](model, x, ci, layer, **kw)[0], out_hw)
    raw = _tkv_run(kind, model, x, ci, layer, **kw)
    if not np.isfinite(raw).all():
        raise EngineError(f"tf-keras-vis gave a non-finite {kind} map; use engine='tape'")
    return _finish(raw, out_hw)


def _tkv_run(kind, model, x, ci, layer, **kw) -> np.ndarray:
    """The raw tf-keras-vis map; a failure inside tf-keras-vis becomes EngineError."""
    saliency_like = kind in ("saliency", "smoothgrad")
    if not saliency_like:
        _target(model, layer)  # our own checks first: an unknown or non-spatial layer is a ValueError
    try:
        if saliency_like:
            raw = _tkv_saliency(model, x, ci, **kw)
        else:
            raw = _tkv_cam(kind, model, x, ci, layer, **kw)
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failure inside tf-keras-vis, named for the caller
        raise EngineError(f"tf-keras-vis failed on {kind}: {type(exc).__name__}: {exc}") from exc
    return np.asarray(raw, dtype=np.float32)


def _tape_saliency_kind(model, x, ci, layer, **kw):
    return _tape_saliency(model, x, ci, **kw)


_TAPE = {"gradcam": _tape_gradcam, "gradcam_pp": _tape_gradcam_pp, "layercam": _tape_layercam,
         "scorecam": _tape_scorecam, "saliency": _tape_saliency_kind, "smoothgrad": _tape_saliency_kind}


def gradcam(model, image, class_index: int = 0, layer=None, engine: str = DEFAULT_ENGINE) -> np.ndarray:
    """Grad-CAM (Selvaraju et al., 2017): channels weighted by their mean logit gradient, ReLU."""
    return _run("gradcam", model, image, class_index, layer, engine)


def gradcam_pp(model, image, class_index: int = 0, layer=None, engine: str = DEFAULT_ENGINE) -> np.ndarray:
    """Grad-CAM++ (Chattopadhyay et al., 2018): pixel-wise weighted positive gradients."""
    return _run("gradcam_pp", model, image, class_index, layer, engine)


def layercam(model, image, class_index: int = 0, layer=None, engine: str = DEFAULT_ENGINE) -> np.ndarray:
    """LayerCAM (Jiang et al., 2021): activations times positive gradients, per position."""
    return _run("layercam", model, image, class_index, layer, engine)


def scorecam(model, image, class_index: int = 0, layer=None, max_n: int | None = None,
             engine: str = DEFAULT_ENGINE) -> np.ndarray:
    """Score-CAM (Wang et al., 2020): channels weighted by the class probability of the image
    masked by each upsampled channel. ``max_n`` keeps only the ``max_n`` channels of highest
    spatial standard deviation (Faster Score-CAM); None uses every channel (slow)."""
    return _run("scorecam", model, image, class_index, layer, engine, max_n=max_n)


def scorecam_fast(model, image, class_index: int = 0, layer=None, max_n: int = SCORECAM_FAST_N,
                  engine: str = DEFAULT_ENGINE) -> np.ndarray:
    """Faster Score-CAM: :func:`scorecam` on the ``max_n`` (default 10) most varied channels."""
    target, _ = _target(model, layer)
    max_n = min(int(max_n), int(target.output.shape[-1]))
    return _run("scorecam", model, image, class_index, target.name, engine, max_n=max_n)


def saliency(model, image, class_index: int = 0, layer=None, engine: str = DEFAULT_ENGINE) -> np.ndarray:
    """Vanilla saliency (Simonyan et al., 2014): |d logit / d pixel|. ``layer`` is ignored."""
    return _run("saliency", model, image, class_index, None, engine, n=0)


def smoothgrad(model, image, class_index: int = 0, layer=None, n: int = SMOOTHGRAD_SAMPLES,
               noise: float = SMOOTHGRAD_NOISE, seed: int = 0, engine: str = DEFAULT_ENGINE) -> np.ndarray:
    """SmoothGrad (Smilkov et al., 2017): saliency averaged over ``n`` copies with Gaussian
    noise (sigma = ``noise`` x the image's value range), computed as one batch; a fixed ``seed``
    makes the map reproducible. ``layer`` is ignored."""
    if n < 1:
        raise ValueError(f"smoothgrad needs n >= 1 samples; got {n}")
    return _run("smoothgrad", model, image, class_index, None, engine, n=int(n), noise=noise, seed=seed)


METHODS = {
    "gradcam": gradcam,
    "gradcam_pp": gradcam_pp,
    "scorecam": scorecam,
    "scorecam_fast": scorecam_fast,
    "layercam": layercam,
    "saliency": saliency,
    "smoothgrad": smoothgrad,
}

TITLES = {
    "gradcam": "Grad-CAM",
    "gradcam_pp": "Grad-CAM++",
    "scorecam": "Score-CAM",
    "scorecam_fast": "Score-CAM (fast)",
    "layercam": "LayerCAM",
    "saliency": "Saliency",
    "smoothgrad": "SmoothGrad",
}


def explain(model, image, method: str = "gradcam", class_index: int = 0, layer=None, **kw) -> np.ndarray:
    """Dispatch to ``METHODS[method]``; extra keywords (``engine``, ``max_n``, ``n``...) pass on."""
    try:
        fn = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}") from None
    return fn(model, image, class_index=class_index, layer=layer, **kw)


_BATCHABLE = ("gradcam", "gradcam_pp", "layercam", "saliency")


def explain_many(model, images, method: str = "gradcam", class_index: int = 0, layer=None,
                 batch_size: int = 16, **kw) -> np.ndarray:
    """Maps for many images: float32 (n, H, W), each as :func:`explain` would give it.

    ``images`` is (n, H, W) raw grey at one size. Grad-CAM, Grad-CAM++, LayerCAM and saliency
    run ``batch_size`` images per compiled call on the tape engine (several times faster than
    one by one, for audits); other methods and engines loop over :func:`explain`.
    """
    imgs = np.asarray(images, dtype=np.float32)
    if imgs.ndim == 4 and imgs.shape[-1] == 1:
        imgs = imgs[..., 0]
    if imgs.ndim != 3:
        raise ValueError(f"expected images (n, H, W); got shape {np.shape(images)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    engine = kw.pop("engine", DEFAULT_ENGINE)
    if method not in _BATCHABLE or engine != "tape" or kw:
        return np.stack([explain(model, im, method, class_index, layer, engine=engine, **kw) for im in imgs]) \
            if len(imgs) else np.zeros((0,) + imgs.shape[1:], np.float32)
    ci = _check_class(model, class_index)
    nets = members(model)
    if nets and method in _CAMS:  # the mean of the members' maps, as in explain()
        maps = np.mean([explain_many(net, imgs, method, ci, layer, batch_size) for net in nets], axis=0)
        return np.stack([_finish(m, imgs.shape[1:]) for m in maps]) if len(maps) else maps
    out = np.zeros(imgs.shape, np.float32)
    for start in range(0, len(imgs), batch_size):
        chunk = imgs[start : start + batch_size]
        xs = np.concatenate([_prepare(model, im)[0] for im in chunk])
        raw = _TAPE[method](model, xs, ci, layer if method != "saliency" else None)
        out[start : start + len(chunk)] = [_finish(r, imgs.shape[1:]) for r in raw]
    return out


# --------------------------------------------------------------------------------------------
# Pictures


def colormaps() -> list[str]:
    """Names accepted by :func:`overlay` (OpenCV colour maps), e.g. jet, inferno, viridis, turbo."""
    return sorted(n[len("COLORMAP_"):].lower() for n in dir(cv2) if n.startswith("COLORMAP_"))


def _colormap(name: str) -> int:
    code = getattr(cv2, f"COLORMAP_{str(name).upper()}", None)
    if code is None:
        raise ValueError(f"unknown colormap {name!r}; choose one of {colormaps()}")
    return code


def _to_rgb(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3):
        raise ValueError(f"expected a grey (H, W) or RGB (H, W, 3) image; got shape {np.shape(image)}")
    if img.dtype != np.uint8:
        img = np.nan_to_num(img.astype(np.float32, copy=False), copy=False)
        img = (np.clip(img, 0, 255) + 0.5).astype(np.uint8)
    return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img


def quantize(heatmap) -> np.ndarray:
    """A [0, 1] heatmap as uint8 levels 0-255, the levels :func:`colorize` maps to colours
    (a quarter of the memory of float32; :func:`colorize` and :func:`overlay` take it as is)."""
    h = np.nan_to_num(np.asarray(heatmap, dtype=np.float32))
    return (np.clip(h, 0.0, 1.0) * 255).round().astype(np.uint8)


def colorize(heatmap, colormap: str = "jet", size: tuple[int, int] | None = None) -> np.ndarray:
    """A heatmap as a uint8 RGB picture, resized to ``size`` = (H, W) if given.

    ``heatmap`` is float in [0, 1], or uint8 levels from :func:`quantize` (the same colours).
    """
    h = np.asarray(heatmap).squeeze()
    if h.ndim != 2:
        raise ValueError(f"expected a 2-D heatmap; got shape {np.shape(heatmap)}")
    if h.dtype != np.uint8:
        h = np.nan_to_num(h.astype(np.float32, copy=False))
        if size is not None and h.shape != tuple(size):
            h = cv2.resize(h, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        h = quantize(h)
    elif size is not None and h.shape != tuple(size):
        h = cv2.resize(h, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(cv2.applyColorMap(h, _colormap(colormap)), cv2.COLOR_BGR2RGB)


def overlay(image, heatmap, alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped heatmap over the image: uint8 RGB (H, W, 3) at the image's size.

    ``image`` is grey (H, W) in [0, 255] (or RGB); ``heatmap`` any size in [0, 1] (resized), or
    uint8 levels from :func:`quantize`;
    ``alpha`` in [0, 1] is the heatmap's weight: 0 returns the image itself.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    rgb = _to_rgb(image)
    heat = colorize(heatmap, colormap, rgb.shape[:2])
    return cv2.addWeighted(rgb, 1.0 - float(alpha), heat, float(alpha), 0.0)


DISPLAY_MAX = 1024  # films larger than this (longer side) are downscaled for display only
OUTLINE_RGB = (255, 255, 255)
BOX_RGB = (255, 210, 0)
VIEWS = ("overlay", "side by side", "wipe")


def display_film(film, max_side: int = DISPLAY_MAX) -> np.ndarray:
    """The film (H, W) at its own resolution, downscaled (area) only when its longer side exceeds ``max_side``."""
    f = np.asarray(film, np.float32)
    if f.ndim == 3:
        f = f[..., :3].mean(axis=-1) if f.shape[-1] in (3, 4) else f[..., 0]
    h, w = f.shape
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return f
    return cv2.resize(f, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def draw_outline(rgb: np.ndarray, mask, colour=OUTLINE_RGB, thickness: int | None = None) -> np.ndarray:
    """A copy of ``rgb`` with the outline of the boolean ``mask`` drawn on it.

    The mask may be smaller than the picture (a lung mask found on a small copy of the film):
    its contour is traced at the mask's own size and scaled onto the picture, which is cheaper
    and smoother than resizing the mask.
    """
    out = np.ascontiguousarray(rgb).copy()
    m = (np.asarray(mask) > 0).astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    sy, sx = out.shape[0] / m.shape[0], out.shape[1] / m.shape[1]
    scale = np.array([sx, sy], np.float32)
    shift = (scale - 1) / 2  # pixel centres: mask pixel k covers picture pixels k*s .. (k+1)*s
    contours = [np.round(c.astype(np.float32) * scale + shift).astype(np.int32) for c in contours]
    t = thickness or max(1, round(max(out.shape[:2]) / 400))
    cv2.polylines(out, contours, True, colour, t, cv2.LINE_AA)
    return out


def draw_box(rgb: np.ndarray, box, colour=BOX_RGB) -> np.ndarray:
    """A copy of ``rgb`` with a fractional box (y0, x0, y1, x1) drawn on it (the region a cropped network saw)."""
    out = np.ascontiguousarray(rgb).copy()
    h, w = out.shape[:2]
    y0, x0, y1, x1 = (int(round(v)) for v in (box[0] * h, box[1] * w, box[2] * h - 1, box[3] * w - 1))
    cv2.rectangle(out, (x0, y0), (x1, y1), colour, max(1, round(max(h, w) / 400)), cv2.LINE_AA)
    return out


def wipe(base: np.ndarray, top: np.ndarray, position: float) -> np.ndarray:
    """``top`` left of ``position`` (fraction of the width), ``base`` right of it, a thin line between."""
    if base.shape != top.shape:
        raise ValueError(f"wipe needs two images of one shape; got {base.shape} and {top.shape}")
    w = base.shape[1]
    cut = int(round(np.clip(position, 0.0, 1.0) * w))
    out = base.copy()
    out[:, :cut] = top[:, :cut]
    if 0 < cut < w:
        out[:, max(0, cut - 1) : cut + 1] = 255
    return out


def film_views(film, heat_film, view: str = "overlay", alpha: float = 0.4, colormap: str = "jet",
               lung_mask=None, box=None, position: float = 0.5) -> list[np.ndarray]:
    """The pictures of one view of a heatmap on the original film, each uint8 RGB at the film's size.

    ``film`` is the grey film at display resolution, ``heat_film`` the map already on it
    (:func:`core.inputs.to_film`; float in [0, 1] or uint8 levels from :func:`quantize`).
    ``view``: ``"overlay"`` -> [overlay]; ``"side by side"`` -> [film, overlay] (to be shown with
    linked zoom); ``"wipe"`` -> [overlay left of ``position``, film right of it]. ``lung_mask`` draws the lungs' outline on every picture; ``box`` (not the
    whole film) marks the region a lung-cropped network saw.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose one of {VIEWS}")
    plain = _to_rgb(film)
    over = overlay(plain, heat_film, alpha, colormap)
    pics = {"overlay": [over], "side by side": [plain, over], "wipe": [wipe(plain, over, position)]}[view]
    out = []
    for pic in pics:
        if lung_mask is not None:
            pic = draw_outline(pic, lung_mask)
        if box is not None and tuple(box) != (0.0, 0.0, 1.0, 1.0):
            pic = draw_box(pic, box)
        out.append(pic)
    return out


def _title_bar(text: str, width: int) -> np.ndarray:
    height = max(18, int(round(width * 0.09)))
    bar = np.zeros((height, width, 3), np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = height / 40.0
    thick = 1 if height < 40 else 2
    while len(text) > 1 and cv2.getTextSize(text, font, scale, thick)[0][0] > width - 6:
        text = text[:-1]
    (tw, th), _ = cv2.getTextSize(text, font, scale, thick)
    org = (max(3, (width - tw) // 2), (height + th) // 2)
    cv2.putText(bar, text, org, font, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return bar


def panel(image, maps: dict, alpha: float = 0.4, colormap: str = "jet", show_image: bool = True,
          gap: int = 4) -> np.ndarray:
    """Side-by-side overlays with a title above each: uint8 RGB (title + H, k * (W + gap) - gap, 3).

    ``maps`` is {title: heatmap}; method keys of :data:`METHODS` get their display names. With
    ``show_image`` the plain image comes first, titled "image".
    """
    rgb = _to_rgb(image)
    h, w = rgb.shape[:2]
    tiles = [("image", rgb)] if show_image else []
    tiles += [(TITLES.get(k, str(k)), overlay(rgb, m, alpha, colormap)) for k, m in maps.items()]
    if not tiles:
        raise ValueError("panel needs at least one map or show_image=True")
    columns = []
    for title, tile in tiles:
        columns.append(np.concatenate([_title_bar(title, w), tile], axis=0))
        columns.append(np.full((columns[-1].shape[0], gap, 3), 255, np.uint8))
    return np.concatenate(columns[:-1], axis=1)


# --------------------------------------------------------------------------------------------
# CLI


def _write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path}")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)


def _class_index(arg: str | None, classes: tuple[str, ...]) -> int:
    if arg is None:
        return config.COVID_INDEX
    if arg in classes:
        return classes.index(arg)
    if arg.isdigit() and int(arg) < len(classes):
        return int(arg)
    raise ValueError(f"unknown class {arg!r}; choose one of {list(classes)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m core.explain",
        description="Explain one chest X-ray: print the class probabilities and write a heatmap overlay PNG.",
    )
    p.add_argument("image", help="image file (PNG, JPEG or DICOM)")
    p.add_argument("--method", default="gradcam", choices=sorted(METHODS), help="explanation method (default gradcam)")
    p.add_argument("--class", dest="cls", default=None,
                   help="class to explain, by name (covid, other, ...) or index (default covid)")
    p.add_argument("--layer", default=None, help="conv layer to explain (default last_conv)")
    p.add_argument("--run", default=None, help="run folder or name (default: the shipped model in assets/model)")
    p.add_argument("--out", default="overlay.png", help="output PNG (default overlay.png)")
    p.add_argument("--alpha", type=float, default=0.4, help="heatmap opacity in [0, 1] (default 0.4)")
    p.add_argument("--colormap", default="jet", help=f"OpenCV colour map: {', '.join(colormaps())}")
    p.add_argument("--engine", default=DEFAULT_ENGINE, choices=ENGINES, help="implementation (default tape)")
    p.add_argument("--data", default=None, help="data root; IMAGE is looked up there if not found as given")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args(argv)

    from core import images, inputs, runs

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if args.colormap.lower() not in colormaps():
        return fail(f"unknown colormap {args.colormap!r}; choose one of {', '.join(colormaps())}")
    if not 0.0 <= args.alpha <= 1.0:
        return fail(f"--alpha must be in [0, 1]; got {args.alpha}")
    src = Path(args.image)
    if not src.exists() and args.data:
        alt = config.data_dir(args.data) / args.image
        src = alt if alt.exists() else src
    try:
        run = runs.resolve_run(args.run)
        cfg = runs.read_config(run) if (Path(run) / "config.json").is_file() else {}
        model = runs.load_model(run)
    except (runs.RunError, OSError, ValueError) as exc:
        return fail(str(exc))
    classes = tuple(cfg.get("classes") or config.classes(cfg.get("task", "binary")))
    try:
        ci = _class_index(args.cls, classes)
    except ValueError as exc:
        return fail(str(exc))
    size = input_size(model)
    try:
        img, box, fell_back, film = inputs.load(src, size[0] or cfg.get("size"), inputs.settings(cfg))
    except images.ImageError as exc:
        return fail(f"cannot read image {exc.name}: {exc.reason}")
    if fell_back:
        print(f"warning: {inputs.FALLBACK_WARNING}", file=sys.stderr)
    t0 = time.perf_counter()
    probs = np.asarray(model(img[None, :, :, None], training=False))[0]
    try:
        heat = explain(model, img, args.method, class_index=ci, layer=args.layer, engine=args.engine)
    except (ValueError, EngineError) as exc:
        return fail(str(exc))
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    # drawn on the original film: the map goes back onto the region the network saw
    _write_png(out, overlay(film, inputs.to_film(heat, box, film.shape), args.alpha, args.colormap))
    result = {
        "image": str(src),
        "run": str(run),
        "method": args.method,
        "class": classes[ci] if ci < len(classes) else str(ci),
        "class_index": ci,
        "layer": args.layer or default_layer(model),
        "p_covid": float(probs[config.COVID_INDEX]),
        "box": list(box),
        "lung_crop_fell_back": fell_back,
        "probabilities": {c: float(v) for c, v in zip(classes, probs, strict=False)},
        "out": str(out),
        "seconds": round(seconds, 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"P(covid) = {result['p_covid']:.3f}  ({', '.join(f'{c}: {v:.3f}' for c, v in result['probabilities'].items())})")
        print(f"{TITLES[args.method]} for class {result['class']!r} at layer {result['layer']!r} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
