"""Model plumbing shared by both engines: layers, the pre-softmax view, input and map shaping.

Why logits: every method explains the pre-softmax score (the ``logits`` layer). A saturated
softmax has near-zero gradients and gives blank maps. The model itself is never modified: the
explanations run on a cached "linear" view of it (a sub-model ending at ``logits`` that shares
the original's layers, so it also follows any later change to the weights). Only a model without
a ``logits`` layer or a separate softmax Activation is cloned, with its final activation set to
linear (that copy is a snapshot of the weights at first use).
"""

from __future__ import annotations

import os
import threading

import cv2
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from core import keras_adapter  # noqa: E402
from core import model as cmodel  # noqa: E402

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


def target(model: keras.Model, layer=None):
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
    found_layer = (top or found)[0]
    nested = not any(found_layer is t for t in model.layers)
    shape = (keras_adapter.output_in(model, found_layer) if not nested else found_layer.output).shape
    if len(shape) != 4:
        raise ValueError(f"layer {found_layer.name!r} has output shape {tuple(shape)}; "
                         "a CAM needs a spatial (batch, h, w, channels) layer")
    return found_layer, nested


def _make_linear(model: keras.Model) -> keras.Model:
    names = [layer.name for layer in model.layers]
    if "logits" in names:
        out = keras_adapter.output_in(model, model.get_layer("logits"))
        return keras.Model(model.inputs, out, name=f"{model.name}_logits")
    last = model.layers[-1]
    act = getattr(last, "activation", None)
    act_name = getattr(act, "__name__", str(act))
    if isinstance(last, keras.layers.Activation) and act_name in ("softmax", "sigmoid"):
        return keras.Model(model.inputs, keras_adapter.input_in(model, last), name=f"{model.name}_logits")
    if act_name in ("softmax", "sigmoid"):
        # Only case that needs a copy: the final layer computes and activates in one step.
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        clone.layers[-1].activation = keras.activations.linear
        return clone
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
