"""Pins the private Keras behaviour that core/keras_adapter.py relies on.

A Keras upgrade that changes one of these internals fails here, with a message naming it, rather
than as a wrong heatmap or a slow dashboard.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

from core import keras_adapter as KA


def _changed(internal: str) -> str:
    return f"Keras {keras.__version__} changed {internal}; update core/keras_adapter.py"


@pytest.fixture(scope="module")
def nets():
    """A flat CNN, and an outer model that wraps its convolutions in a nested ``backbone`` and
    calls the flat model's head layers a second time (so they have two nodes)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 1), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(2, name="logits")(x)
    flat = keras.Model(inp, keras.layers.Activation("softmax", name="probs")(x), name="flat")
    backbone = keras.Model(flat.input, flat.get_layer("conv").output, name="backbone")
    inp2 = keras.Input((16, 16, 1), name="image2")
    y = backbone(inp2)
    for name in ("gap", "logits", "probs"):
        y = flat.get_layer(name)(y)
    outer = keras.Model(inp2, y, name="outer")
    x_in = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 1)).astype(np.float32)
    return flat, backbone, outer, x_in


def test_node_of_finds_the_call_that_belongs_to_each_model(nets):
    flat, _, outer, x = nets
    logits = flat.get_layer("logits")
    assert hasattr(outer, "_nodes") and len(logits._inbound_nodes) == 2, _changed("model._nodes / layer._inbound_nodes")
    assert f"{id(logits)}_ib-1" in outer._nodes, _changed("the keys of model._nodes (f'{id(layer)}_ib-{index}')")
    assert KA.node_of(flat, logits) is logits._inbound_nodes[0], _changed("model._nodes")
    assert KA.node_of(outer, logits) is logits._inbound_nodes[1], _changed("model._nodes")
    # the tensor found is the one of that model's graph: a sub-model built on it computes the logits
    view = keras.Model(outer.input, KA.output_in(outer, logits))
    expected = keras.Model(flat.input, KA.output_in(flat, logits))(x)
    np.testing.assert_allclose(view(x), expected, atol=1e-5, err_msg=_changed("Node.outputs"))
    before = keras.Model(outer.input, KA.input_in(outer, outer.get_layer("probs")))
    np.testing.assert_allclose(before(x), expected, atol=1e-5, err_msg=_changed("Node.input_tensors"))


def test_node_of_a_layer_inside_a_nested_model(nets):
    flat, backbone, outer, x = nets
    conv = backbone.get_layer("conv")
    node = KA.node_of(backbone, conv)
    assert node is not None and node in conv._inbound_nodes, _changed("layer._inbound_nodes")
    sub = keras.Model(backbone.input, KA.output_in(backbone, conv))
    np.testing.assert_allclose(sub(x), backbone(x), atol=1e-5, err_msg=_changed("Node.outputs"))


def test_capture_output_gives_the_sub_models_tensor_and_its_gradient(nets):
    flat, backbone, outer, x = nets
    conv = backbone.get_layer("conv")
    store: dict = {}
    with tf.GradientTape() as tape:
        with KA.capture_output(conv, store, "acts"):
            out = outer(x, training=False)
        score = out[:, 1]
    assert "acts" in store, _changed("Layer.__call__ dispatching to an instance attribute 'call'")
    np.testing.assert_allclose(np.asarray(store["acts"]), np.asarray(backbone(x)), atol=1e-5,
                               err_msg=_changed("the activation captured by a patched layer.call"))
    grads = tape.gradient(score, store["acts"])
    assert grads is not None, _changed("the captured activation being on the gradient path")
    assert "call" not in conv.__dict__, _changed("the restoring of a patched layer.call")
    np.testing.assert_allclose(outer(x), flat(x), atol=1e-6)  # the model is back to normal


def test_capture_output_inside_a_compiled_function(nets):
    _, backbone, outer, x = nets
    conv = backbone.get_layer("conv")

    @tf.function
    def acts(xb):
        store: dict = {}
        with KA.capture_output(conv, store, "acts"):
            outer(xb, training=False)
        return store["acts"]

    np.testing.assert_allclose(acts(tf.constant(x)).numpy(), np.asarray(backbone(x)), atol=1e-5,
                               err_msg=_changed("a patched layer.call while tracing a tf.function"))
    assert "call" not in conv.__dict__


def test_clear_session_keeps_kernels():
    original = keras.backend.clear_session
    assert "free_memory" in inspect.signature(original).parameters, _changed("keras.backend.clear_session's signature")
    try:
        KA.keep_kernels_on_clear_session()
        patched = keras.backend.clear_session
        assert getattr(patched, "keeps_kernels", False)
        KA.keep_kernels_on_clear_session()
        assert keras.backend.clear_session is patched  # idempotent
        keras.layers.Dense(1)
        keras.backend.clear_session()
        # the real one resets Keras' global state (the next Dense would be named "dense" again)
        # and TensorFlow's kernel cache; the replacement leaves both alone
        assert keras.layers.Dense(1).name != "dense", "the replaced clear_session still cleared Keras' state"
    finally:
        keras.backend.clear_session = original
