"""The steps of the whole-run audit (:func:`core.audit.run_audit`), one function each.

Images are prepared through ``core.inputs``: a lung-crop run is audited on what its network
sees, with the lung masks and expert boxes mapped into that view by ``inputs.from_film``
(:func:`load_images`). Then every method's maps (:func:`explain_all`), where their heat lies
(:func:`trust_table`), the randomisation check (:func:`sanity_checks`), ROAD
(:func:`road_step`), the pointing game (:func:`pointing_step`), the source probe
(:func:`source_probe_step`) and per-slice metrics (:func:`slices_step`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from core import (
    config,
    datasets,
    explain,
    images,
    inputs,
    lungs,
    metrics,
    pointing,
    road,
    safepath,
    slices,
    source_probe,
)
from core import model as cxr_model
from core.audit_checks import deletion_insertion, sanity_result
from core.heat import corner_share, heat_share

RANDOM_PER_IMAGE = 8  # random maps per image for the pointing game's baseline


def mean_ci(values, groups=None, n_boot: int = 1000) -> dict:
    """Mean of ``values`` with a (patient-grouped) bootstrap CI, and ``n``; without groups, finite values only."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)] if groups is None else v
    if len(v) == 0:
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    r = metrics.ci(lambda _y, p: float(np.nanmean(p)), np.zeros(len(v)), v, groups, n_boot=n_boot)
    return {**r, "n": int(len(v))}


def _small_film(film: np.ndarray, side: int = 256) -> np.ndarray:
    """The film with its longer side at most ``side`` (aspect kept): enough for masks and boxes."""
    h, w = film.shape
    s = min(1.0, side / max(h, w))
    if s >= 1.0:
        return film
    return cv2.resize(film, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def load_images(table: pd.DataFrame, root: Path, size: int, crop, boxes: dict | None = None,
                lung_model=None, progress: bool = True, desc: str = "load") -> dict:
    """Step 2: films -> what the network sees (``core.inputs``), with lungs and expert boxes in that view.

    Returns ``x`` (n, size, size), ``boxes`` (n, 4; the region of each film the network sees),
    ``fell_back`` (n,), ``lung`` (n, size, size) bool (the lung net's mask of the film, mapped
    with ``inputs.from_film``), ``expert`` (list: the expert lung boxes as a mask in the same
    view, None where the film has none), ``kept`` (row indices that loaded) and ``errors``.
    """
    boxes = boxes or {}
    out = {"x": [], "boxes": [], "fell_back": [], "lung": [], "expert": [], "kept": [], "errors": []}
    paths = table["path"].astype(str).tolist()
    need = inputs.needed_side(size, crop)  # as core.predict reads films; once (it reads the lung net's record)
    for start in tqdm(range(0, len(paths), 16), desc=desc, disable=not progress, file=sys.stderr):
        films, idx = [], []
        for i in range(start, min(start + 16, len(paths))):
            try:
                films.append(images.decode(safepath.read_film(root, paths[i]), paths[i], need=need))
                idx.append(i)
            except images.ImageError as exc:
                out["errors"].append({"path": paths[i], "reason": exc.reason})
        if not films:
            continue
        x, bx, fb = inputs.prepare(films, size, crop, lung_model)
        for film, b, i in zip(films, bx, idx, strict=True):
            small = _small_film(film)
            lung = lungs.mask(small, model=lung_model).astype(np.float32)
            out["lung"].append(inputs.from_film(lung, b, size) >= 0.5)
            ex = boxes.get(paths[i])
            out["expert"].append(None if ex is None else
                                 inputs.from_film(pointing.box_mask(ex, small.shape).astype(np.float32), b, size) >= 0.5)
        out["x"].append(x)
        out["boxes"].append(bx)
        out["fell_back"].append(fb)
        out["kept"] += idx
    out["x"] = np.concatenate(out["x"]) if out["x"] else np.zeros((0, size, size), np.float32)
    out["boxes"] = np.concatenate(out["boxes"]) if out["boxes"] else np.zeros((0, 4))
    out["fell_back"] = np.concatenate(out["fell_back"]) if out["fell_back"] else np.zeros(0, bool)
    out["lung"] = np.stack(out["lung"]) if out["lung"] else np.zeros((0, size, size), bool)
    return out


def test_rows(ctx: dict, loaded: dict) -> pd.DataFrame:
    """Step 2b: the test rows that loaded, with ``y`` (1 = the explained class) and the resampling ``group``."""
    test = ctx["test"].iloc[loaded["kept"]].reset_index(drop=True)
    if len(test) == 0:
        raise FileNotFoundError(f"none of the {len(ctx['test'])} test images could be read under {ctx['root']}")
    if "class" not in test:
        test["class"] = test["label"]
    if "label" not in test:
        test["label"] = test["class"]
    if "patient_id" not in test:
        test["patient_id"] = test["path"]
    # Images without a patient id are their own resampling unit.
    test["patient_id"] = test["patient_id"].where(test["patient_id"].notna(), test["path"]).astype(str)
    if "group" not in test:
        test["group"] = test["patient_id"]
    test["group"] = test["group"].where(test["group"].notna(), test["patient_id"]).astype(str)
    test["y"] = (test["class"].astype(str) == ctx["classes"][ctx.get("ci", 0)]).astype(int)
    return test


def usable_methods(model, methods) -> tuple[list[str], dict[str, str]]:
    """Step 1b: the requested methods that apply to ``model`` and {method: why not} for the others
    (:func:`core.explain.applicable`: no reachable convolution layer, no gradients through a
    SavedModel signature). When none applies, the output-only occlusion instead, so that a black
    box still gets maps."""
    why = explain.applicable(model)
    kept = [m for m in methods if why.get(m) is None]
    left_out = {m: why[m] for m in methods if why.get(m) is not None}
    return (kept or ["occlusion"]), left_out


def explain_all(model, x: np.ndarray, methods, progress: bool = True,
                class_index: int = config.COVID_INDEX) -> dict[str, np.ndarray]:
    """Step 3: every method's maps of the explained (positive) class for every image, (n, size, size)."""
    t0 = time.time()
    # one call: the gradient CAMs share one forward and backward pass, Score-CAM batches its masked copies
    out = explain.explain_shared(model, x, list(methods), class_index=class_index)
    if progress:
        print(f"audit: {', '.join(methods)} maps for {len(x)} images in {time.time() - t0:.1f} s", file=sys.stderr)
    return out


def trust_table(model, test: pd.DataFrame, x, lung, maps: dict, di_methods=(), steps: int = 16,
                class_index: int = config.COVID_INDEX) -> pd.DataFrame:
    """Step 4: one row per image and method: where the heat lies (:func:`core.heat.heat_share`), and deletion/insertion
    AUCs for ``di_methods``."""
    rows = []
    for method, heat in maps.items():
        for i in range(len(test)):
            r = test.iloc[i]
            row = {"path": r["path"], "source": r["source"], "label": r["label"], "class": r["class"],
                   "patient_id": r["patient_id"], "group": r["group"], "method": method, **heat_share(heat[i], lung[i]),
                   **corner_share(heat[i])}
            if method in di_methods:
                row["deletion_auc"], row["insertion_auc"] = deletion_insertion(
                    model, x[i], heat[i], class_index, steps)
            rows.append(row)
    return pd.DataFrame(rows)


def sanity_checks(model, x, methods, n: int, random_model, seed: int = config.SEED, maps: dict | None = None,
                  class_index: int = config.COVID_INDEX) -> dict:
    """Step 5: the randomisation check (:func:`core.audit_checks.sanity_check`) of each method on ``n`` images.

    ``maps`` (explain_all's maps of the trained model) are reused for the picked images; the
    randomised model's maps of all methods are computed batched (:func:`core.explain.explain_shared`).
    """
    if not n:
        return {}
    pick = np.random.default_rng(seed).choice(len(x), size=min(n, len(x)), replace=False)
    have = maps or {}
    trained = {m: have[m][pick] for m in methods if m in have}
    missing = [m for m in methods if m not in trained]
    if missing:
        trained.update(explain.explain_shared(model, x[pick], missing, class_index))
    rand = explain.explain_shared(random_model, x[pick], list(methods), class_index)
    return {m: {**sanity_result(m, trained[m], rand[m]), "_pick": pick} for m in methods}


def _group_means(values: np.ndarray, test: pd.DataFrame, classes, n_boot: int) -> dict:
    """Mean with a patient-bootstrap CI over all images, per class and per source (finite values only)."""
    out = {}
    ok = np.isfinite(values)
    for name, sel in [("all", ok)] + [(c, ok & (test["class"] == c).to_numpy()) for c in classes] + \
            [(f"source:{s}", ok & (test["source"] == s).to_numpy()) for s in sorted(test["source"].unique())]:
        if sel.any():
            out[name] = mean_ci(values[sel], test["group"].to_numpy()[sel], n_boot)
    return out


ROAD_BUDGET_GMAC = 6000.0  # ROAD's forward passes, in multiply-adds: all 221 test films of the shipped net (~0.2 GMAC)
ROAD_MIN_FILMS = 32  # ... and never fewer films than this (a DenseNet121 at 224 px, 2.8 GMAC, gets 35)


def forward_gmacs(model) -> float:
    """Multiply-adds (billions) of one forward pass of one image through the convolution and dense
    layers (nested models included); 0.0 when they cannot be reached (a SavedModel signature)."""
    total = 0
    for layer, _ in cxr_model.walk(model):
        kernel = getattr(layer, "kernel", None)
        if kernel is None or len(kernel.shape) not in (2, 4):
            continue
        try:
            out = layer.output.shape
        except (AttributeError, ValueError):  # a layer called more than once has no single output
            continue
        k = [int(v) for v in kernel.shape]
        total += int(np.prod(k)) * (int(out[1]) * int(out[2]) if len(k) == 4 and len(out) == 4 else 1)
    return total / 1e9


def road_n_auto(model, n_maps: int, fractions=road.FRACTIONS) -> int | None:
    """How many films ROAD scores by default: as many as :data:`ROAD_BUDGET_GMAC` pays for (at
    2 x fractions x maps passes per film), at least :data:`ROAD_MIN_FILMS`; None (all) when the
    model's cost is unknown. Deterministic: it depends on the model, not on the machine's speed."""
    gmacs = forward_gmacs(model)
    if gmacs <= 0:
        return None
    return max(ROAD_MIN_FILMS, int(ROAD_BUDGET_GMAC / (2 * len(fractions) * n_maps * gmacs)))


def road_films(test: pd.DataFrame, n: int | None, seed: int = config.SEED) -> np.ndarray:
    """Row indices (sorted) of the films ROAD scores: all, or ``n`` of them drawn seeded and
    round-robin over classes (as ``core.audit``'s ``--limit``: every class kept, equal numbers
    while a class has films left)."""
    if not n or n >= len(test):
        return np.arange(len(test))
    order = np.random.default_rng(seed).permutation(len(test))
    rank = pd.Series(test["class"].to_numpy()[order]).groupby(test["class"].to_numpy()[order]).cumcount().to_numpy()
    return np.sort(order[np.argsort(rank, kind="stable")[:n]])


def road_step(model, test: pd.DataFrame, x, lung, maps: dict, classes, fractions=road.FRACTIONS,
              n_boot: int = 1000, seed: int = config.SEED, progress: bool = True,
              class_index: int = config.COVID_INDEX, n_films: int | None = None) -> tuple[dict, dict]:
    """Step 6: ROAD (:mod:`core.road`) of every method, of a random-map baseline and of the lungs.

    The ``lungs`` map ranks pixels by how deep inside the lung mask they lie: its ROAD says
    whether removing the lungs (with imputation) moves the score more than removing the rest.
    ROAD costs 2 x fractions x maps forward passes per film (60 by default): with ``n_films`` it
    scores a class-stratified seeded sample of that many films (:func:`road_films`; -1: as many as
    :func:`road_n_auto` budgets), and the summary says so (``n``, ``n_of``). Returns the summary and per-image columns
    ``{name: combined (n,)}`` (NaN on films outside the sample).
    """
    if n_films == -1:  # the audit's default: as many films as the ROAD budget pays for at this model's cost
        n_films = road_n_auto(model, len(maps) + 2, fractions)
    pick = road_films(test, n_films, seed)
    sub, xs, ls = test.iloc[pick].reset_index(drop=True), x[pick], lung[pick]
    all_maps = {**{k: v[pick] for k, v in maps.items()}, "random": road.random_maps(len(xs), x.shape[1:], seed),
                "lungs": np.stack([road.region_map(m) for m in ls]) if len(ls) else np.zeros(xs.shape)}
    bar = tqdm(total=len(xs), desc="audit ROAD", disable=not progress, file=sys.stderr)
    res = road.road(model, xs, all_maps, class_index, fractions, seed=seed, progress=bar.update)
    bar.close()
    summary = {"fractions": list(fractions), "grid": road.GRID, "noise": road.NOISE, "score": f"P({classes[class_index]})",
               "n": int(len(pick)), "n_of": int(len(test)),
               "films": "all" if len(pick) == len(test) else
               f"a class-stratified seeded sample of {len(pick)} of {len(test)} films (--road-n)", "maps": {}}
    for name, r in res.items():
        d = {k: _group_means(r[k], sub, classes, n_boot) for k in ("combined", "morf_mean", "lerf_mean")}
        d["curve"] = {"morf": r["morf"].mean(axis=0).tolist(), "lerf": r["lerf"].mean(axis=0).tolist()}
        if name != "random":
            d["vs_random"] = mean_ci(r["combined"] - res["random"]["combined"], sub["group"].to_numpy(), n_boot)
        summary["maps"][name] = d
    cols = {}
    for name, r in res.items():
        cols[name] = np.full(len(test), np.nan)
        cols[name][pick] = r["combined"]
    return summary, cols


def _point(heat: np.ndarray, region: np.ndarray) -> dict:
    """:func:`core.pointing.point` of one map, or the mean over a stack of (baseline) maps."""
    if heat.ndim == 2:
        return pointing.point(heat, region)
    pts = [pointing.point(h, region) for h in heat]
    return {k: float(np.mean([p[k] for p in pts])) for k in ("hit", "mass", "area")}


def pointing_step(test: pd.DataFrame, lung, expert: list, maps: dict, n_boot: int = 1000,
                  seed: int = config.SEED) -> tuple[dict, pd.DataFrame]:
    """Step 7: pointing game and heat mass of every method (and a random-map baseline) against the
    expert lung boxes (images that have them) and against the lung masks (every image)."""
    n = len(test)
    # The baseline: RANDOM_PER_IMAGE smooth random maps per image, averaged (several draws keep it from
    # being noisy). The peak of any smooth map over a bounded image lies on its edge more often than
    # the edge's share of the area, so a random map hits a central region somewhat less often than
    # that region's area share: compare a method with this baseline, not with the area.
    rand = road.random_maps(n * RANDOM_PER_IMAGE, lung.shape[1:], seed + 1).reshape(
        (n, RANDOM_PER_IMAGE) + lung.shape[1:]) if n else np.zeros((0, RANDOM_PER_IMAGE) + lung.shape[1:])
    with_box = np.array([e is not None for e in expert], bool)
    cols = {}
    summary = {"rule": "hit: the map's maximum lies in the region; mass: share of the map's energy inside",
               "boxes": {"n": int(with_box.sum()), "methods": {}},
               "lungs": {"n": n, "methods": {}}}
    g = test["group"].to_numpy()
    for name, heat in {**maps, "random": rand}.items():
        for region, masks, sel in (("boxes", expert, with_box), ("lungs", list(lung), np.ones(n, bool))):
            pts = [_point(heat[i], masks[i]) if sel[i] else {"hit": np.nan, "mass": np.nan, "area": np.nan}
                   for i in range(n)]
            hit = np.array([p["hit"] for p in pts])
            mass = np.array([p["mass"] for p in pts])
            area = np.array([p["area"] for p in pts])
            if name != "random":
                cols[(name, f"{region}_hit")] = hit
                cols[(name, f"{region}_mass")] = mass
            if not sel.any():
                continue
            summary[region]["methods"][name] = {
                "hit": mean_ci(hit[sel], g[sel], n_boot), "mass": mean_ci(mass[sel], g[sel], n_boot),
                "area": float(area[sel].mean())}
    return summary, cols


def source_probe_step(model, random_model, x, test: pd.DataFrame, ext: dict | None, n_boot: int = 1000,
                      seed: int = config.SEED, layer: str | None = None) -> tuple[dict, dict]:
    """Step 8: the source probe (:mod:`core.source_probe`) on the trained penultimate features
    (:func:`core.model.features`; ``layer``: config ``adopted.penultimate``) and on those of the
    random-weights copy (the floor), over the test images plus any external ones."""
    cols = ["path", "source", "label", "group"]
    pool = test[cols]
    xs = x
    if ext is not None and len(ext["x"]):
        rows = ext["rows"].assign(group=ext["rows"].get("group", ext["rows"]["patient_id"]))
        pool = pd.concat([pool, rows[cols]], ignore_index=True)
        xs = np.concatenate([x, ext["x"]])
    out = {"n": int(len(pool)), "n_external": int(len(pool) - len(test)), "min_images": source_probe.MIN_IMAGES,
           "folds": source_probe.FOLDS}
    p_true = {}
    for name, net in (("model", model), ("random", random_model)):
        if net is None:  # a black box has no random-weights copy: no floor
            out[name] = {"reason": "no random-weights copy of a black box (its weights cannot be reached)"}
            continue
        try:
            feats = cxr_model.features(net, xs, layer=layer)
        except ValueError as exc:  # no reachable Dense layer (a SavedModel signature): no penultimate features
            return {**out, "reason": f"no penultimate features: {exc}"}, {}
        out["n_features"] = int(feats.shape[1])
        res = source_probe.source_probes(feats, pool["source"], pool["label"], pool["group"].astype(str),
                                         n_boot, seed)
        p_true[name] = {k: v.pop("_p_true")[: len(test)] for k, v in res.items()}
        out[name] = res
    return out, p_true


def slices_step(ctx: dict, test: pd.DataFrame, p: np.ndarray, n_boot: int = 1000, seed: int = config.SEED) -> dict:
    """Step 9: AUC, sensitivity and specificity per metadata slice (:mod:`core.slices`) at the run's
    validation-chosen threshold (0.5 without metrics.json)."""
    meta = test[["path", "source", "label"]].copy()
    try:
        table = datasets.load_table(ctx["root"])
        extra = [c for c in slices.COLUMNS if c in table.columns and c not in meta.columns]
        meta = meta.merge(table[["path"] + extra].drop_duplicates("path"), on="path", how="left")
    except (FileNotFoundError, ValueError, OSError):
        pass
    threshold = ctx["handle"].threshold
    threshold = 0.5 if threshold is None else threshold
    return slices.slice_metrics(meta, test["y"], p, test["group"], threshold, n_boot=n_boot, seed=seed)
