"""The adversarial source head (``--adversarial W``): unlearning where an image came from.

A head behind a gradient-reversal layer (Ganin & Lempitsky 2015) learns to tell the collection
of an image from the network's pooled features among images of the same class; the reversed
gradient pushes the features to make that impossible. The reversal weight is ramped up from 0
over the epochs (:func:`ramp`). The layer and the loss are registered under the Keras package
``cxr_train`` (the name saved checkpoints refer to).
"""

from __future__ import annotations

import functools
import math

import keras
import numpy as np
import pandas as pd
import tensorflow as tf


@functools.lru_cache(maxsize=1)
def gradient_reversal():
    """The identity going forward, -lambda times the gradient going back (Ganin & Lempitsky 2015).

    ``stop_gradient(x) * (1 + lam) - lam * x`` equals x, and its gradient with respect to x is
    ``-lam``; ``lam`` is a non-trainable weight that the training loop ramps up from 0.
    """
    @keras.saving.register_keras_serializable(package="cxr_train")
    class GradientReversal(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.lam = self.add_weight(shape=(), initializer="zeros", trainable=False, name="lam")

        def call(self, x):
            ops = keras.ops
            return ops.stop_gradient(x) * (1.0 + self.lam) - self.lam * x

    return GradientReversal


@functools.cache
def source_loss(n_classes: int, n_sources: int):
    """Cross-entropy of the source among the sources of the image's own class.

    The head has one block of ``n_sources`` logits per class; ``y_true`` is one-hot over
    (class, source) pairs, so only the block of the true class is scored: the head learns where
    an image came from *given its label*, which is the part of the source that is a shortcut.
    """
    @keras.saving.register_keras_serializable(package="cxr_train", name=f"source_ce_{n_classes}x{n_sources}")
    def source_ce(y_true, y_pred):
        ops = keras.ops
        t = ops.reshape(y_true, (-1, n_classes, n_sources))
        z = ops.reshape(y_pred, (-1, n_classes, n_sources))
        in_class = ops.sum(t, axis=2, keepdims=True)
        return keras.losses.categorical_crossentropy(ops.sum(t, axis=1), ops.sum(z * in_class, axis=1),
                                                     from_logits=True)

    return source_ce


def targets(table: pd.DataFrame, n_classes: int, sources: list[str], adversarial: bool):
    """Keras targets of a training table: one-hot classes, and (class, source) pairs for the source head."""
    y = np.eye(n_classes, dtype=np.float32)[table["y"].to_numpy()]
    if not adversarial:
        return y
    s = np.array([sources.index(v) for v in table["source"]])
    pair = np.zeros((len(table), n_classes * len(sources)), np.float32)
    pair[np.arange(len(table)), table["y"].to_numpy() * len(sources) + s] = 1.0
    return {"probs": y, "source": pair}


def source_accuracy(model, x: np.ndarray, table: pd.DataFrame, n_classes: int, sources: list[str]) -> float:
    """Balanced accuracy of the source head on held-out images, within their class (chance = 1 / sources)."""
    z = np.asarray(model(tf.constant(x[..., None]), training=False)["source"]).reshape(-1, n_classes, len(sources))
    pred = z[np.arange(len(table)), table["y"].to_numpy()].argmax(axis=1)
    true = np.array([sources.index(v) for v in table["source"]])
    per = [float((pred[true == s] == s).mean()) for s in np.unique(true)]
    return float(np.mean(per)) if per else float("nan")


def ramp(adversarial: float, epoch: int, epochs: int) -> float:
    """Gradient-reversal weight at an epoch: 0 at the start, rising to ``adversarial`` (DANN schedule)."""
    p = epoch / max(1, epochs)
    return float(adversarial * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0))


def with_source_head(net, n_classes: int, sources: list[str], schedule):
    """A compiled training model: ``net`` plus the class-conditional source head on its ``gap`` layer.

    Outputs ``{"probs", "source"}``; it shares every layer of ``net``, which stays the inference network.
    """
    feats = gradient_reversal()(name="grl")(net.get_layer("gap").output)
    h = keras.layers.Dense(64, activation="relu", name="source_hidden")(feats)
    src = keras.layers.Dense(n_classes * len(sources), name="source")(h)
    model = keras.Model(net.input, {"probs": net.output, "source": src}, name="cxr_adversarial")
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss={"probs": keras.losses.CategoricalCrossentropy(), "source": source_loss(n_classes, len(sources))},
        metrics={"probs": [keras.metrics.CategoricalAccuracy(name="accuracy")]},
    )
    return model
