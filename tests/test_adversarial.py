"""Source-adversarial training: the gradient reversal, the class-conditional source head, and a
synthetic collection marker that the features stop encoding."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from core import train


def test_gradient_reversal_is_identity_forward_and_negates_gradients():
    grl = train._gradient_reversal()(name="grl")
    grl.lam.assign(0.7)
    x = tf.constant(np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = grl(x)
        loss = tf.reduce_sum(y * 2.0)
    np.testing.assert_allclose(y.numpy(), x.numpy(), atol=1e-6)
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), -0.7 * 2.0, atol=1e-6)


def test_source_loss_scores_only_the_true_class_block():
    loss = train._source_loss(2, 3)
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
    assert train._ramp(0.5, 0, 10) == 0.0
    assert 0.0 < train._ramp(0.5, 2, 10) < train._ramp(0.5, 5, 10) < 0.5
    assert train._ramp(0.5, 10, 10) == pytest.approx(0.5, abs=1e-3)


def _marked(n: int, rng, side: int = 32):
    """Two collections: class 1 has a soft blob; collection "b" stamps a bright corner marker.
    Collection b holds most of class 1, so the marker is a shortcut to the label."""
    yy, xx = np.mgrid[:side, :side]
    x = np.clip(rng.normal(100, 20, (n, side, side)), 0, 255).astype(np.float32)
    cls = rng.integers(0, 2, n)
    src = np.where(rng.random(n) < np.where(cls == 1, 0.8, 0.2), "b", "a")
    for i in range(n):
        if cls[i]:
            cy, cx = rng.integers(10, 22, 2)
            x[i] += 70 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)
        if src[i] == "b":
            x[i, 1:6, 1:6] = 250.0
    table = pd.DataFrame({"class": np.where(cls == 0, "covid", "other"), "y": cls, "source": src})
    return np.clip(x, 0, 255), table


def _within_class_probe(features: np.ndarray, table: pd.DataFrame) -> float:
    """Cross-validated AUC of a logistic probe for the collection, within each class (mean)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict
    from sklearn.preprocessing import StandardScaler

    aucs = []
    for _, g in table.groupby("y"):
        f = StandardScaler().fit_transform(features[g.index])
        s = (g["source"] == "b").to_numpy().astype(int)
        p = cross_val_predict(LogisticRegression(C=0.1, max_iter=2000), f, s, cv=5, method="predict_proba")[:, 1]
        aucs.append(roc_auc_score(s, p))
    return float(np.mean(aucs))


@pytest.mark.slow
def test_adversarial_head_removes_a_collection_marker_from_the_features():
    from core import model as model_lib

    x, table = _marked(800, np.random.default_rng(0))
    xt, tt = _marked(300, np.random.default_rng(1))
    cfg = {**train.DEFAULTS, "size": 32, "epochs": 12, "lr": 3e-3, "width": 0.5, "crop": 0.0}
    probes = {}
    for adv in (0.0, 1.0):
        keras.utils.set_random_seed(0)
        cfg["adversarial"] = adv
        steps = int(np.ceil(len(x) / 32))
        model, net = train.build_member(cfg, 32, ["a", "b"], steps * cfg["epochs"])
        y = train._targets(table, 2, ["a", "b"], adv > 0)
        w = np.ones(len(x), np.float32)
        ds = train.make_dataset(x, y, {"probs": w, "source": w} if adv > 0 else w, 32, 0, "none")
        for epoch in range(cfg["epochs"]):
            if adv > 0:
                model.get_layer("grl").lam.assign(train._ramp(adv, epoch, cfg["epochs"]))
            model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
        acc = float((model_lib.probabilities(net, xt).argmax(1) == tt["y"].to_numpy()).mean())
        assert acc > 0.8, f"adversarial {adv}: the classifier did not learn the blob ({acc:.2f})"
        probes[adv] = _within_class_probe(model_lib.features(net, xt), tt)
    assert probes[0.0] > 0.8, f"without the head the marker should be in the features ({probes})"
    assert probes[1.0] < probes[0.0] - 0.1, f"the source head did not remove the marker ({probes})"
