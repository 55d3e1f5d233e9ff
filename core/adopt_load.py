"""Loading someone else's Keras model and wrapping it in our contract (used by :mod:`core.adopt`).

A model file is code: before anything is deserialised, :func:`scan` reads the model's
configuration (``config.json`` inside a ``.keras`` zip, the ``model_config`` attribute of a
legacy Keras 2 ``.h5``) and lists ``Lambda`` layers and classes that are not Keras' own; they
are refused (:class:`AdoptError` naming them) unless the caller trusts the file. A TensorFlow
SavedModel folder is a black box: its graph runs without Python code, but its layers cannot be
reached, so only output-only explanations apply.

:func:`wrap` builds ONE Functional model that takes raw grey films ``(size, size, 1)`` in
[0, 255] like every model of this project: the declared preprocessing as standard layers
(:data:`PREPROCESS`), the adopted network as one nested layer named ``adopted`` (cut before its
classification head, so its output is the penultimate features), the head re-made as a linear
``logits`` layer and a softmax ``probs``. A one-unit sigmoid head ``z`` becomes logits
``[z, 0]``: softmax of those is ``[sigmoid(z), 1 - sigmoid(z)]`` exactly.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import keras
import numpy as np
import tensorflow as tf
from keras import layers

from core import keras_adapter

# Named preprocessing conventions, as specs of :func:`preprocess_layers`: the grey film (0-255)
# is multiplied by ``scale``, plus ``offset``; ``per_image`` standardises each film; ``mean`` and
# ``std`` (per channel, after scaling) normalise as keras.applications' ``caffe``/``torch`` modes.
PREPROCESS = {
    "grey01": {"scale": 1 / 255},
    "grey_std": {"scale": 1 / 255, "per_image": True},
    "rgb255": {"scale": 1.0},
    "caffe": {"scale": 1.0, "mean": [103.939, 116.779, 123.68], "std": [1.0, 1.0, 1.0]},
    "torch": {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
}
SPEC_KEYS = {"scale", "offset", "per_image", "mean", "std", "name"}
HEAD_ACTIVATIONS = ("softmax", "sigmoid")


class AdoptError(ValueError):
    """A model that cannot be adopted as asked (the message says why and what to pass)."""


# --------------------------------------------------------------------------- what the file is


def model_format(path) -> str:
    """``"keras"``, ``"h5"`` or ``"savedmodel"`` for a model file or folder; AdoptError otherwise."""
    p = Path(path)
    if p.is_dir():
        if (p / "saved_model.pb").is_file():
            return "savedmodel"
        raise AdoptError(f"{p} is a folder without saved_model.pb: not a TensorFlow SavedModel.")
    if not p.is_file():
        raise AdoptError(f"{p} does not exist.")
    if zipfile.is_zipfile(p):
        return "keras"
    if h5py.is_hdf5(p):
        return "h5"
    raise AdoptError(f"{p} is neither a .keras file, a Keras 2 .h5 file nor a SavedModel folder.")


def read_model_config(path, fmt: str) -> dict:
    """The model's architecture as JSON, read without deserialising any object."""
    try:
        if fmt == "keras":
            with zipfile.ZipFile(path) as z:
                return json.loads(z.read("config.json"))
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            if raw is None:
                raise AdoptError(f"{path} holds weights only (no model_config): save the whole model, not weights.")
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (KeyError, OSError, json.JSONDecodeError, zipfile.BadZipFile) as exc:
        raise AdoptError(f"{path} has no readable model configuration ({exc}).") from None


def _known_layer(name: str) -> bool:
    return name in ("Functional", "Model", "Sequential") or isinstance(getattr(layers, name, None), type)


def scan(cfg: dict) -> dict:
    """Code in a model configuration: ``{"lambda": [layer names], "custom": [class names]}``.

    A layer is custom when its class is not one of Keras' layers (Keras 2 ``.h5``) or its module
    is not Keras' (``.keras``); nested models are walked.
    """
    found = {"lambda": [], "custom": []}

    def check(layer):
        cls, conf = layer.get("class_name"), layer.get("config") or {}
        name = f"{conf.get('name', '?')} ({cls})"
        module = layer.get("module")
        if cls in ("Lambda", "TFOpLambda", "SlicingOpLambda"):
            found["lambda"].append(name)
        elif not isinstance(cls, str) or not _known_layer(cls) or (
                isinstance(module, str) and module.split(".")[0] != "keras"):
            found["custom"].append(name)

    def walk(node):
        if isinstance(node, dict):
            for key, v in node.items():
                if key == "layers" and isinstance(v, list):
                    for layer in v:
                        if isinstance(layer, dict):
                            check(layer)
                elif key == "layer" and isinstance(v, dict) and "class_name" in v:
                    check(v)  # a wrapper's inner layer (TimeDistributed, Bidirectional)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(cfg.get("config", cfg))
    return found


def refuse_code(path, found: dict) -> None:
    """AdoptError naming the Lambda layers and custom objects of a model file, if it has any."""
    parts = []
    if found["lambda"]:
        parts.append("Lambda layer(s) " + ", ".join(found["lambda"]))
    if found["custom"]:
        parts.append("custom object(s) " + ", ".join(found["custom"]))
    if parts:
        raise AdoptError(f"{Path(path).name} contains Python code: {'; '.join(parts)}. A model file is code: "
                         "pass --trust-code only if you trust where it came from (custom classes must be "
                         "importable: --code FILE.py).")


def load_source(path, trust_code: bool = False):
    """``(model or None, format, scan)``: a .keras/.h5 model loaded (safe mode unless trusted); for a
    SavedModel folder ``None`` (a black box: :func:`blackbox_model` wraps it)."""
    fmt = model_format(path)
    if fmt == "savedmodel":
        return None, fmt, {"lambda": [], "custom": []}
    found = scan(read_model_config(path, fmt))
    if not trust_code:
        refuse_code(path, found)
    try:
        model = load_keras(path, trusted=trust_code)
    except Exception as exc:  # Keras raises many kinds; one sentence with its first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AdoptError(f"{Path(path).name} could not be loaded: {first[:300]}") from None
    return model, fmt, found


# --------------------------------------------------------------------------- preprocessing


def preprocess_spec(arg) -> dict:
    """A preprocessing spec from a name of :data:`PREPROCESS`, a JSON file path or a dict."""
    if isinstance(arg, dict):
        spec = dict(arg)
    elif arg in PREPROCESS:
        spec = {"name": arg, **PREPROCESS[arg]}
    elif arg and Path(arg).is_file():
        try:
            spec = json.loads(Path(arg).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AdoptError(f"--preprocess {arg}: not a readable JSON spec ({exc}).") from None
        spec.setdefault("name", Path(arg).name)
    else:
        raise AdoptError(f"--preprocess {arg!r}: choose one of {', '.join(PREPROCESS)} or a JSON spec file.")
    unknown = set(spec) - SPEC_KEYS
    if not isinstance(spec, dict) or unknown:
        raise AdoptError(f"preprocessing spec has unknown key(s) {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}.")
    return spec


def preprocess_layers(x, spec: dict, channels: int):
    """Apply ``spec`` to a raw grey tensor ``x`` (..., 1) with standard layers; ``channels`` out."""
    if channels == 3:
        x = layers.Concatenate(name="to_rgb")([x, x, x])
    elif channels != 1:
        raise AdoptError(f"the model takes {channels} input channels; only 1 (grey) or 3 (RGB) can be fed a film.")
    scale, offset = float(spec.get("scale", 1.0)), float(spec.get("offset", 0.0))
    if (scale, offset) != (1.0, 0.0):
        x = layers.Rescaling(scale, offset, name="pre_scale")(x)
    if spec.get("per_image"):
        x = layers.LayerNormalization(axis=[1, 2, 3], center=False, scale=False, epsilon=1e-6, name="pre_standardise")(x)
    if spec.get("mean") is not None:
        mean = np.broadcast_to(np.asarray(spec["mean"], np.float32), (channels,))
        std = np.broadcast_to(np.asarray(spec.get("std", 1.0), np.float32), (channels,))
        x = layers.Normalization(mean=mean.tolist(), variance=(std**2).tolist(), name="pre_normalise")(x)
    return x


# --------------------------------------------------------------------------- the head


@dataclass
class Head:
    """Where the chosen output comes from: ``features`` (the head's input tensor), the head's
    ``kernel``/``bias`` (None when the output is not a Dense layer's), its ``activation``, the
    chosen ``unit`` (multi-label sigmoid) or None, and ``output`` (the tensor when no Dense)."""

    features: object
    kernel: np.ndarray | None
    bias: np.ndarray | None
    activation: str
    unit: int | None
    output: object
    n_units: int


def _activation_name(layer) -> str | None:
    act = getattr(layer, "activation", None)
    name = getattr(act, "__name__", None) or (act if isinstance(act, str) else None)
    return name if name in HEAD_ACTIVATIONS + ("linear",) else None


def pick_output(model, output):
    """The output tensor named ``output`` (a layer or output name), or the ``output``-th output
    (int); the only one when ``output`` is None. Returns ``(tensor, name)``."""
    outs = list(model.outputs)
    names = [producer(model, t).name for t in outs]
    if output is None:
        if len(outs) > 1:
            raise AdoptError(f"the model has {len(outs)} outputs ({', '.join(names)}): choose one with --output NAME "
                             "or --output-index I.")
        return outs[0], names[0]
    if isinstance(output, int):
        if not 0 <= output < len(outs):
            raise AdoptError(f"--output-index {output}: the model has {len(outs)} output(s).")
        return outs[output], names[output]
    if output in names:
        return outs[names.index(output)], output
    raise AdoptError(f"--output {output!r}: the model's outputs are {', '.join(names)}.")


def producer(model, tensor):
    """The layer of ``model`` whose output (in ``model``'s graph) is ``tensor``."""
    for layer in reversed(model.layers):
        if keras_adapter.output_in(model, layer) is tensor:
            return layer
    raise AdoptError(f"cannot find the layer that makes output {tensor.name} of {model.name}.")


def find_head(model, tensor, unit: int | None) -> Head:
    """Trace ``tensor`` back to its Dense head (optionally behind an Activation layer)."""
    layer = producer(model, tensor)
    n = int(tensor.shape[-1])
    act = _activation_name(layer)
    if isinstance(layer, layers.Activation) and act in HEAD_ACTIVATIONS:
        feats = keras_adapter.input_in(model, layer)
        prev = producer(model, feats)
        if not (isinstance(prev, layers.Dense) and _activation_name(prev) == "linear"):
            return Head(feats, None, None, act, unit, tensor, n)
        layer = prev
    if isinstance(layer, layers.Dense) and act in HEAD_ACTIVATIONS + ("linear",):
        weights = [np.asarray(w, np.float32) for w in layer.get_weights()]
        bias = weights[1] if layer.use_bias else np.zeros(n, np.float32)
        if act == "linear":  # a model that outputs logits: read them as its training loss would
            act = "sigmoid" if n == 1 else "softmax"
        return Head(keras_adapter.input_in(model, layer), weights[0], bias, act, unit, tensor, n)
    act = "sigmoid" if n == 1 else "softmax"  # probabilities of unknown make: read them as they come
    return Head(tensor, None, None, act, unit, tensor, n)


def head_layers(head: Head, feats):
    """The wrapper's ``logits`` (or None) and ``probs`` on top of the adopted network's output."""
    if head.kernel is not None:
        if head.activation == "sigmoid":
            u = head.unit if head.unit is not None else 0
            kernel = np.concatenate([head.kernel[:, u : u + 1], np.zeros_like(head.kernel[:, :1])], axis=1)
            bias = np.asarray([head.bias[u], 0.0], np.float32)
        else:
            kernel, bias = head.kernel, head.bias
        dense = layers.Dense(kernel.shape[1], name="logits")
        logits = dense(feats)
        dense.set_weights([kernel, bias])
        return logits, layers.Activation("softmax", name="probs")(logits)
    probs = feats
    if head.activation == "sigmoid":
        if head.n_units > 1:
            probs = select_unit(probs, head.unit or 0, head.n_units, "unit")
        return None, two_columns(probs)
    return None, layers.Identity(name="probs")(probs)


def select_unit(x, unit: int, n: int, name: str):
    """Unit ``unit`` of an (n,) vector as (1,), by a fixed one-hot Dense (no Lambda)."""
    pick = layers.Dense(1, use_bias=False, trainable=False, name=name)
    out = pick(x)
    onehot = np.zeros((n, 1), np.float32)
    onehot[unit, 0] = 1.0
    pick.set_weights([onehot])
    return out


def two_columns(p):
    """``[p, 1 - p]`` of a one-unit probability, in standard layers, as the output ``probs``."""
    q = layers.Rescaling(-1.0, offset=1.0, name="complement")(p)
    return layers.Concatenate(name="probs")([p, q])


# --------------------------------------------------------------------------- the wrapper


def input_shape(model) -> tuple[int | None, int | None, int]:
    """(height, width, channels) of a model's one image input."""
    if len(model.inputs) != 1:
        raise AdoptError(f"the model has {len(model.inputs)} inputs; only one-image models can be adopted.")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise AdoptError(f"the model's input has shape {shape}; an image model takes (batch, height, width, channels).")
    return shape[1], shape[2], int(shape[3])


def choose_size(hw: tuple[int | None, int | None], size: int | None) -> int:
    """The side of the square films we feed: ``size``, else the model's own when square."""
    if size:
        return int(size)
    if hw[0] and hw[0] == hw[1]:
        return int(hw[0])
    if hw[0] is None and hw[1] is None:
        raise AdoptError("the model takes any input size: give the side to feed it with --size (e.g. 224).")
    raise AdoptError(f"the model takes {hw[0]}x{hw[1]} films: give --size (the films are resized to it inside).")


def front(spec: dict, size: int, hw, channels: int):
    """The wrapper's input ``image`` (size, size, 1) and the preprocessed tensor the network takes."""
    raw = keras.Input((size, size, 1), name="image")
    x = raw
    if hw[0] and hw[1] and (hw[0], hw[1]) != (size, size):
        x = layers.Resizing(int(hw[0]), int(hw[1]), name="pre_resize")(x)
    return raw, preprocess_layers(x, spec, channels)


def wrap(model, spec: dict, size: int | None = None, output=None, unit: int | None = None):
    """The adopted model in our contract (see the module docstring) and what was found:
    ``(wrapper, {"size", "channels", "output", "activation", "n_units", "logits": bool})``."""
    hw = input_shape(model)[:2]
    channels = input_shape(model)[2]
    size = choose_size(hw, size)
    tensor, out_name = pick_output(model, output)
    head = find_head(model, tensor, unit)
    if head.unit is not None and not 0 <= head.unit < head.n_units:
        raise AdoptError(f"unit {head.unit} of output {out_name!r}: it has {head.n_units} unit(s).")
    if head.activation == "sigmoid" and head.n_units > 1 and head.unit is None:
        raise AdoptError(f"output {out_name!r} is {head.n_units} sigmoids (multi-label): choose one with "
                         "--output-index I or --output CLASS (with --classes naming the units).")
    adopted = keras.Model(model.inputs, head.features, name="adopted")
    raw, x = front(spec, size, hw, channels)
    logits, probs = head_layers(head, adopted(x))
    wrapper = keras.Model(raw, probs, name="adopted_cxr")
    return wrapper, {"size": size, "channels": channels, "output": out_name, "activation": head.activation,
                     "n_units": head.n_units, "logits": logits is not None}


# --------------------------------------------------------------------------- a SavedModel (black box)


def signature(path) -> tuple[tuple, dict[str, int]]:
    """The ``serving_default`` signature of a SavedModel: its input shape (h, w, c) and output widths."""
    try:
        sig = tf.saved_model.load(str(path)).signatures["serving_default"]
    except (KeyError, OSError, ValueError) as exc:
        raise AdoptError(f"{path}: no usable serving_default signature ({exc}).") from None
    specs = [s for s in tf.nest.flatten(sig.structured_input_signature) if isinstance(s, tf.TensorSpec)]
    if len(specs) != 1 or len(specs[0].shape) != 4:
        raise AdoptError(f"{path}: the signature takes {[tuple(s.shape) for s in specs]}; adopt needs one image input.")
    outs = {k: int(v.shape[-1]) for k, v in sig.structured_outputs.items()}
    return tuple(specs[0].shape)[1:], outs


def blackbox_model(path, spec: dict, size: int | None = None, output=None, unit: int | None = None,
                   activation: str | None = None):
    """A Keras model around a SavedModel (``TFSMLayer``) with our input and preprocessing and the
    output ``probs``; ``(model, info)`` as :func:`wrap`. ``activation`` (softmax/sigmoid) of a
    many-unit output is what :func:`core.adopt` measured, or given; a one-unit output is sigmoid."""
    shape, outs = signature(path)
    names = sorted(outs)
    if output is None and len(names) > 1:
        raise AdoptError(f"the SavedModel has outputs {', '.join(names)}: choose one with --output NAME.")
    key = names[output] if isinstance(output, int) and len(names) > 1 else (output if output in outs else names[0])
    if output is not None and not isinstance(output, int) and output not in outs:
        raise AdoptError(f"--output {output!r}: the SavedModel's outputs are {', '.join(names)}.")
    size = choose_size(shape[:2], size)
    raw, x = front(spec, size, shape[:2], int(shape[2]))
    y = keras.layers.TFSMLayer(str(path), call_endpoint="serving_default", name="adopted")(x)[key]
    n = outs[key]
    act = "sigmoid" if n == 1 else (activation or "softmax")
    if act == "sigmoid" and n > 1:
        if unit is None:
            raise AdoptError(f"output {key!r} is {n} sigmoids (multi-label): choose one with --output-index I.")
        y = select_unit(y, unit, n, "unit")
    probs = two_columns(y) if act == "sigmoid" else layers.Identity(name="probs")(y)
    return keras.Model(raw, probs, name="adopted_blackbox"), {
        "size": size, "channels": int(shape[2]), "output": key, "activation": act, "n_units": n, "logits": False}


# --------------------------------------------------------------------------- reading an adopted run


def import_code(path) -> None:
    """Execute a Python file that registers custom Keras objects (only for files the user trusts)."""
    import importlib.util  # lazy: only --trust-code --code needs it

    spec = importlib.util.spec_from_file_location(f"adopted_code_{abs(hash(str(path)))}", str(path))
    if spec is None or spec.loader is None:
        raise AdoptError(f"--code {path}: not a Python file.")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


TRUST_ENV = "CXR_TRUST_CODE"  # "1": this process may load adopted models that carry code (--trust-code runs)


def load_keras(path, trusted: bool):
    """The one place a Keras file is loaded with safe mode off, and only when ``trusted`` (the user's
    --trust-code, or CXR_TRUST_CODE=1 for a run adopted that way); safe mode otherwise."""
    return keras.saving.load_model(path, compile=False, safe_mode=not trusted)


def load_run_model(run, cfg: dict, check_hash: bool = True):
    """The model of a run made by :mod:`core.adopt` (what ``core.runs.load_model`` returns for it):
    model.keras in safe mode (or, when adopted with ``--trust-code``, with its code allowed), or a
    SavedModel wrapped by :func:`blackbox_model`. Problems raise ``core.runs.RunError``."""
    from core import runs  # lazy: core.runs imports this module lazily too (no import cycle at load)

    run, a = Path(run), cfg["adopted"]
    label = f"run {run.name!r} ({run})"
    try:
        if a.get("blackbox"):
            out = a.get("output")
            name, unit = (out.get("output"), out.get("unit")) if isinstance(out, dict) else (out, None)
            return blackbox_model(run / "model_savedmodel", preprocess_spec(a.get("preprocess") or "grey01"),
                                  cfg.get("size"), name, unit, a.get("activation"))[0]
        path = run / "model.keras"
        if not path.is_file():
            raise runs.RunError(f"{label} has no model.keras.")
        if check_hash and cfg.get("model_sha256") and runs.sha256(path) != cfg["model_sha256"]:
            raise runs.RunError(f"{label} has a model.keras whose sha256 does not match config.json.")
        if a.get("trust_code") and os.environ.get(TRUST_ENV) != "1":
            # A run folder is data: its own config.json must never switch safe mode off (anyone can write
            # one). The person opening it says so for this process instead.
            raise runs.RunError(f"{label} holds a model with code in it (adopted with --trust-code); it is loaded "
                                f"only when you trust it: set {TRUST_ENV}=1 for the process that opens it.")
        if a.get("trust_code") and a.get("code"):
            import_code(a["code"])
        return load_keras(path, trusted=bool(a.get("trust_code")))
    except (AdoptError, OSError, ValueError, TypeError) as exc:
        if isinstance(exc, runs.RunError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise runs.RunError(f"{label}: its adopted model cannot be loaded: {first[:200]}.") from None
