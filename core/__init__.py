"""covid-cxr core library: read chest X-rays, train and evaluate the CNN, explain it.

Submodules are imported on first use (``core.explain`` pulls in TensorFlow, which takes seconds),
so ``import core`` stays cheap; ``core.<name>`` works for every module of the package, and
``__all__`` is read from the package's files so it cannot go stale. By family:

- settings and run folders: ``config`` (data/runs roots, class names), ``runs`` (reading and
  writing run folders), ``work`` (background jobs)
- data: ``images`` (the one decoding path), ``inputs`` (what the model is fed), ``datasets``
  (one reader per source layout), ``splits`` (duplicates, patient-level splits), ``data`` (the
  ``python -m core.data`` CLI: audit, split), ``download`` (fetching the public sources)
- model and training: ``model`` (Functional CNN presets), ``train``, ``crossval``,
  ``distribute`` (multi-GPU / multi-worker), ``lungs`` (lung segmentation) and the modules split
  from ``train`` (augmentation, calibration, ensembles, image cache)
- evaluation: ``metrics``, ``evaluate``, ``predict``, ``export``, ``slices``
- explanation and trust: ``explain``, ``pointing``, ``road``, ``trust``, ``checks``,
  ``severity``, ``source_probe``, ``findings``, ``audit``
- output: ``report`` (one-page case report)
"""

from __future__ import annotations

import importlib
import pkgutil

# Every module and subpackage in this folder, so a new module is public without editing this file.
__all__ = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def __getattr__(name: str):
    """``core.<name>`` imports the submodule on first use."""
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
