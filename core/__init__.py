"""covid-cxr core library: read chest X-rays, train and evaluate the CNN, explain it.

Submodules are imported on first use (``core.train``, ``core.case`` and the model modules pull in
TensorFlow, which takes seconds), so ``import core`` stays cheap; ``core.<name>`` works for every
module of the package, and ``__all__`` is read from the package's files so it cannot go stale.
By family:

- settings and run folders: ``config`` (data/runs roots, class names), ``runs`` (the ``Run``
  handle: every reader of a run folder; writing run folders), ``provenance`` (file hashes, the code
  and packages behind a run), ``work`` (the bounded line of model calls shared by the dashboard's
  sessions)
- adopting any Keras model: ``adopt`` (``python -m core.adopt``: a model file into a run folder),
  ``adopt_load`` (loading .keras / .h5 / SavedModel, refusing code, wrapping the preprocessing),
  ``adopt_eval`` (the evaluation of an adopted run)
- one film: ``case`` (``analyse(run, film) -> Case``: decode, checks, preparation, lung mask,
  probabilities, features, maps on demand)
- data: ``images`` (the one decoding path), ``safepath`` (paths from run files, only inside the
  data root), ``inputs`` (what the model is fed), ``datasets``
  (one reader per source layout), ``splits`` (duplicates, patient-level splits), ``data`` (the
  ``python -m core.data`` CLI: audit, split), ``download`` (fetching the public sources)
- model and training: ``model`` (Functional CNN presets), ``train`` (fit loop, run folder, CLI)
  over ``train_data``, ``image_cache``, ``augment``, ``adversarial``, ``calibration`` and
  ``ensemble``; ``crossval`` (leave-one-source-out), ``distribute`` (multi-GPU / multi-worker),
  ``lungs`` (lung segmentation), ``keras_adapter`` (the only user of private Keras internals)
- evaluation: ``metrics``, ``evaluate``, ``unseen`` (which films a run never saw), ``predict``,
  ``operating`` (operating points: the run's own, rule-out, balanced, a site profile), ``calibrate``
  (a site's own operating point from its labelled films),
  ``export``, ``slices``
- explanation and trust: ``explain`` (a package: method registry, engines, drawing, CLI),
  ``heat`` (where a map's heat lies), ``pointing``, ``road``, ``trust``, ``checks``,
  ``severity``, ``source_probe``, ``findings``, ``audit`` over ``audit_steps``,
  ``audit_checks``, ``audit_maps``, ``audit_markers`` and ``audit_outcome`` (trust by TP/FP/TN/FN);
  ``markers`` (burned-in text and marker detector), ``neighbours`` (a film's nearest development films
  in the model's features), ``feature_map`` (the 2-D map of the model's features); ``uncertainty``
  (a film's range of P(covid) over test-time copies and the ensemble's members)
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
