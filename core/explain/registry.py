"""The one list of explanation methods; every other list of methods is derived from it.

Adding a method is one function in :mod:`core.explain.methods` (named as its entry) plus one
:class:`Method` entry in ``REGISTRY``. The menus (``TITLES``), the slow ones the dashboard warns
about (``SLOW``), the audit's default set (``AUDIT_DEFAULT``), what :func:`explain_many` batches
(``BATCHABLE``) and which maps an ensemble averages over its members (``CAMS``) all follow.

This module does not import TensorFlow: the dashboard's menus, the audit's defaults and the
drawing read it at import time without paying for TensorFlow (~3.5 s).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One explanation method and everything the project knows about it."""

    name: str  # key: explain(model, image, name), the CLI's --method
    title: str  # display name (menus, panel titles, reports)
    # "cam": weights a conv layer's channels (takes ``layer``); "gradient": pixel gradients;
    # "blackbox": output-only, needs nothing but model(x) (applies to a SavedModel signature too)
    kind: str
    routine: str  # the computation both engines run (scorecam_fast is scorecam on fewer channels)
    batchable: bool = False  # explain_many runs it batch_size images per compiled call (tape engine)
    slow: bool = False  # seconds per image: the dashboard says so and shows a spinner
    # in the audit's default set. Left out: LayerCAM (at a last convolution followed by global
    # pooling its maps equal Grad-CAM++'s), full Score-CAM and SmoothGrad (a minute or more each
    # on two cores); the audit's --methods adds any of them.
    audit: bool = False

    @property
    def function(self):
        """The public function ``f(model, image, class_index=0, layer=None, **kw) -> map``."""
        # lazy: the functions need TensorFlow, this registry must not (see the module docstring)
        return getattr(importlib.import_module("core.explain.methods"), self.name)


REGISTRY: tuple[Method, ...] = (
    Method("gradcam", "Grad-CAM", "cam", "gradcam", batchable=True, audit=True),
    Method("gradcam_pp", "Grad-CAM++", "cam", "gradcam_pp", batchable=True, audit=True),
    Method("scorecam", "Score-CAM", "cam", "scorecam", slow=True),
    Method("scorecam_fast", "Score-CAM (fast)", "cam", "scorecam", audit=True),
    Method("layercam", "LayerCAM", "cam", "layercam", batchable=True),
    Method("saliency", "Saliency", "gradient", "saliency", batchable=True, audit=True),
    Method("smoothgrad", "SmoothGrad", "gradient", "saliency", slow=True),
    Method("occlusion", "Occlusion", "blackbox", "occlusion", slow=True),
    Method("rise", "RISE", "blackbox", "rise", slow=True),
)

BY_NAME: dict[str, Method] = {m.name: m for m in REGISTRY}
NAMES: tuple[str, ...] = tuple(BY_NAME)
TITLES: dict[str, str] = {m.name: m.title for m in REGISTRY}
SLOW: frozenset[str] = frozenset(m.name for m in REGISTRY if m.slow)
BATCHABLE: frozenset[str] = frozenset(m.name for m in REGISTRY if m.batchable)
AUDIT_DEFAULT: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.audit)
# routines whose map an ensemble averages over its members (each member has its own CAM)
CAMS: frozenset[str] = frozenset(m.routine for m in REGISTRY if m.kind == "cam")
# output-only methods: the ones a black box (a SavedModel signature) still gets
BLACKBOX: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.kind == "blackbox")


def get(name: str) -> Method:
    """The registered method called ``name``; ValueError naming the choices otherwise."""
    try:
        return BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(BY_NAME)}") from None
