"""Source-adversarial training: the gradient reversal, the class-conditional source head, and a
synthetic collection marker that the features stop encoding."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from core import train
from core.adversarial import gradient_reversal, ramp, source_loss, targets
from core.augment import make_dataset


def test_gradient_reversal_is_identity_forward_and_negates_gradients():
    grl = gradient_reversal()(name="grl")
    grl.lam.assign(0.7)
    x = tf.constant(np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = grl(x)
        loss = tf.reduce_sum(y * 2.0)
    np.testing.assert_allclose(y.numpy(), x.numpy(), atol=1e-6)
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), -0.7 * 2.0, atol=1e-6)


def test_source_loss_scores_only_the_true_class_block():
    loss = source_loss(2, 3)
    # one image of class 1 from source 2: target one-hot at 1 * 3 + 2
    y = np.zeros((1, 6), np.float32)
    y[0, 5] = 1.0
    logits = np.zeros((1, 6), np.float32)
    logits[0, :3] = [9.0, -9.0, 5.0]  # class-0 block: must not matter
    base = float(loss(tf.constant(y), tf.constant(logits))[0])
    assert base == pytest.approx(np.log(3.0), abs=1e-5)  # uniform within the true block
    logits[0, 5] = 4.0
    assert float(loss(tf.constant(y), tf.constant(logits))[0]) < base


def test_ramp_rises_from_zero_to_the_weight():
    assert ramp(0.5, 0, 10) == 0.0
    assert 0.0 < ramp(0.5, 2, 10) < ramp(0.5, 5, 10) < 0.5
    assert ramp(0.5, 10, 10) == pytest.approx(0.5, abs=1e-3)


def _marked(n: int, rng, p_b=(0.15, 0.85), side: int = 32, amp: float = 10.0):
    """Two collections: class 1 has a faint blob; collection "b" stamps a bright corner marker.

    ``p_b`` is the share of each class from collection b: (0.15, 0.85) makes the marker a
    shortcut to the label (the faint blob alone is a weaker cue); (0.85, 0.15) reverses it.
    """
    yy, xx = np.mgrid[:side, :side]
    x = np.clip(rng.normal(100, 20, (n, side, side)), 0, 255).astype(np.float32)
    cls = rng.integers(0, 2, n)
    src = np.where(rng.random(n) < np.where(cls == 1, p_b[1], p_b[0]), "b", "a")
    for i in range(n):
        if cls[i]:
            cy, cx = rng.integers(10, 22, 2)
            x[i] += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)
        if src[i] == "b":
            x[i, 1:6, 1:6] = 250.0
    table = pd.DataFrame({"class": np.where(cls == 0, "covid", "other"), "y": cls, "source": src})
    return np.clip(x, 0, 255), table


def _reversed_auc(adversarial: float, seed: int, data) -> float:
    """AUC on images whose marker-label link is reversed, of a network trained where it holds."""
    from sklearn.metrics import roc_auc_score

    from core import model as model_lib

    (x, table), (xr, tr) = data
    cfg = {**train.DEFAULTS, "task": "binary", "size": 32, "epochs": 15, "lr": 3e-3, "width": 0.5, "crop": 0.0,
           "adversarial": adversarial}
    keras.utils.set_random_seed(seed)
    steps = int(np.ceil(len(x) / 32))
    model, net = train.build_member(cfg, 32, ["a", "b"], steps * cfg["epochs"])
    y = targets(table, 2, ["a", "b"], adversarial > 0)
    w = np.ones(len(x), np.float32)
    ds = make_dataset(x, y, {"probs": w, "source": w} if adversarial > 0 else w, 32, 0, "none")
    for epoch in range(cfg["epochs"]):
        if adversarial > 0:
            model.get_layer("grl").lam.assign(ramp(adversarial, epoch, cfg["epochs"]))
        model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
    return float(roc_auc_score(tr["y"], model_lib.probabilities(net, xr)[:, 1]))


@pytest.mark.slow
def test_adversarial_head_makes_the_network_lean_less_on_a_collection_marker():
    """Trained where a corner marker mostly means class 1, tested where it mostly means class 0:
    a network that uses the marker ranks the reversed images badly (AUC well below 0.5). With
    the class-conditional source head (weight 0.3) the mean over three seeds must be better.

    The effect is real but modest and varies by seed and run (measured: 0.29 without, 0.37-0.45
    with; at weights of 1 and more it vanished or reversed), so the margin asked is small; it is
    one reason the model card reports the head's effect on real collections over seeds.
    """
    data = (_marked(1200, np.random.default_rng(0)), _marked(400, np.random.default_rng(2), p_b=(0.85, 0.15)))
    without = np.mean([_reversed_auc(0.0, s, data) for s in (0, 1, 2)])
    with_head = np.mean([_reversed_auc(0.3, s, data) for s in (0, 1, 2)])
    assert without < 0.4, f"the marker should be a shortcut without the head (reversed AUC {without:.2f})"
    assert with_head > without + 0.03, f"reversed AUC {with_head:.2f} with the head vs {without:.2f} without"
