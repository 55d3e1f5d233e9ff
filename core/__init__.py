"""covid-cxr core library: read chest X-rays, train and evaluate the CNN, explain it.

Submodules are imported lazily (``core.explain`` pulls in TensorFlow, which takes seconds), so
``import core`` stays cheap; ``core.images``, ``core.train`` etc. are the public modules:

- ``config``    data/runs settings, class names
- ``images``    the one image-decoding path (``load``, ``ImageError``)
- ``datasets``  one reader per source layout -> one table
- ``splits``    duplicates and patient-level splits
- ``model``     Functional CNN presets with preprocessing inside
- ``train``     training loop and run folders (``python -m core.train``)
- ``runs``      reading and writing run folders
- ``metrics``   metrics with bootstrap CIs, calibration, operating point
- ``evaluate``  internal and external evaluation (``python -m core.evaluate``)
- ``predict``   batch prediction (``python -m core.predict``)
- ``explain``   Grad-CAM family and saliency maps, overlays
- ``lungs``     lung segmentation
- ``audit``     trust measures and shortcut probes (``python -m core.audit``)
- ``checks``    warnings for lateral, inverted or non-chest images
- ``report``    one-page case report
"""

from __future__ import annotations

import importlib

__all__ = [
    "audit", "checks", "config", "data", "datasets", "evaluate", "explain", "images", "lungs",
    "metrics", "model", "predict", "report", "runs", "splits", "train",
]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
