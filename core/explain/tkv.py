"""The tf-keras-vis engine: the reference implementations of tf-keras-vis 0.8.7 (Gradcam,
GradcamPlusPlus, Scorecam, Layercam, Saliency), run on the model's linear view.

The engine asked for is the engine that runs: a layer tf-keras-vis cannot reach (inside a nested
model), a failure inside it or a non-finite map raises :class:`EngineError`, never a silent switch
to the tape engine, so a comparison of the two engines compares two implementations.

Score-CAM: tf-keras-vis applies a softmax to the model output to weight the channels, which is
right only when it is given the linear model: softmax(logits) is the model's own probability.
Given the softmax model it would apply softmax twice (squashing the scores), and a one-unit
sigmoid head would give softmax == 1 for every mask, hence a blank map: that is why the binary
models have two softmax units.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from tf_keras_vis.gradcam import Gradcam
from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
from tf_keras_vis.layercam import Layercam
from tf_keras_vis.saliency import Saliency
from tf_keras_vis.scorecam import Scorecam

from core.explain import graph
from core.explain.graph import BATCH, SMOOTHGRAD_NOISE, EngineError
from core.explain.tape import smooth_inputs

_CAM_CLASSES = {"gradcam": Gradcam, "gradcam_pp": GradcamPlusPlus, "layercam": Layercam, "scorecam": Scorecam}


class _QuietModel:
    """Forwards to a Keras model but predicts without a progress bar (Scorecam calls predict)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def predict(self, x, batch_size=BATCH, **kw):
        return self._model.predict(x, batch_size=batch_size, verbose=0)


def _score(class_index):
    return lambda output: output[:, class_index]


def _cam(routine, model, x, class_index, layer, max_n=None):
    target, nested = graph.target(model, layer)
    if nested:
        raise EngineError(f"tf-keras-vis cannot explain layer {target.name!r}: it lies inside a nested model; "
                          "use engine='tape'")
    lin = graph.linear_model(model)
    vis = _CAM_CLASSES[routine](lin, clone=False)  # no modifier: lin already ends at the logits, and is not changed
    kw = dict(penultimate_layer=target, seek_penultimate_conv_layer=False, normalize_cam=False)
    if routine == "scorecam":
        vis.model = _QuietModel(lin)
        kw.update(max_N=max_n, batch_size=BATCH)
    with contextlib.redirect_stdout(io.StringIO()):
        cam = vis(_score(class_index), x, **kw)
    return np.asarray(cam)[0]


def _saliency(model, x, class_index, n=0, noise=SMOOTHGRAD_NOISE, seed=0):
    vis = Saliency(graph.linear_model(model), clone=False)
    # SmoothGrad as one batch of noisy copies (tf-keras-vis would loop over them one by one).
    batch = smooth_inputs(x, n, noise, seed) if n > 0 else x
    grads = [np.asarray(vis(_score(class_index), batch[s : s + BATCH], normalize_map=False))
             for s in range(0, len(batch), BATCH)]
    return np.concatenate(grads).mean(axis=0)


def run(method, model, x, ci, layer, **kw) -> np.ndarray:
    """The raw tf-keras-vis map of one prepared image for ``method`` (a registry Method);
    a failure inside tf-keras-vis becomes EngineError."""
    saliency_like = method.routine == "saliency"
    if not saliency_like:
        graph.target(model, layer)  # our own checks first: an unknown or non-spatial layer is a ValueError
    try:
        if saliency_like:
            raw = _saliency(model, x, ci, **kw)
        else:
            raw = _cam(method.routine, model, x, ci, layer, **kw)
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failure inside tf-keras-vis, named for the caller
        raise EngineError(f"tf-keras-vis failed on {method.name}: {type(exc).__name__}: {exc}") from exc
    return np.asarray(raw, dtype=np.float32)
