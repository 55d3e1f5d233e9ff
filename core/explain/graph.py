"""Model plumbing shared by both engines: layers, the pre-softmax view, input and map shaping.

Why logits: every method explains the pre-softmax score (the ``logits`` layer). A saturated
softmax has near-zero gradients and gives blank maps. The model itself is never modified: the
explanations run on a cached "linear" view of it (a sub-model ending at ``logits`` that shares
the original's layers, so it also follows any later change to the weights). Only a model without
a ``logits`` layer or a separate softmax Activation is cloned, with its final activation set to
linear (that copy is a snapshot of the weights at first use).

Any Keras model: an adopted model (``core.adopt``) is a wrapper (preprocessing -> one nested
network ``adopted`` -> ``probs``) whose final softmax or sigmoid may live inside the nested
network. Its view runs the preprocessing and the network up to that activation, then a fixed
``logits`` Dense that maps the units to the wrapper's columns, matched numerically on a few probe
inputs (a one-unit sigmoid's [p, 1 - p] columns become [z/2, -z/2], whose softmax is p; a
multi-label head's chosen unit likewise). CAM layers are found at any nesting depth and can be
named by path (``adopted/conv5``). A model wrapping a SavedModel signature (TFSMLayer) is a
black box: :func:`applicable` says which methods apply to it and why the others do not.
"""

from __future__ import annotations

import os
import threading

import cv2
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from core import keras_adapter  # noqa: E402
from core import model as cmodel  # noqa: E402
from core.explain import registry  # noqa: E402

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

LOCK = threading.RLock()  # guards the per-model caches of compiled functions


class EngineError(RuntimeError):
    """The requested engine cannot compute this map (e.g. tf-keras-vis and a nested layer)."""


def _walk(model, path=()):
    """Yield (layer, path of enclosing sub-models) for every layer, depth first, in model order."""
    return cmodel.walk(model, path)


def _is_conv(layer) -> bool:
    return isinstance(layer, _CONV_TYPES) and len(layer.output.shape) == 4


def is_blackbox(model: keras.Model) -> bool:
    """True when the model's layers cannot be reached: it wraps a SavedModel signature (TFSMLayer)."""
    return any(keras_adapter.is_savedmodel_layer(layer) for layer, _ in _walk(model))


def conv_layers(model: keras.Model) -> list[str]:
    """Names of the spatial convolution layers (4-D output) that can be explained, input to output.

    Layers inside nested sub-models (a wrapped backbone, an adopted network, a lung-segmentation
    gate) are included at any depth; the tape engine handles them, and any of them can also be
    named by its path (``adopted/conv5``). An ensemble's members share their layer names, so each
    name is listed once.
    """
    return list(dict.fromkeys(layer.name for layer, _ in _walk(model) if _is_conv(layer)))


def _block_end(model: keras.Model):
    """(layer, path) of the last layer of the last convolution's block: the last layer after the
    last spatial convolution, in the same sub-model, whose output keeps that convolution's grid
    (DenseNet's final ``relu``, ResNet's ``conv5_block3_out``, a plain CNN's last conv)."""
    walked = list(_walk(model))
    convs = [i for i, (layer, _) in enumerate(walked) if _is_conv(layer)]
    if not convs:
        return None, ()
    layer, path = walked[convs[-1]]
    grid = tuple(layer.output.shape[1:3])
    for nxt, p in walked[convs[-1] + 1:]:
        out = None if isinstance(nxt, keras.Model) else getattr(nxt, "output", None)
        shape = getattr(out, "shape", None)
        if p != path or shape is None or len(shape) != 4 or tuple(shape[1:3]) != grid:
            break
        layer = nxt
    return layer, path


def default_layer(model: keras.Model) -> str:
    """``last_conv`` if the model has it (anywhere), else the last top-level convolution, else the
    end of the last convolution's block at any nesting depth (:func:`_block_end`); its plain name
    when unique in the model, else its path (``adopted/conv5``)."""
    names = [layer.name for layer, _ in _walk(model)]
    if "last_conv" in names:
        return "last_conv"
    for layer in reversed(model.layers):
        if _is_conv(layer):
            return layer.name
    layer, path = _block_end(model)
    if layer is None:
        why = ("its layers cannot be reached (a TensorFlow SavedModel signature)" if is_blackbox(model)
               else "it has no spatial convolution layer")
        raise ValueError(f"model {model.name!r} cannot be explained by a CAM method: {why}")
    return layer.name if names.count(layer.name) == 1 else cmodel.qualified(layer, path)


def target(model: keras.Model, layer=None):
    """(layer, nested?) in the linear view of ``model``, from a name (plain or a path such as
    ``adopted/conv5``), a layer or None (default)."""
    if layer is None:
        layer = default_layer(model)
    if isinstance(layer, keras.layers.Layer):
        layer = layer.name
    return _find_layer(linear_model(model), layer)


def _find_layer(model: keras.Model, layer):
    """(layer object, nested?) for a layer name or path in ``model``."""
    try:
        found_layer, path = cmodel.find_layer(model, layer)
    except ValueError:
        raise ValueError(f"the model has no layer {layer!r}; conv layers: {conv_layers(model)}") from None
    nested = bool(path)
    shape = (keras_adapter.output_in(model, found_layer) if not nested else found_layer.output).shape
    if len(shape) != 4:
        raise ValueError(f"layer {found_layer.name!r} has output shape {tuple(shape)}; "
                         "a CAM needs a spatial (batch, h, w, channels) layer")
    return found_layer, nested


def _final_activation(layer) -> str | None:
    act = getattr(layer, "activation", None)
    name = getattr(act, "__name__", str(act))
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    return name if name in ("softmax", "sigmoid") else None


def _one(tensors):
    return tensors[0] if isinstance(tensors, (list, tuple)) and len(tensors) == 1 else tensors


def _pre_activation(net: keras.Model):
    """(a model from ``net``'s input to its pre-activation output, "softmax" | "sigmoid"), or
    (None, None) when ``net`` does not end in one. Follows nested models at its end (a wrapped
    network); only a Dense-with-activation end is cloned (the copy snapshots the weights)."""
    last = net.layers[-1]
    kind = _final_activation(last)
    if kind and isinstance(last, (keras.layers.Activation, keras.layers.Softmax)):
        return keras.Model(_one(net.inputs), keras_adapter.input_in(net, last), name=net.name), kind
    if kind:
        clone = keras.models.clone_model(net)
        clone.set_weights(net.get_weights())
        clone.layers[-1].activation = keras.activations.linear
        return clone, kind
    if isinstance(last, keras.Model):
        inner, kind = _pre_activation(last)
        if inner is not None:
            return keras.Model(_one(net.inputs), inner(keras_adapter.input_in(net, last)), name=net.name), kind
    return None, None


def _probe_inputs(model: keras.Model) -> np.ndarray:
    """A few raw grey inputs (noise, ramps, constants) to match the model's columns numerically."""
    h, w = input_hw(model)
    h, w, c = h or 64, w or 64, int(model.inputs[0].shape[-1] or 1)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, h * w, dtype=np.float32).reshape(h, w)
    x = [rng.uniform(0, 255, (h, w)), rng.normal(120, 40, (h, w)), ramp, ramp.T if h == w else ramp[::-1],
         np.full((h, w), 30.0), np.full((h, w), 200.0)]
    return np.clip(np.stack(x), 0, 255).astype(np.float32)[..., None].repeat(c, axis=-1)


def _column_weights(p: np.ndarray, s: np.ndarray, kind: str) -> np.ndarray | None:
    """(units, columns) weights mapping the pre-activations to logits whose softmax is the model's
    output: each output column is matched to the unit whose activation it equals (or 1 - it, for
    a sigmoid: the [p, 1 - p] columns of a one-unit head). None when a column matches no unit."""
    w = np.zeros((s.shape[1], p.shape[1]), np.float32)
    scale = 0.5 if kind == "sigmoid" else 1.0  # softmax([z/2, -z/2]) = sigmoid(z): the model's own P
    for j in range(p.shape[1]):
        cands = [(np.abs(s[:, k] - p[:, j]).max(), k, 1.0) for k in range(s.shape[1])]
        if kind == "sigmoid":
            cands += [(np.abs(1.0 - s[:, k] - p[:, j]).max(), k, -1.0) for k in range(s.shape[1])]
        err, k, sign = min(cands, key=lambda c: c[0])
        if err > 1e-3:
            return None
        w[k, j] = sign * scale
    return w


def _nested_linear(model: keras.Model) -> keras.Model | None:
    """The pre-activation view of a wrapper whose final softmax / sigmoid lives inside its last
    nested model (an adopted network): preprocessing -> that network up to its pre-activation ->
    a fixed Dense ``logits`` that picks (and, for [p, 1 - p] columns, mirrors) the units."""
    nets = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if not nets:
        return None
    net = nets[-1]
    pre, kind = _pre_activation(net)
    if pre is None:
        return None
    x = _probe_inputs(model)
    p = np.asarray(model(x, training=False), np.float64)
    z = np.asarray(keras.Model(_one(model.inputs), pre(keras_adapter.input_in(model, net)))(x, training=False),
                   np.float64).reshape(len(x), -1)
    if kind == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-z))
    else:
        e = np.exp(z - z.max(-1, keepdims=True))
        s = e / e.sum(-1, keepdims=True)
    w = _column_weights(p.reshape(len(x), -1), s, kind)
    if w is None:
        return None
    head = keras.layers.Dense(w.shape[1], use_bias=False, trainable=False, name="logits")
    out = head(pre(keras_adapter.input_in(model, net)))
    head.set_weights([w])
    return keras.Model(_one(model.inputs), out, name=f"{model.name}_logits")


def _make_linear(model: keras.Model) -> keras.Model:
    names = [layer.name for layer in model.layers]
    if "logits" in names:
        out = keras_adapter.output_in(model, model.get_layer("logits"))
        return keras.Model(model.inputs, out, name=f"{model.name}_logits")
    last = model.layers[-1]
    act_name = _final_activation(last)
    if isinstance(last, (keras.layers.Activation, keras.layers.Softmax)) and act_name:
        return keras.Model(model.inputs, keras_adapter.input_in(model, last), name=f"{model.name}_logits")
    if act_name:
        # The final layer computes and activates in one step: a copy with a linear activation.
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        clone.layers[-1].activation = keras.activations.linear
        return clone
    if not is_blackbox(model):
        nested = _nested_linear(model)  # an adopted network whose softmax / sigmoid is inside it
        if nested is not None:
            return nested
    return model


def state(model: keras.Model) -> dict:
    """{"linear": the pre-softmax view, "fns": compiled tapes}, in core.model's per-model cache."""
    return cmodel.cached(model, "explain", lambda m: {"linear": _make_linear(m), "fns": {}})


def linear_model(model: keras.Model) -> keras.Model:
    """The cached pre-softmax view of ``model`` (outputs logits); ``model`` is not modified."""
    return state(model)["linear"]


def input_hw(model: keras.Model) -> tuple[int | None, int | None]:
    """(height, width) the model expects (None where it takes any size)."""
    shape = model.inputs[0].shape
    return tuple(None if d is None else int(d) for d in shape[1:3])


def prepare(model: keras.Model, image) -> tuple[np.ndarray, tuple[int, int]]:
    """A (1, h, w, 1) float32 batch at the model's size, and the caller's (H, W)."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim != 2:
        raise ValueError(f"expected one grey image (H, W) or (H, W, 1); got shape {np.shape(image)}")
    out_hw = img.shape
    img = np.nan_to_num(img, nan=0.0, posinf=255.0, neginf=0.0)
    h, w = input_hw(model)
    h, w = h or img.shape[0], w or img.shape[1]
    if img.shape != (h, w):
        interp = cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_LINEAR
        img = cv2.resize(img, (w, h), interpolation=interp)
    return img[None, :, :, None], out_hw


def finish(m, out_hw) -> np.ndarray:
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


def check_class(model: keras.Model, class_index: int) -> int:
    """``class_index`` as an int; ValueError if the model has no such output."""
    n = int(linear_model(model).outputs[0].shape[-1])
    ci = int(class_index)
    if not 0 <= ci < n:
        raise ValueError(f"class_index {class_index} out of range for a model with {n} classes")
    return ci


def compiled(model: keras.Model, key, build):
    """``build(linear view)`` (a compiled function), made once per model and ``key``."""
    st = state(model)
    with LOCK:
        fn = st["fns"].get(key)
        if fn is None:
            fn = st["fns"][key] = build(st["linear"])
        return fn


def _has_input_gradients(model: keras.Model) -> bool:
    """True when d output / d input can be computed (a SavedModel signature may not allow it)."""
    x = tf.constant(_probe_inputs(model)[:2])
    try:
        with tf.GradientTape() as tape:
            tape.watch(x)
            score = tf.reduce_sum(linear_model(model)(x, training=False))
        grads = tape.gradient(score, x)
    except Exception:  # noqa: BLE001 - e.g. LookupError: no gradient defined for an op of the signature
        return False
    return grads is not None and bool(np.isfinite(grads.numpy()).all())


def _applicable(model: keras.Model) -> dict:
    try:
        default_layer(model)
        cam = None
    except ValueError as exc:
        cam = str(exc).split(": ", 1)[-1]
    grad = None if _has_input_gradients(model) else (
        "no gradients flow from its output back to the pixels (a SavedModel signature without them)")
    return {m.name: {"cam": cam, "gradient": grad}.get(m.kind) for m in registry.REGISTRY}


def applicable(model: keras.Model) -> dict[str, str | None]:
    """{method: None if it applies to ``model``, else the reason it does not}, for every method.

    The CAM family needs a reachable spatial convolution layer (none behind a SavedModel
    signature); saliency and SmoothGrad need gradients from the output to the pixels; the
    output-only methods (occlusion, RISE) need only ``model(x)`` and always apply. Cached per model.
    """
    return dict(cmodel.cached(model, "applicable", _applicable))
