"""Calibration of a classifier's probabilities, fitted on out-of-fold logits.

``platt`` (binary: a logistic regression on the logit difference) or ``temperature`` (softmax of
logits / T). The fitted map becomes a fixed Dense layer ``calibration`` between the model's
``logits`` and ``probs`` layers (:func:`with_calibration`), so the saved model applies it;
:func:`apply_calibration` is the same map over numpy logits.
"""

from __future__ import annotations

import keras
import numpy as np
from sklearn.linear_model import LogisticRegression

from core import model as model_lib


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature T minimising the log loss of softmax(logits / T) on (validation) data."""
    ts = np.exp(np.linspace(np.log(0.25), np.log(8.0), 241))
    best, best_t = np.inf, 1.0
    for t in ts:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nll = -np.mean(logp[np.arange(len(y)), y])
        if nll < best:
            best, best_t = nll, float(t)
    return best_t


def fit_platt(d: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt scaling: (a, b) of P(covid) = sigmoid(a * d + b) on (validation) logit differences d."""
    if len(np.unique(y)) < 2:
        return 1.0, 0.0
    lr = LogisticRegression(C=1e4).fit(np.asarray(d, np.float64)[:, None], y)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def calibration_params(logits: np.ndarray, y: np.ndarray, method: str) -> dict:
    """Fit a calibration map on validation logits: ``platt`` (binary) or ``temperature``.

    Returns ``{"method", "kernel", "bias", ...}`` for the fixed Dense layer of :func:`with_calibration`.
    ``y`` holds class indices (0 = covid).
    """
    n = logits.shape[1]
    if method == "platt" and n == 2:
        a, b = fit_platt(logits[:, 0] - logits[:, 1], (y == 0).astype(int))
        return {"method": "platt", "a": a, "b": b, "kernel": (a * np.eye(2)).tolist(), "bias": [b, 0.0]}
    if method in ("platt", "temperature"):
        t = fit_temperature(logits, y)
        return {"method": "temperature", "temperature": t, "kernel": (np.eye(n) / t).tolist(), "bias": [0.0] * n}
    raise ValueError(f"unknown calibration {method!r}; choose platt, temperature or none")


def with_calibration(model, params: dict):
    """A copy of ``model`` with a fixed Dense layer ``calibration`` between ``logits`` and ``probs``.

    Built-in layers only, so the model still loads with ``safe_mode=True``; the ranking of the
    logits (AUC) is unchanged for a positive slope.
    """
    logits = model.get_layer("logits").output
    n = int(logits.shape[-1])
    layer = keras.layers.Dense(n, name="calibration", trainable=False)
    cal = layer(logits)
    layer.set_weights([np.asarray(params["kernel"], np.float32), np.asarray(params["bias"], np.float32)])
    probs = keras.layers.Activation("softmax", name="probs")(cal)
    return keras.Model(model.input, probs, name=model.name)


def raw_logits(model, x: np.ndarray) -> np.ndarray:
    """The pre-calibration logits of ``model`` (its ``logits`` layer) for raw images (n, H, W)."""
    return model_lib.probabilities(keras.Model(model.input, model.get_layer("logits").output), x, batch_size=64)


def apply_calibration(logits: np.ndarray, params: dict) -> np.ndarray:
    """Probabilities from logits through a fitted calibration (as the model's ``calibration`` layer does)."""
    z = np.asarray(logits, np.float64)
    if params.get("method", "none") != "none":
        z = z @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"], np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def method_of(cfg: dict) -> str:
    """The calibration a training config asks for: ``platt`` (binary) or ``temperature`` by default, or ``none``."""
    c = cfg.get("calibrate")
    if c is True or c is None:
        return "platt" if cfg["task"] == "binary" else "temperature"
    return str(c) if c else "none"
