"""Heatmaps that explain a classifier's decision: the Grad-CAM family, Score-CAM and saliency.

Every method takes one raw grey image (H, W) or (H, W, 1), float in [0, 255], exactly as
:func:`core.images.load` returns it at the model's input size, and returns a float32 (H, W) map in
[0, 1] at the input's size (an image of another size is resized for the model and the map is
resized back). A map that carries no signal (constant, or non-finite gradients) comes back as
zeros, never NaN.

Methods (``METHODS``, from the one list in :mod:`core.explain.registry`): ``gradcam``,
``gradcam_pp`` (Grad-CAM++), ``scorecam`` (all channels) and ``scorecam_fast`` (Faster Score-CAM,
the ``max_n`` channels of highest spatial variance), ``layercam``, ``saliency`` (vanilla
gradients), ``smoothgrad`` (20 noisy samples, one batch), and the output-only ``occlusion``
and ``rise`` (:mod:`core.explain.blackbox`; they need only ``model(x)``, so a black box still gets
maps; :func:`applicable` says which methods apply to a model and why not). Any class can be explained
(``class_index``; 0 is always COVID-19) at any convolution layer (``layer``; default
``last_conv`` or else the last convolution, see :func:`conv_layers`). Every method explains the
pre-softmax score on a cached linear view of the model, which is never modified
(:mod:`core.explain.graph`).

Two engines compute the same maps: ``"tape"`` (default; :mod:`core.explain.tape`) and
``"tf-keras-vis"`` (the reference implementations; :mod:`core.explain.tkv`). The engine asked for
is the engine that runs (:class:`EngineError` otherwise, never a silent switch).
:func:`explain_many` batches the batchable methods over many images (for audits).

Modules: ``registry`` (the methods; no TensorFlow), ``graph`` (model plumbing), ``tape`` and
``tkv`` (the engines), ``blackbox`` (occlusion, RISE), ``methods`` (the public functions, :func:`explain`, :func:`explain_many`),
``draw`` (overlays, panels, film views; no TensorFlow), ``cli`` (``python -m core.explain``).
"""

from __future__ import annotations

import importlib

from core.explain.draw import (
    BOX_RGB,
    DISPLAY_MAX,
    OUTLINE_RGB,
    VIEWS,
    colorize,
    colormaps,
    display_film,
    draw_box,
    draw_outline,
    film_views,
    overlay,
    panel,
    quantize,
    wipe,
)
from core.explain.registry import REGISTRY, TITLES, Method

# Names that need TensorFlow (~3.5 s to import) are imported on first use, through the
# module-level __getattr__ below: the drawing, the registry and the dashboard's menus and the
# audit's defaults (read at import time) stay TensorFlow-free.
_LAZY = {
    "graph": ("BATCH", "SCORECAM_FAST_N", "SMOOTHGRAD_NOISE", "SMOOTHGRAD_SAMPLES", "EngineError",
              "applicable", "check_class", "conv_layers", "default_layer", "finish", "input_hw",
              "is_blackbox", "linear_model", "prepare", "target"),
    "methods": ("DEFAULT_ENGINE", "ENGINES", "METHODS", "explain", "explain_many", "explain_shared", "gradcam",
                "gradcam_pp", "layercam", "occlusion", "rise", "saliency", "scorecam", "scorecam_fast",
                "smoothgrad"),
    "cli": ("main",),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    "BOX_RGB", "DISPLAY_MAX", "OUTLINE_RGB", "REGISTRY", "TITLES", "VIEWS", "Method", "colorize",
    "colormaps", "display_film", "draw_box", "draw_outline", "film_views", "overlay", "panel",
    "quantize", "wipe", *_WHERE,
]


def __getattr__(name: str):
    """Import a TensorFlow-backed name on first use (see ``_LAZY``) and keep it here."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The names here and the lazily imported ones (for completion and ``dir``)."""
    return sorted(set(globals()) | set(_WHERE))
