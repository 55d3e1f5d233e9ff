"""Our trust metrics and Quantus's reference implementations, on the same films and maps of a run.

Shared by ``tests/test_reference_metrics.py`` and ``tests/benchmarks/bench_reference_metrics.py``.
Each ``*_pair`` function returns ``{"ours": (n,), "library": (n,), "ours_s": seconds, "library_s": seconds}``
per film; :func:`agreement` gives the Spearman rank correlation over films and the largest
difference. What each pair compares (Quantus 0.6.0):

- ``pointing_hit`` / ``pointing_mass``: :func:`core.pointing.point` against ``quantus.PointingGame`` and
  ``quantus.RelevanceMassAccuracy`` (the same definitions) on the lung masks.
- ``deletion``: our RISE deletion AUC (:func:`core.audit_checks.deletion_insertion`, image-mean
  baseline, 16 steps) against ``quantus.PixelFlipping`` with the same baseline and step; its
  curve's area is taken here (``np.trapezoid``) because Quantus's own AUC path calls
  ``np.trapz``, which numpy 2 removed. Insertion has no Quantus counterpart.
- ``road_imputer``: our ROAD combined score (:func:`core.road.road`) against the same masks and
  score with the library's exact noisy linear imputer (``quantus.functions.perturb_func.
  noisy_linear_imputation``, full resolution) instead of our coarse-to-fine solve.
- ``road_metric``: our mean MoRF change against ``quantus.ROAD`` as the library defines it (the
  share of removal fractions, most relevant first, after which the explained class is still
  the arg-max): a related but different score.
- ``randomisation``: our per-film Spearman between maps of the trained and the re-initialised
  model (:func:`core.audit_checks.sanity_check`) against ``quantus.MPRT`` (cascading top-down
  randomisation by weight permutation, last-layer Spearman), and ``randomisation_similarity``:
  the library's Spearman similarity on our two maps (full resolution; ours at 64 px).
"""

from __future__ import annotations

import time

import numpy as np
from scipy.stats import spearmanr

from core import config, explain, pointing, road, runs
from core import model as cxr_model
from core.audit_checks import deletion_insertion, randomised_copy, sanity_check, spearman
from core.audit_steps import load_images

try:  # lazy-free: the tests skip cleanly when the library is absent
    import quantus
    from quantus.functions.perturb_func import noisy_linear_imputation
    from quantus.functions.similarity_func import correlation_spearman
except ImportError:  # pragma: no cover - the test command installs it (requirements-nodeps.txt)
    quantus = None

STEPS = 16  # deletion steps, as the audit's --di-methods


def films(n: int, data=None, methods=("gradcam",), run=None, seed: int = config.SEED) -> dict:
    """``n`` test films of the run (classes alternating), as the network sees them, with lung masks and maps."""
    handle = runs.open_run(run)
    test = handle.predictions()
    test = test[test["split"] == "test"].sample(frac=1.0, random_state=seed)
    test = test.assign(_r=test.groupby("label").cumcount().values).sort_values("_r", kind="stable").head(n)
    model = handle.model()
    size = cxr_model.input_size(model)
    loaded = load_images(test.reset_index(drop=True), handle.data_root(data), size, handle.lung_crop, None, None, False)
    ci = handle.positive_index
    maps = {m: explain.explain_many(model, loaded["x"], m, class_index=ci) for m in methods}
    return {"model": model, "x": loaded["x"], "lung": loaded["lung"], "maps": maps, "ci": ci,
            "paths": test["path"].to_numpy()[loaded["kept"]].tolist()}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def agreement(pair: dict) -> dict:
    """Spearman rank correlation over films (NaN when either side is constant), largest |difference|, seconds per film."""
    a, b = np.asarray(pair["ours"], float), np.asarray(pair["library"], float)
    ok = np.isfinite(a) & np.isfinite(b)
    const = np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0 if ok.any() else True
    rho = float("nan") if const else float(spearmanr(a[ok], b[ok]).statistic)
    n = max(1, len(a))
    return {"n": int(ok.sum()), "spearman": rho, "identical": bool(np.array_equal(a[ok], b[ok])),
            "max_abs_diff": float(np.max(np.abs(a[ok] - b[ok]))) if ok.any() else float("nan"),
            "ours_ms_per_film": 1000 * pair["ours_s"] / n, "library_ms_per_film": 1000 * pair["library_s"] / n}


# --------------------------------------------------------------------------- pointing game
def pointing_pairs(f: dict, method: str) -> dict:
    """Pointing-game hit and heat mass on the lung masks: core.pointing.point vs Quantus."""
    heat, lung = f["maps"][method], f["lung"]
    ours, t_ours = _timed(lambda: [pointing.point(heat[i], lung[i]) for i in range(len(heat))])
    x, y = f["x"][:, None], np.full(len(heat), f["ci"])
    kw = {"model": None, "x_batch": x, "y_batch": y, "a_batch": heat[:, None], "s_batch": lung[:, None].astype(float),
          "channel_first": True}
    hit, t_hit = _timed(lambda: quantus.PointingGame(disable_warnings=True)(**kw))
    mass, t_mass = _timed(lambda: quantus.RelevanceMassAccuracy(disable_warnings=True)(**kw))
    return {"pointing_hit": {"ours": [p["hit"] for p in ours], "library": np.asarray(hit, float),
                             "ours_s": t_ours / 2, "library_s": t_hit},
            "pointing_mass": {"ours": [p["mass"] for p in ours], "library": np.asarray(mass, float),
                              "ours_s": t_ours / 2, "library_s": t_mass}}


# --------------------------------------------------------------------------- deletion
def deletion_pair(f: dict, method: str, steps: int = STEPS) -> dict:
    """Deletion AUC (image-mean baseline, ``steps`` steps): ours vs Quantus PixelFlipping's curve."""
    model, x, heat, ci = f["model"], f["x"], f["maps"][method], f["ci"]
    ours, t_ours = _timed(lambda: [deletion_insertion(model, x[i], heat[i], ci, steps)[0] for i in range(len(x))])

    def lib():
        pf = quantus.PixelFlipping(features_in_step=x[0].size // steps, perturb_baseline="mean", disable_warnings=True)
        curve = np.asarray(pf(model=model, x_batch=x[..., None], y_batch=np.full(len(x), ci), a_batch=heat[:, None],
                              channel_first=False, softmax=True), float)
        p0 = cxr_model.probabilities(model, x)[:, ci]
        return np.trapezoid(np.concatenate([p0[:, None], curve], axis=1), dx=1 / steps, axis=1)

    got, t_lib = _timed(lib)
    return {"ours": ours, "library": got, "ours_s": t_ours, "library_s": t_lib}


# --------------------------------------------------------------------------- ROAD
def _road_library_imputer(model, x, heat, ci, fractions, seed) -> np.ndarray:
    """Our ROAD (same masks, score and noise) with Quantus's exact full-resolution imputer."""
    p0 = cxr_model.probabilities(model, x)[:, ci]
    out = np.zeros(len(x))
    for i, img in enumerate(x):
        morf, lerf = road.removal_masks(heat[i], fractions, seed + i)
        sigma = road.NOISE * float(img.std())
        filled = [noisy_linear_imputation(arr=img[None], indices=np.flatnonzero(m), noise=sigma)[0]
                  for m in np.concatenate([morf, lerf])]
        d = cxr_model.probabilities(model, np.clip(np.stack(filled), 0, 255))[:, ci] - p0[i]
        out[i] = (d[len(fractions):].mean() - d[: len(fractions)].mean()) / 2
    return out


def road_pairs(f: dict, method: str, fractions=road.FRACTIONS, seed: int = config.SEED,
               library_metric: bool = True) -> dict:
    """ROAD: our combined score vs the library imputer's; our mean MoRF change vs quantus.ROAD (``library_metric``)."""
    model, x, heat, ci = f["model"], f["x"], f["maps"][method], f["ci"]
    ours, t_ours = _timed(lambda: road.road(model, x, {method: heat}, ci, fractions, seed=seed)[method])
    imp, t_imp = _timed(lambda: _road_library_imputer(model, x, heat, ci, fractions, seed))

    def lib():
        # one film per call: quantus.ROAD returns the curve averaged over the batch
        metric = quantus.ROAD(percentages=[round(100 * p) for p in fractions], disable_warnings=True)
        return np.array([np.mean(list(metric(model=model, x_batch=x[i:i + 1, ..., None], y_batch=np.array([ci]),
                                              a_batch=heat[i:i + 1, None], channel_first=False,
                                              softmax=True).values())) for i in range(len(x))])

    out = {"road_imputer": {"ours": ours["combined"], "library": imp, "ours_s": t_ours, "library_s": t_imp}}
    if library_metric:
        got, t_lib = _timed(lib)
        out["road_metric"] = {"ours": ours["morf_mean"], "library": got, "ours_s": t_ours, "library_s": t_lib}
    return out


# --------------------------------------------------------------------------- randomisation check
def _explain_func(method: str):
    def fn(model, inputs, targets, **_kw):
        xx = np.asarray(inputs, np.float32)
        xx = xx[:, 0] if xx.shape[1] == 1 else xx[..., 0]
        return explain.explain_many(model, xx, method, class_index=int(np.asarray(targets).ravel()[0]))[:, None]
    return fn


def randomisation_pairs(f: dict, method: str, seed: int = config.SEED) -> dict:
    """Randomisation check per film: ours vs quantus.MPRT, and ours vs the library's similarity on our maps."""
    model, x, heat, ci = f["model"], f["x"], f["maps"][method], f["ci"]

    def ours_fn():
        rand = randomised_copy(model, seed)
        return rand, sanity_check(model, x, method, class_index=ci, random_model=rand)["spearman"]

    (rand, ours), t_ours = _timed(ours_fn)
    rmaps = explain.explain_many(rand, x, method, class_index=ci)
    ours_full = [spearman(a, b) for a, b in zip(heat, rmaps, strict=True)]
    sim, t_sim = _timed(lambda: [correlation_spearman(a.ravel(), b.ravel()) for a, b in zip(heat, rmaps, strict=True)])

    def lib():
        mprt = quantus.MPRT(return_last_correlation=True, layer_order="top_down", seed=seed, disable_warnings=True,
                            similarity_func=correlation_spearman)
        return mprt(model=model, x_batch=x[..., None], y_batch=np.full(len(x), ci), a_batch=heat[:, None],
                    explain_func=_explain_func(method), channel_first=False, softmax=True)

    got, t_lib = _timed(lib)
    return {"randomisation": {"ours": ours, "library": np.asarray(got, float), "ours_s": t_ours, "library_s": t_lib},
            "randomisation_similarity": {"ours": ours_full, "library": np.asarray(sim, float), "ours_s": t_ours,
                                         "library_s": t_sim}}
