"""How far to trust one heatmap of one film: a short panel of plain sentences with a mark each.

Every row is ``{"key", "title", "mark", "sentence", "value"}``; ``mark`` is ``"green"`` (nothing
found against the map or the film), ``"amber"`` (cannot be judged, or uninformative) or
``"red"`` (a reason to distrust it). The rows:

- ``lungs``: the share of the heat inside the lungs *relative to the lungs' share of the image*
  (``lung_ratio``; 1.0 is what a uniform map gives, since lungs cover only about 28 % of a film).
  Only a map that clearly avoids the lungs is red, so a uniform (or blank) map is never flagged
  as "outside the lungs";
- ``border``: the share of the heat in the border band (10 % of each side, where text, markers
  and collimation edges sit), relative to the band's share of the image;
- ``sanity``: whether this method passed the model randomisation check (Adebayo et al., 2018) for
  this model, read from the run's ``audit.json`` (``python -m core.audit``);
- ``faithfulness``: the drop in the explained class's probability when the hottest 20 % of the
  network's view is removed (set to the image mean), against removing random regions of the
  same size and similar smoothness (:func:`faithfulness`; one batch of ~10 images, a few tens of ms);
- ``frontal``, ``polarity``, ``xray``: the image checks of :mod:`core.checks` (lateral view,
  inverted film, not an X-ray: colour photograph or tint, low contrast, tiny image);
- ``ood``: whether the film is out of the training distribution: the Mahalanobis distance of its
  penultimate features (:func:`core.model.features`) from those of the run's training films
  (mean and Ledoit-Wolf shrunk covariance), compared with the distances of the run's
  validation films. The reference is a plain NPZ in the run folder (``ood_reference.npz``)
  written by :func:`write_reference` (``python -m core.trust reference --run RUN --data DIR``),
  and refused when it was computed for another model.

All cut-offs are in :data:`THRESHOLDS`, here and nowhere else.

CLI::

    python -m core.trust reference [--run RUN] [--data DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from sklearn.covariance import LedoitWolf

from core import checks, config, explain, images, inputs, runs, safepath
from core import model as cmodel
from core.heat import heat_share

# Every cut-off of the panel, in one place.
THRESHOLDS = {
    # heat share in the lungs / lungs' area share (1.0 = a uniform map)
    "lung_ratio_green": 1.25,  # at or above: the map favours the lungs
    "lung_ratio_red": 0.8,  # below: the map avoids the lungs (the only case that warns)
    # heat share in the border band / the band's area share (1.0 = a uniform map)
    "border_band": 0.1,  # band width as a fraction of each side (as in core.audit)
    "border_ratio_green": 0.75,  # at or below: less border heat than a uniform map
    "border_ratio_red": 1.25,  # above: the map favours the border band
    # faithfulness: drop of P(class) when the hottest region is removed, minus the mean drop
    # for random regions of the same size
    "faith_share": 0.2,  # the hottest 20 % of the network's view
    "faith_random": 8,  # random regions per image
    "faith_green": 0.05,  # margin over the random mean (and above every random region): green
    "faith_min_p": 0.05,  # below this P(class) a drop cannot be measured: amber
    # out-of-distribution distance, against the validation films' distances
    "ood_amber_quantile": 0.95,  # farther than 95 % of the validation films: amber
    "ood_red_quantile": 0.99,  # farther than 99 %: red
}
MARKS = ("green", "amber", "red")
REFERENCE_FILE = "ood_reference.npz"


def _row(key: str, title: str, mark: str, sentence: str, value=None) -> dict:
    assert mark in MARKS
    return {"key": key, "title": title, "mark": mark, "sentence": sentence, "value": value}


# --------------------------------------------------------------------------- where the heat lies
def band_area(shape, border: float | None = None) -> float:
    """Share of an image of ``shape`` covered by the border band of :func:`core.heat.heat_share`."""
    border = THRESHOLDS["border_band"] if border is None else border
    rows, cols = shape[:2]
    b_r, b_c = int(round(border * rows)), int(round(border * cols))
    return 1.0 - (rows - 2 * b_r) * (cols - 2 * b_c) / (rows * cols)


def lung_row(heatmap: np.ndarray, lung_mask: np.ndarray | None) -> dict:
    """The ``lungs`` row: heat in the lungs relative to their area (1.0 = uniform map)."""
    title = "Heat on the lungs"
    if lung_mask is None or not np.asarray(lung_mask).any():
        return _row("lungs", title, "amber", "No lungs were found on this film, so where the heat lies relative "
                    "to them cannot be judged.")
    t = heat_share(heatmap, lung_mask, border=THRESHOLDS["border_band"])
    ratio, share, area = t["lung_ratio"], t["in_lung_share"], t["lung_area_share"]
    where = (f"{100 * share:.0f} % of the heat lies in the lungs, which cover {100 * area:.0f} % of the image "
             f"({ratio:.2f} times what a uniform map would put there)")
    if not np.asarray(heatmap).max() > 0:
        return _row("lungs", title, "amber", "The map is blank (no region moved the score), so it shows nothing.",
                    {**t, "blank": True})
    if ratio >= THRESHOLDS["lung_ratio_green"]:
        return _row("lungs", title, "green", f"The map favours the lungs: {where}.", t)
    if ratio < THRESHOLDS["lung_ratio_red"]:
        return _row("lungs", title, "red", f"The map avoids the lungs: {where}. The model may be looking at "
                    "labels, markers, borders or body shape rather than the lungs.", t)
    return _row("lungs", title, "amber", f"The map is about as much on the lungs as a uniform map: {where}.", t)


def border_row(heatmap: np.ndarray) -> dict:
    """The ``border`` row: heat in the border band relative to the band's area."""
    h = np.asarray(heatmap, np.float32)
    share = heat_share(h, np.ones(h.shape, bool), border=THRESHOLDS["border_band"])["border_share"]
    area = band_area(h.shape)
    ratio = share / area
    title = "Heat on the border"
    text = (f"{100 * share:.0f} % of the heat lies in the border band, which covers {100 * area:.0f} % of the "
            f"image")
    value = {"border_share": share, "band_area": area, "border_ratio": ratio}
    if not h.max() > 0:
        return _row("border", title, "amber", "The map is blank, so there is no heat on the border either.", value)
    if ratio <= THRESHOLDS["border_ratio_green"]:
        return _row("border", title, "green", f"Little heat on the border: {text}.", value)
    if ratio > THRESHOLDS["border_ratio_red"]:
        return _row("border", title, "red", f"The map favours the border, where text and markers sit: {text}.", value)
    return _row("border", title, "amber", f"About as much heat on the border as a uniform map: {text}.", value)


# --------------------------------------------------------------------------- faithfulness
def _random_regions(shape, n: int, share: float, seed: int) -> np.ndarray:
    """n boolean masks (n, H, W), each the top ``share`` of a smooth random map (blobs, like a CAM)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    out = np.zeros((n, h, w), bool)
    k = int(round(share * h * w))
    for i in range(n):
        noise = rng.random((8, 8)).astype(np.float32)
        smooth = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
        order = np.argsort(-smooth.ravel(), kind="stable")[:k]
        out[i].flat[order] = True
    return out


def faithfulness(model, image: np.ndarray, heatmap: np.ndarray, class_index: int = config.COVID_INDEX,
                 seed: int = config.SEED) -> dict:
    """Does removing the map's hottest region lower the score more than removing a random one?

    ``image`` is the network's input (size, size) raw grey, ``heatmap`` the map on that grid. The
    hottest :data:`THRESHOLDS` ``faith_share`` of the pixels are set to the image's mean; so
    are, in turn, ``faith_random`` random smooth regions of the same pixel count. All go through
    the model in one batch. Returns ``p`` (original probability of the class), ``drop_top``,
    ``drop_random`` (list), ``score`` (= drop_top - mean random drop) and ``blank``.
    """
    x = np.asarray(image, np.float32)
    h = np.nan_to_num(np.asarray(heatmap, np.float32))
    share, n = THRESHOLDS["faith_share"], int(THRESHOLDS["faith_random"])
    k = int(round(share * x.size))
    top = np.zeros(x.shape, bool)
    top.flat[np.argsort(-h.ravel(), kind="stable")[:k]] = True
    regions = np.concatenate([top[None], _random_regions(x.shape, n, share, seed)])
    batch = np.concatenate([x[None], np.where(regions, x.mean(), x[None])])
    p = cmodel.probabilities(model, batch)[:, class_index]
    drops = p[0] - p[1:]
    return {"p": float(p[0]), "drop_top": float(drops[0]), "drop_random": [float(d) for d in drops[1:]],
            "score": float(drops[0] - drops[1:].mean()), "blank": bool(not np.ptp(h) > 0)}


def faithfulness_row(res: dict, class_name: str = "covid") -> dict:
    """The ``faithfulness`` row from :func:`faithfulness`."""
    title = "Faithfulness"
    rand = np.asarray(res["drop_random"])
    pct = int(round(100 * THRESHOLDS["faith_share"]))
    text = (f"removing the hottest {pct} % of the film lowers P({class_name}) by {res['drop_top']:+.2f} "
            f"(from {res['p']:.2f}); random regions of the same size lower it by {rand.mean():+.2f} on average")
    if res["blank"]:
        return _row("faithfulness", title, "amber", "The map is blank, so it cannot be tested against random "
                    "regions.", res)
    if res["p"] < THRESHOLDS["faith_min_p"]:
        return _row("faithfulness", title, "amber", f"P({class_name}) is only {res['p']:.2f}, too low for a drop "
                    "to show whether the map points at what the model uses.", res)
    if res["score"] >= THRESHOLDS["faith_green"] and res["drop_top"] > rand.max():
        return _row("faithfulness", title, "green", f"The map points at what the model uses: {text}.", res)
    if res["score"] <= 0:
        return _row("faithfulness", title, "red", f"The map's hottest region matters no more than a random one: "
                    f"{text}.", res)
    return _row("faithfulness", title, "amber", f"The map's hottest region matters only a little more than a "
                f"random one: {text}.", res)


# --------------------------------------------------------------------------- sanity check
def sanity_row(audit_summary: dict | None, method: str, model_sha256: str | None) -> dict:
    """The ``sanity`` row: did ``method`` pass the randomisation check for this model (audit.json)?"""
    title = "Randomisation check"
    name = explain.TITLES.get(method, method)
    if not audit_summary:
        return _row("sanity", title, "amber", "This run has not been audited (`python -m core.audit --run RUN`), "
                    "so whether its maps depend on what the model learned is unknown.")
    if model_sha256 and audit_summary.get("model_sha256") not in (None, model_sha256):
        return _row("sanity", title, "amber", "The run's audit was made for another model file; audit it again.")
    s = ((audit_summary.get("methods") or {}).get(method) or {}).get("sanity")
    if not s and audit_summary.get("sanity_note"):  # a black box: its weights cannot be re-initialised
        return _row("sanity", title, "amber", f"{name} has no randomisation check: {audit_summary['sanity_note']}.")
    if not s:
        return _row("sanity", title, "amber", f"{name} was not part of this run's randomisation check "
                    f"(`python -m core.audit --methods {method}`).")
    r, thr = float(s["spearman_mean"]), float(s["threshold"])
    if s["passes"]:
        return _row("sanity", title, "green", f"{name} passed the randomisation check for this model: its maps "
                    f"change when the learned weights are scrambled (mean Spearman {r:.2f} < {thr}).", s)
    return _row("sanity", title, "red", f"{name} FAILED the randomisation check for this model: its maps barely "
                f"change when the learned weights are scrambled (mean Spearman {r:.2f} >= {thr}), so they show "
                "the image more than the model.", s)


# --------------------------------------------------------------------------- image checks
def image_rows(warnings: list[str]) -> list[dict]:
    """The ``frontal``, ``polarity`` and ``xray`` rows from :func:`core.checks.image_warnings`."""
    ws = set(warnings)
    lateral = checks.WARN_LATERAL in ws
    inverted = checks.WARN_INVERTED in ws
    other = [w for w in warnings if w not in (checks.WARN_LATERAL, checks.WARN_INVERTED)]
    rows = [
        _row("frontal", "Frontal view", "red" if lateral else "green",
             checks.WARN_LATERAL if lateral else "It looks like a frontal film (a bright midline between two darker "
             "lung fields)."),
        _row("polarity", "Polarity", "red" if inverted else "green",
             checks.WARN_INVERTED if inverted else "It is not inverted (the lungs are darker than the midline)."),
    ]
    if any(w in (checks.WARN_PHOTO, checks.WARN_LOW_CONTRAST) for w in other):
        rows.append(_row("xray", "An X-ray", "red", " ".join(other)))
    elif other:
        rows.append(_row("xray", "An X-ray", "amber", " ".join(other)))
    else:
        rows.append(_row("xray", "An X-ray", "green", "It looks like a grey X-ray of usable size and contrast."))
    return rows


# --------------------------------------------------------------------------- out of distribution
def reference(train_features: np.ndarray, val_features: np.ndarray) -> dict:
    """OOD reference statistics from penultimate features of training and validation films.

    Mean and Ledoit-Wolf shrunk precision of the training features; the validation films'
    distances (which the thresholds are read against: training films sit closer than new ones).
    """
    tr = np.asarray(train_features, np.float64)
    lw = LedoitWolf().fit(tr)
    ref = {"mean": lw.location_, "precision": lw.precision_, "n_train": np.int64(len(tr))}
    ref["val_distances"] = np.sort(distance(ref, val_features))
    return ref


def reference_by_folds(features: np.ndarray, folds: np.ndarray) -> dict:
    """OOD reference of a cross-validated run: every development film, and cut-off distances
    measured fold by fold (each fold's films against statistics fitted without them).

    Each development film was seen by most members of the ensemble, so new films sit farther
    than these distances suggest: the amber/red marks err towards warning.
    """
    f = np.asarray(features, np.float64)
    folds = np.asarray(folds)
    ref = reference(f, f[:0])
    val = []
    for k in np.unique(folds):
        lw = LedoitWolf().fit(f[folds != k])
        val.append(distance({"mean": lw.location_, "precision": lw.precision_}, f[folds == k]))
    ref["val_distances"] = np.sort(np.concatenate(val))
    return ref


def distance(ref: dict, feats: np.ndarray) -> np.ndarray:
    """Mahalanobis distances (n,) of features (n, d) from the reference."""
    d = np.atleast_2d(np.asarray(feats, np.float64)) - np.asarray(ref["mean"])
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, np.asarray(ref["precision"]), d), 0.0))


def write_reference(run=None, data=None, progress: bool = True) -> Path:
    """Compute the OOD reference of a run into ``ood_reference.npz`` (from split.csv: train and val
    films, or for a cross-validated run its development films, fold by fold)."""
    run = runs.open_run(run)
    model = run.model()
    split = run.split()
    root = run.data_root(data)
    size = cmodel.input_size(model)

    def features_of(rows):
        films = []
        for p in rows["path"].astype(str):
            try:
                films.append(images.decode(safepath.read_film(root, p), p))
            except images.ImageError as exc:
                print(f"skipped {exc}", file=sys.stderr)
        if not films:
            raise FileNotFoundError(f"none of the {len(rows)} films of {run.name} could be read under {root}")
        x = np.concatenate([inputs.prepare(films[i : i + 64], size, run.lung_crop)[0]
                            for i in range(0, len(films), 64)])
        return cmodel.features(model, x, layer=(run.adopted or {}).get("penultimate"))

    if (split["split"] == "val").any():  # a run with a validation split: fitted on train, cut-offs from val
        if progress:
            print(f"train and val films: {int(split['split'].isin(['train', 'val']).sum())}", file=sys.stderr)
        ref = reference(features_of(split[split["split"] == "train"]), features_of(split[split["split"] == "val"]))
    else:  # a cross-validated run: its development films and their folds
        dev = split[split["split"] == "train"]
        if progress:
            print(f"development films: {len(dev)}", file=sys.stderr)
        ref = reference_by_folds(features_of(dev), dev["fold"].to_numpy())
    ref["model_sha256"] = np.array(runs.sha256(run.file("model.keras")))
    path = run.file(REFERENCE_FILE)
    tmp = run.file(f".{REFERENCE_FILE}.tmp.npz")
    np.savez(tmp, **ref)
    tmp.replace(path)
    return path


def load_reference(run) -> dict | None:
    """A run's ``ood_reference.npz`` as a dict of arrays, or None when absent or unreadable."""
    path = Path(run) / REFERENCE_FILE
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return None


def ood_row(ref: dict | None, features: np.ndarray | None, model_sha256: str | None) -> dict:
    """The ``ood`` row: is this film's feature vector like those of the training films?"""
    title = "Like the training films"
    if ref is None or features is None:
        return _row("ood", title, "amber", "This run has no out-of-distribution reference "
                    "(`python -m core.trust reference --run RUN`), so it cannot say whether the film is unlike "
                    "the training films.")
    if model_sha256 and str(ref.get("model_sha256")) != model_sha256:
        return _row("ood", title, "amber", "The run's out-of-distribution reference was made for another model "
                    "file; compute it again.")
    d = float(distance(ref, features)[0])
    val = np.asarray(ref["val_distances"])
    q_a = float(np.quantile(val, THRESHOLDS["ood_amber_quantile"]))
    q_r = float(np.quantile(val, THRESHOLDS["ood_red_quantile"]))
    beyond = float((val < d).mean())
    value = {"distance": d, "amber_at": q_a, "red_at": q_r, "share_of_val_closer": beyond}
    text = (f"its features lie at distance {d:.1f} from the training films, farther than {100 * beyond:.0f} % of "
            "the validation films")
    if d > q_r:
        return _row("ood", title, "red", f"Unlike the films the model was trained on: {text}. Its answer may "
                    "mean little.", value)
    if d > q_a:
        return _row("ood", title, "amber", f"Somewhat unusual for this model: {text}.", value)
    return _row("ood", title, "green", f"Typical of the training films: {text}.", value)


def panel(heatmap: np.ndarray, lung_mask: np.ndarray | None, faith: dict, *, method: str,
          audit_summary: dict | None, model_sha256: str | None, warnings: list[str],
          reference: dict | None, features: np.ndarray | None, class_name: str = "covid") -> list[dict]:
    """Every row of the trust panel of one map (on the network's grid, with the lung mask there)."""
    return [
        lung_row(heatmap, lung_mask),
        border_row(heatmap),
        sanity_row(audit_summary, method, model_sha256),
        faithfulness_row(faith, class_name),
        *image_rows(warnings),
        ood_row(reference, features, model_sha256),
    ]


def row(rows: list[dict], key: str) -> dict | None:
    """The row of a panel with this ``key`` (``lungs``, ``border``, ``sanity``, ``faithful``, ...), None if absent."""
    return next((r for r in rows if r["key"] == key), None)


def overall(rows: list[dict]) -> str:
    """The worst mark of a panel."""
    marks = [r["mark"] for r in rows]
    return "red" if "red" in marks else ("amber" if "amber" in marks else "green")


# --------------------------------------------------------------------------- burned-in text and markers
# heat share on the markers (core.markers) / their share of the network's view (1.0 = a uniform map)
MARKER_THRESHOLDS = {
    "ratio_red": 3.0,  # at or above (with share_red): the map piles up on text or markers
    "share_red": 0.10,
    "ratio_amber": 1.5,  # at or above (with share_amber): more on them than a uniform map
    "share_amber": 0.05,
}


def marker_row(heatmap: np.ndarray, marker_mask: np.ndarray | None) -> dict:
    """The ``markers`` row: heat on burned-in text and markers (:func:`core.markers.detect`) against their area."""
    title = "Heat on text and markers"
    if marker_mask is None or not np.asarray(marker_mask).any():
        return _row("markers", title, "green", "No burned-in text or markers were found where the network looks.",
                    {"marker_share": 0.0, "marker_area": 0.0, "marker_ratio": None})
    t = heat_share(heatmap, marker_mask, border=THRESHOLDS["border_band"])
    share, area = t["in_lung_share"], t["lung_area_share"]
    ratio = share / area if area > 0 else float("nan")
    value = {"marker_share": share, "marker_area": area, "marker_ratio": ratio}
    text = (f"{100 * share:.0f} % of the heat lies on burned-in text and markers, which cover {100 * area:.1f} % of "
            f"the image ({ratio:.1f} times what a uniform map would put there)")
    if not np.asarray(heatmap).max() > 0:
        return _row("markers", title, "amber", "The map is blank, so it shows nothing on the markers either.", value)
    th = MARKER_THRESHOLDS
    if ratio >= th["ratio_red"] and share >= th["share_red"]:
        return _row("markers", title, "red", f"The map piles up on text or markers: {text}. The model may read the "
                    "film's labels rather than the lungs.", value)
    if ratio >= th["ratio_amber"] and share >= th["share_amber"]:
        return _row("markers", title, "amber", f"More heat on text and markers than a uniform map: {text}.", value)
    return _row("markers", title, "green", f"Little heat on text and markers: {text}.", value)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m core.trust",
        description="Trust panel support. 'reference' computes a run's out-of-distribution reference "
                    "(penultimate features of its training and validation films) into the run's "
                    f"{REFERENCE_FILE}.",
    )
    p.add_argument("command", choices=("reference",))
    p.add_argument("--run", default=None, help="run folder or name (default: the shipped model, assets/model)")
    p.add_argument("--data", default=None, help="data root (default: $CXR_DATA_DIR or data/)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args(argv)
    try:
        path = write_reference(args.run, args.data, progress=not args.json)
    except (FileNotFoundError, runs.RunError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ref = load_reference(path.parent)
    out = {"path": str(path), "n_train": int(ref["n_train"]), "n_val": int(len(ref["val_distances"])),
           "val_distance_q95": float(np.quantile(ref["val_distances"], THRESHOLDS["ood_amber_quantile"])),
           "val_distance_q99": float(np.quantile(ref["val_distances"], THRESHOLDS["ood_red_quantile"]))}
    print(json.dumps(out) if args.json else f"wrote {path} ({out['n_train']} training films, {out['n_val']} "
          f"validation films; amber beyond {out['val_distance_q95']:.1f}, red beyond {out['val_distance_q99']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
