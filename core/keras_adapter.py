"""The one place that touches private Keras internals (Keras 3).

Everything here relies on behaviour Keras does not promise; ``tests/test_keras_adapter.py`` pins
it, so that a Keras upgrade that changes it fails there, with a message naming the internal, and
not somewhere in the app:

- ``model._nodes`` (the keys of the nodes that belong to a Functional model's graph) and
  ``layer._inbound_nodes`` (every call of a layer): :func:`node_of` finds the call of a layer that
  belongs to a given model, needed when a layer is shared by several models (the explainers'
  linear view shares the classifier's layers) or sits inside a nested model.
- An instance attribute ``call`` shadowing the layer class's ``call``, which Keras' ``__call__``
  picks up: :func:`capture_output` records a layer's output during a forward pass, the way to
  reach a layer inside a nested sub-model whose output is not a tensor of the outer graph.
- ``keras.backend.clear_session`` replaced process-wide: :func:`keep_kernels_on_clear_session`.
"""

from __future__ import annotations

import contextlib
import threading

import keras

_CALL_LOCK = threading.RLock()  # two traces must not patch one layer's call at once


def node_of(model: keras.Model, layer):
    """The node (call) of ``layer`` that belongs to ``model``'s graph, or None if it has none.

    A layer shared by several models, or called twice, has several nodes; ``layer.output`` is
    only the first one's. Without a match (a Sequential model keeps no keys) the first node.
    """
    keys = getattr(model, "_nodes", None) or ()  # Keras 3 keys: f"{id(layer)}_ib-{node_index}"
    inbound = layer._inbound_nodes
    for i in reversed(range(len(inbound))):
        if f"{id(layer)}_ib-{i}" in keys:
            return inbound[i]
    return inbound[0] if inbound else None


def output_in(model: keras.Model, layer):
    """``layer``'s output tensor in ``model``'s graph (see :func:`node_of`)."""
    node = node_of(model, layer)
    return node.outputs[0] if node is not None else layer.output


def input_in(model: keras.Model, layer):
    """``layer``'s (first) input tensor in ``model``'s graph (see :func:`node_of`)."""
    node = node_of(model, layer)
    return node.input_tensors[0] if node is not None else layer.input


@contextlib.contextmanager
def capture_output(layer, store: dict, key: str, what: str = "output"):
    """Record ``layer``'s output (``what="output"``) or first input (``"input"``) in ``store[key]``
    while the block runs (e.g. while tracing).

    The instance attribute shadows the class's ``call`` and is removed on exit, so the layer is
    back to its original state.
    """
    if what not in ("output", "input"):
        raise ValueError(f"what must be 'output' or 'input'; got {what!r}")
    with _CALL_LOCK:
        original = layer.call

        def recording_call(*args, **kwargs):
            out = original(*args, **kwargs)
            store[key] = out if what == "output" else (args[0] if args else next(iter(kwargs.values())))
            return out

        layer.call = recording_call
        try:
            yield
        finally:
            layer.__dict__.pop("call", None)


def is_savedmodel_layer(layer) -> bool:
    """True for a layer that wraps a TensorFlow SavedModel signature (``keras.layers.TFSMLayer``):
    its inner layers cannot be reached."""
    return isinstance(layer, keras.layers.TFSMLayer)


def keep_kernels_on_clear_session() -> None:
    """Make ``keras.backend.clear_session`` a no-op in this process (idempotent).

    Streamlit calls ``keras.backend.clear_session()`` after every script run when Keras is
    imported; that empties TensorFlow's kernel cache, so every traced model function
    re-instantiates its kernels on its next call (12-15x the call itself). A process that builds
    no model per run (the dashboard) loses nothing by skipping it. The replacement carries
    ``keeps_kernels = True``.
    """
    if getattr(keras.backend.clear_session, "keeps_kernels", False):
        return

    def clear_session(free_memory: bool = True) -> None:
        """Nothing to clear here (see core.keras_adapter.keep_kernels_on_clear_session)."""

    clear_session.keeps_kernels = True
    keras.backend.clear_session = clear_session
