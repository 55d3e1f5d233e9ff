"""How severe a COVID-19 film looks: geographic extent (0-8) and opacity (0-6) from expert scores.

The ieee8023 collection carries severity scores for about a hundred of its COVID-19 films
(``ieee8023/annotations/covid-severity-scores.csv``, mean of 3 expert raters; Cohen et al.,
"Predicting COVID-19 Pneumonia Severity on Chest X-Ray with Deep Learning", arXiv:2005.11856,
who report MAE ~1.14 for extent and ~0.78 for opacity with features pretrained on large CXR
sets). This module fits a small ridge regression on features of each scored film:

- ``classifier``: the run's penultimate features (:func:`core.model.features`, after the run's
  own preparation through :mod:`core.inputs`, so a lung-cropped run gives lung-cropped
  features); they change whenever the classifier does;
- ``lungs``: intensity statistics of the lung fields found by the shipped lung U-Net (how bright
  and how uneven each third of each lung is, relative to the film); they do not depend on the
  classifier;
- ``both``: the two side by side.

Evaluation is patient-grouped, nested cross-validation: the outer folds (patients, never
images, are held out) measure; inside each training part an inner grouped CV picks the feature
set and the ridge penalty. The baseline predicts the training part's mean. MAE, Pearson r and
the MAE difference to the baseline get 95 % patient-bootstrap CIs over the out-of-fold
predictions. The final model is then fitted on all scored films with the choice that the CV
over all of them prefers; it is written as plain JSON (``assets/severity/severity.json``:
scaler, coefficients, the CV figures and the sha256 of the classifier and lung model its
features come from) with a card (``CARD.md``) and a figure (``cv_scatter.png``). A model that
does not beat the baseline on both scores is written with ``"show": false`` and the dashboard
does not show it.

CLI::

    python -m core.severity train [--run RUN] [--data DIR] [--out assets/severity]
    python -m core.severity evaluate [--run RUN] [--data DIR] [--json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from core import config, datasets, explain, images, inputs, lungs, runs
from core import model as cmodel

SCORES_CSV = Path("ieee8023") / "annotations" / "covid-severity-scores.csv"
ASSET_DIR = config.ASSETS_DIR / "severity"
TARGETS = {"geographic": ("geographic_mean", 8.0), "opacity": ("opacity_mean", 6.0)}
FEATURE_SETS = ("classifier", "lungs", "both")
ALPHAS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
OUTER_FOLDS = 5
INNER_FOLDS = 4
N_BAGS = 10  # ridge fits averaged (each on 80 % of the patients)
BAG_SHARE = 0.8
N_BOOT = 2000
LUNG_SIDE = 256  # films are read at this side for the lung statistics
TRAINED_ON = "It was trained on about a hundred expert-scored COVID-19 films ({n} films of {p} patients)."


class SeverityError(ValueError):
    """A severity model that cannot be used (missing, corrupt or built on another classifier)."""


# --------------------------------------------------------------------------- data
def scored_table(root) -> pd.DataFrame:
    """The scored films present under ``root``: path, patient_id, geographic_mean, opacity_mean."""
    root = Path(root)
    csv = root / SCORES_CSV
    if not csv.is_file():
        raise FileNotFoundError(f"severity scores not found at {csv}")
    scores = pd.read_csv(csv, comment="#")
    films = datasets.read_ieee8023(root / "ieee8023", base=root)
    films = films.assign(filename=films["path"].map(lambda p: Path(p).name))
    table = scores.merge(films[["filename", "path", "patient_id"]], on="filename", how="inner")
    return table.dropna(subset=["geographic_mean", "opacity_mean"]).reset_index(drop=True)


# --------------------------------------------------------------------------- features
LUNG_FEATURES = [f"{side}_{zone}_{stat}" for side in ("left", "right") for zone in ("upper", "middle", "lower")
                 for stat in ("mean", "p90", "std")] + ["lung_mean", "lung_p75", "bright_share", "area_share"]


def lung_features(film: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Intensity statistics of the lung fields of one film (see :data:`LUNG_FEATURES`).

    The film is standardised by its own median and spread (1st-99th percentile) outside the
    lungs, so films of different exposure and processing compare; opacities make the lungs
    brighter than the rest of the film. Each lung is split into thirds by height.
    """
    f = np.asarray(film, np.float32)
    m = np.asarray(mask, bool)
    if m.shape != f.shape:
        m = cv2.resize(m.astype(np.uint8), f.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    rest = f[~m] if (~m).sum() > 100 else f.ravel()
    lo, med, hi = np.percentile(rest, [1, 50, 99])
    z = (f - med) / max(hi - lo, 1.0)
    out = []
    cols = np.nonzero(m.any(axis=0))[0]
    mid = int((cols.min() + cols.max()) / 2) if cols.size else f.shape[1] // 2
    for side in (slice(0, mid), slice(mid, f.shape[1])):
        ms = np.zeros_like(m)
        ms[:, side] = m[:, side]
        rows = np.nonzero(ms.any(axis=1))[0]
        edges = np.linspace(rows.min(), rows.max() + 1, 4).astype(int) if rows.size else [0, 0, 0, 0]
        for k in range(3):
            zone = np.zeros_like(ms)
            zone[edges[k] : edges[k + 1]] = ms[edges[k] : edges[k + 1]]
            v = z[zone]
            out += [float(v.mean()), float(np.percentile(v, 90)), float(v.std())] if v.size else [0.0, 0.0, 0.0]
    v = z[m]
    if v.size:
        out += [float(v.mean()), float(np.percentile(v, 75)), float((v > 0).mean()), float(m.mean())]
    else:
        out += [0.0, 0.0, 0.0, 0.0]
    return np.asarray(out, np.float32)


def film_features(films: list[np.ndarray], model=None, cfg: dict | None = None, kind: str = "both",
                  lung_model=None) -> np.ndarray:
    """Features (n, d) of decoded films for one of :data:`FEATURE_SETS`.

    ``model`` and ``cfg`` (the run's config) are needed for ``classifier`` and ``both``.
    """
    parts = []
    if kind in ("classifier", "both"):
        x, _, _ = inputs.prepare(films, cmodel.input_size(model), inputs.settings(cfg), lung_model)
        parts.append(cmodel.features(model, x))
    if kind in ("lungs", "both"):
        small = [_small(f) for f in films]
        masks = [lungs.mask(s, model=lung_model) for s in small]
        parts.append(np.stack([lung_features(s, m) for s, m in zip(small, masks, strict=True)]))
    if not parts:
        raise ValueError(f"unknown feature set {kind!r}; choose one of {FEATURE_SETS}")
    return np.concatenate(parts, axis=1).astype(np.float32)


def _small(film: np.ndarray) -> np.ndarray:
    """The film at most LUNG_SIDE px on its longer side (aspect kept), as the dashboard shows it."""
    return explain.display_film(np.asarray(film, np.float32), LUNG_SIDE)


# --------------------------------------------------------------------------- ridge
def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> dict:
    """Ridge regression on standardised features: {mean, scale, coef, intercept, alpha}."""
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    z = (x - mean) / scale
    ym = float(y.mean())
    coef = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - ym))
    return {"mean": mean, "scale": scale, "coef": coef, "intercept": ym, "alpha": float(alpha)}


def predict_ridge(fit: dict, x: np.ndarray, top: float) -> np.ndarray:
    """Predictions of :func:`fit_ridge`, clipped to the score's range [0, top]."""
    z = (np.asarray(x, np.float64) - np.asarray(fit["mean"])) / np.asarray(fit["scale"])
    return np.clip(z @ np.asarray(fit["coef"]) + float(fit["intercept"]), 0.0, top)


def _folds(groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """k lists of row indices, whole patients per fold (patients shuffled with ``seed``)."""
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    fold_of = {g: i % k for i, g in zip(range(len(uniq)), uniq[order], strict=True)}
    f = np.array([fold_of[g] for g in groups])
    return [np.nonzero(f == i)[0] for i in range(k)]


def _ridge_path(x: np.ndarray, y: np.ndarray, alphas) -> tuple[dict, list[np.ndarray]]:
    """Standardisation and ridge coefficients for every alpha from one SVD (cheap for many alphas)."""
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    u, sv, vt = np.linalg.svd((x - mean) / scale, full_matrices=False)
    ym = float(y.mean())
    uty = u.T @ (y - ym)
    coefs = [vt.T @ (sv / (sv**2 + a) * uty) for a in alphas]
    return {"mean": mean, "scale": scale, "intercept": ym}, coefs


def _cv_mae(feats: dict, y: np.ndarray, groups: np.ndarray, top: float, k: int, seed: int) -> dict:
    """Grouped CV MAE of every (feature set, alpha); the inner loop of the nested CV."""
    folds = _folds(groups, k, seed)
    out = {}
    for kind, x in feats.items():
        err = np.zeros((len(ALPHAS), len(y)))
        for test in folds:
            train = np.setdiff1d(np.arange(len(y)), test)
            base, coefs = _ridge_path(x[train], y[train], ALPHAS)
            for j, coef in enumerate(coefs):
                err[j, test] = np.abs(predict_ridge({**base, "coef": coef}, x[test], top) - y[test])
        for j, alpha in enumerate(ALPHAS):
            out[(kind, alpha)] = float(err[j].mean())
    return out


def choose(feats: dict, y: np.ndarray, groups: np.ndarray, top: float, seed: int = config.SEED) -> tuple[str, float]:
    """The (feature set, alpha) of lowest grouped-CV MAE."""
    scores = _cv_mae(feats, y, groups, top, INNER_FOLDS, seed)
    return min(scores, key=scores.get)


def fit_bag(feats: dict, y: np.ndarray, groups: np.ndarray, top: float, seed: int = config.SEED,
            n_bags: int = N_BAGS) -> list[dict]:
    """The severity procedure: ``n_bags`` ridge fits, each on a random 80 % of the patients with its
    own (feature set, alpha) chosen by an inner grouped CV; the prediction is their mean.

    Averaging over subsamples steadies a choice made on about a hundred films (a single fit's
    choice of features and penalty changes from one subsample to the next).
    """
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    members = []
    for b in range(n_bags):
        keep = rng.choice(uniq, size=max(2, int(round(BAG_SHARE * len(uniq)))), replace=False)
        sel = np.isin(groups, keep)
        sub = {k: v[sel] for k, v in feats.items()}
        kind, alpha = choose(sub, y[sel], groups[sel], top, seed + 1000 + b)
        fit = fit_ridge(sub[kind], y[sel], alpha)
        members.append({"features": kind, "alpha": alpha, "mean": fit["mean"].tolist(),
                        "scale": fit["scale"].tolist(), "coef": fit["coef"].tolist(), "intercept": fit["intercept"]})
    return members


def predict_bag(members: list[dict], feats: dict, top: float) -> np.ndarray:
    """Mean prediction of :func:`fit_bag`'s members on features {kind: (n, d)}, within [0, top]."""
    return np.mean([predict_ridge(m, feats[m["features"]], top) for m in members], axis=0)


def nested_cv(feats: dict, y: np.ndarray, groups: np.ndarray, top: float, seed: int = config.SEED) -> dict:
    """Out-of-fold predictions of the whole procedure (choices included) and of the mean baseline."""
    pred, base = np.zeros(len(y)), np.zeros(len(y))
    chosen = []
    for i, test in enumerate(_folds(groups, OUTER_FOLDS, seed)):
        train = np.setdiff1d(np.arange(len(y)), test)
        bag = fit_bag({k: v[train] for k, v in feats.items()}, y[train], groups[train], top, seed + i + 1)
        pred[test] = predict_bag(bag, {k: v[test] for k, v in feats.items()}, top)
        base[test] = y[train].mean()
        chosen.append(sorted({f"{m['features']}/{m['alpha']:g}" for m in bag}))
    return {"pred": pred, "baseline": base, "chosen": chosen}


def _pearson(a, b) -> float:
    if np.std(a) < 1e-12 or np.std(b) < 1e-12:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def summarise(y, pred, base, groups, n_boot: int = N_BOOT, seed: int = config.SEED) -> dict:
    """MAE, baseline MAE, their difference and Pearson r, each with a 95 % patient-bootstrap CI."""
    y, pred, base, groups = map(np.asarray, (y, pred, base, groups))
    uniq = np.unique(groups)
    idx = {g: np.nonzero(groups == g)[0] for g in uniq}
    rng = np.random.default_rng(seed)

    def stats(sel):
        mae, bmae = np.abs(pred[sel] - y[sel]).mean(), np.abs(base[sel] - y[sel]).mean()
        return mae, bmae, mae - bmae, _pearson(pred[sel], y[sel])

    boots = np.array([stats(np.concatenate([idx[g] for g in rng.choice(uniq, len(uniq))])) for _ in range(n_boot)])
    lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
    point = stats(np.arange(len(y)))
    names = ("mae", "baseline_mae", "mae_minus_baseline", "r")
    out = {n: float(point[i]) for i, n in enumerate(names)}
    out["ci"] = {n: [float(lo[i]), float(hi[i])] for i, n in enumerate(names)}
    out["beats_baseline"] = bool(hi[2] < 0)
    return out


# --------------------------------------------------------------------------- train / evaluate
def _films(table: pd.DataFrame, root) -> list[np.ndarray]:
    return [images.decode(Path(root) / p) for p in table["path"]]


def _classifier(run):
    run = runs.open_run(run)
    return run.path, run.model(), run.config


def _all_features(films, model, cfg) -> dict:
    clf = film_features(films, model, cfg, "classifier")
    lung = film_features(films, kind="lungs")
    return {"classifier": clf, "lungs": lung, "both": np.concatenate([clf, lung], axis=1)}


def _seed_spread(feats, y, groups, top, seeds=(1, 2, 3)) -> list[dict]:
    """The headline figure again on other assignments of patients to folds (how much it moves)."""
    out = []
    for seed in seeds:
        with threadpool_limits(1):
            cv = nested_cv(feats, y, groups, top, seed)
        d = summarise(y, cv["pred"], cv["baseline"], groups, n_boot=500, seed=seed)
        out.append({"seed": seed, "mae": round(d["mae"], 3), "mae_minus_baseline": round(d["mae_minus_baseline"], 3),
                    "ci": [round(v, 3) for v in d["ci"]["mae_minus_baseline"]]})
    return out


def evaluate(run=None, data=None, progress: bool = True) -> dict:
    """Nested, patient-grouped CV of the severity procedure on the scored films (nothing written)."""
    res, _ = _evaluate(run, data, progress)
    return res


def _evaluate(run, data, progress: bool):
    root = config.data_dir(data)
    table = scored_table(root)
    _log(progress, f"{len(table)} scored films of {table['patient_id'].nunique()} patients; decoding")
    films = _films(table, root)
    run, model, cfg = _classifier(run)
    _log(progress, "features (classifier and lung statistics)")
    feats = _all_features(films, model, cfg)
    groups = table["patient_id"].astype(str).to_numpy()
    res = {"n_images": int(len(table)), "n_patients": int(table["patient_id"].nunique()),
           "run": str(run), "folds": OUTER_FOLDS}
    oof = {}
    for name, (col, top) in TARGETS.items():
        y = table[col].to_numpy(float)
        with threadpool_limits(1):  # many tiny solves: BLAS threads only add contention
            cv = nested_cv(feats, y, groups, top)
        res[name] = {**summarise(y, cv["pred"], cv["baseline"], groups), "range": [0.0, top],
                     "chosen_per_fold": cv["chosen"]}
        with threadpool_limits(1):
            single = _cv_mae(feats, y, groups, top, OUTER_FOLDS, config.SEED)
        res[name]["per_feature_set"] = {
            kind: round(min(v for (k, _a), v in single.items() if k == kind), 3) for kind in FEATURE_SETS}
        res[name]["other_fold_seeds"] = _seed_spread(feats, y, groups, top)
        oof[name] = (y, cv["pred"], cv["baseline"])
    res["show"] = bool(all(res[n]["beats_baseline"] for n in TARGETS))
    return res, {"table": table, "feats": feats, "groups": groups, "oof": oof, "cfg": cfg, "run": run}


def train(run=None, data=None, out=None, progress: bool = True) -> dict:
    """Evaluate by nested CV, fit the final model on all scored films, write it and its card."""
    res, ctx = _evaluate(run, data, progress)
    out = Path(out) if out else ASSET_DIR
    out.mkdir(parents=True, exist_ok=True)
    models = {}
    for name, (col, top) in TARGETS.items():
        y = ctx["table"][col].to_numpy(float)
        with threadpool_limits(1):
            members = fit_bag(ctx["feats"], y, ctx["groups"], top)
        yt, pred, _ = ctx["oof"][name]
        resid = yt - pred
        models[name] = {"range": [0.0, top], "members": members,
                        "features": sorted({m["features"] for m in members}),
                        "cv_mae": res[name]["mae"], "residual_q10_q90": np.percentile(resid, [10, 90]).tolist()}
    cfg = ctx["cfg"]
    record = {
        "what": "ridge regressions of expert COVID-19 severity scores (mean of 3 raters) on film features",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "classifier_sha256": runs.sha256(Path(ctx["run"]) / "model.keras"),
        "classifier_run": cfg.get("name") or Path(ctx["run"]).name,
        "lung_model_sha256": runs.sha256(lungs.MODEL_PATH),
        "lung_side": LUNG_SIDE,
        "lung_feature_names": LUNG_FEATURES,
        "show": res["show"],
        "models": models,
        "cv": {k: v for k, v in res.items() if k != "run"},
        "data": str(SCORES_CSV),
    }
    runs.write_json(out / "severity.json", record)
    write_figure(ctx["oof"], out / "cv_scatter.png")
    (out / "CARD.md").write_text(card(record), encoding="utf-8")
    _log(progress, f"wrote {out}/severity.json, CARD.md, cv_scatter.png")
    return record


def write_figure(oof: dict, path: Path, side: int = 360) -> Path:
    """Out-of-fold predicted vs expert score, one panel per score (drawn with OpenCV, no plot library)."""
    panels = []
    for name, (y, pred, _) in oof.items():
        top = TARGETS[name][1]
        img = np.full((side, side, 3), 255, np.uint8)
        pad = 40

        def pt(a, b, top=top, pad=pad):
            return (int(pad + a / top * (side - 2 * pad)), int(side - pad - b / top * (side - 2 * pad)))

        cv2.rectangle(img, pt(0, 0), pt(top, top), (120, 120, 120), 1)
        cv2.line(img, pt(0, 0), pt(top, top), (180, 180, 180), 1, cv2.LINE_AA)
        for a, b in zip(y, pred, strict=True):
            cv2.circle(img, pt(a, b), 3, (40, 90, 200), -1, cv2.LINE_AA)
        font = cv2.FONT_HERSHEY_SIMPLEX
        cv2.putText(img, f"{name} (0-{top:.0f})", (pad, 24), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, "expert score", (side // 2 - 45, side - 10), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, "CV prediction", (2, pad - 6), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        panels.append(img)
    sheet = np.concatenate(panels, axis=1)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return path


def _ci(d: dict, key: str) -> str:
    lo, hi = d["ci"][key]
    return f"{d[key]:.2f} [{lo:.2f}, {hi:.2f}]"


def card(record: dict) -> str:
    """The severity model's card (Markdown) from its record."""
    cv = record["cv"]
    lines = [
        "# Severity estimate: model card",
        "",
        "**Research use only, not for diagnosis.** Generated by `python -m core.severity train`; "
        "do not edit by hand.",
        "",
        f"Predicts two expert scores of COVID-19 pneumonia on a frontal film: geographic extent (0-8) and "
        f"opacity (0-6), each the mean of 3 raters (ieee8023 `{record['data']}`; Cohen et al., "
        "arXiv:2005.11856). " + TRAINED_ON.format(n=cv["n_images"], p=cv["n_patients"]),
        "",
        f"Features: the classifier `{record['classifier_run']}` (model.keras sha256 "
        f"`{record['classifier_sha256'][:16]}...`) and/or lung-field intensity statistics from the shipped "
        "lung U-Net. The mean of 10 ridge regressions, each fitted on 80 % of the patients with its feature set "
        "(classifier, lungs or both) and penalty chosen by an inner patient-grouped CV.",
        "",
        f"## Cross-validated quality ({cv['folds']}-fold, patient-grouped, nested; 95 % patient-bootstrap CIs)",
        "",
        "| score | features (final) | MAE | baseline MAE (predict the mean) | MAE - baseline | Pearson r |",
        "|---|---|---|---|---|---|",
    ]
    for name in TARGETS:
        d = cv[name]
        lines.append(f"| {name} | {', '.join(record['models'][name]['features'])} | {_ci(d, 'mae')} | {_ci(d, 'baseline_mae')} | "
                     f"{_ci(d, 'mae_minus_baseline')} | {_ci(d, 'r')} |")
    lines += ["", "CV MAE of each feature set alone (best penalty; not nested, for comparison): " + "; ".join(
        f"{n}: " + ", ".join(f"{k} {v:.2f}" for k, v in cv[n]["per_feature_set"].items()) for n in TARGETS) + ".", ""]
    lines += ["Other assignments of patients to the folds (fold seeds; MAE - baseline [95 % CI]): " + "; ".join(
        f"{n}: " + ", ".join(f"{d['mae_minus_baseline']:.2f} [{d['ci'][0]:.2f}, {d['ci'][1]:.2f}]"
                             for d in cv[n]["other_fold_seeds"]) for n in TARGETS)
              + ". The headline uses the project's seed, fixed before any result was seen.", ""]
    if record["show"]:
        lines.append("The estimate beats the baseline on both scores (the CI of the MAE difference excludes 0), "
                     "so the dashboard shows it for films the classifier calls COVID-19.")
    else:
        lines.append("**The estimate does not beat the mean-prediction baseline on both scores (the CI of the MAE "
                     "difference includes 0), so the dashboard does not show it.**")
    lines += ["", "Cohen et al. report MAE ~1.14 (extent) and ~0.78 (opacity) with features pretrained on large "
              "chest X-ray collections; these features come from a small network trained from scratch.",
              "", "![out-of-fold predictions](cv_scatter.png)", "",
              "Limits: about a hundred films of one public collection (many are figures from papers), scores are "
              "means of 3 raters; the films the classifier was trained on include some scored ones, so the "
              "classifier's features may fit them better than a new film. The dashboard refuses this model "
              "when the classifier's sha256 differs: retrain with `python -m core.severity train --run RUN`.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- using the model
def load(path=None) -> dict:
    """The severity record (``severity.json``); :class:`SeverityError` when missing or corrupt."""
    path = Path(path) if path else ASSET_DIR / "severity.json"
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        rec["models"]["geographic"], rec["models"]["opacity"]  # noqa: B018 - shape check
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SeverityError(f"severity model {path} is missing or corrupt ({exc})") from None
    return rec


def usable(record: dict, classifier_sha256: str | None) -> str | None:
    """Why this severity model must not be shown for this classifier (None: it may be)."""
    if not record.get("show"):
        return "the severity model does not beat the mean-prediction baseline in cross-validation"
    needs_clf = any(k in ("classifier", "both") for m in record["models"].values() for k in m["features"])
    if needs_clf and record.get("classifier_sha256") != classifier_sha256:
        return ("the severity model was built on another classifier; retrain it with "
                "`python -m core.severity train --run RUN`")
    return None


def estimate(record: dict, film: np.ndarray, model=None, cfg: dict | None = None) -> dict:
    """Severity scores of one decoded film: {score: {value, low, high, cv_mae, range}}.

    ``low``/``high`` add the 10th/90th percentile of the cross-validated residuals (an 80 %
    interval, clipped to the score's range).
    """
    x = None
    if model is not None:
        x = inputs.prepare([film], cmodel.input_size(model), inputs.settings(cfg))[0][0]
    return estimate_prepared(record, x, _small(film), model)


def estimate_prepared(record: dict, x: np.ndarray | None, small: np.ndarray, model=None, *,
                      features: np.ndarray | None = None, mask: np.ndarray | None = None) -> dict:
    """:func:`estimate` from what the caller already has: the network's input ``x`` (through
    :mod:`core.inputs`) and the film at most :data:`LUNG_SIDE` px (for the lung statistics).

    A caller that has already computed them passes the classifier's penultimate ``features``
    of ``x`` (:func:`core.model.features`, shape (1, d)) and the lung ``mask`` of ``small``
    (:func:`core.lungs.mask`); then neither network runs again here.
    """
    kinds = {k for m in record["models"].values() for k in m["features"]}
    feats = {}
    if kinds & {"classifier", "both"}:
        feats["classifier"] = (np.asarray(features, np.float32).reshape(1, -1) if features is not None
                               else cmodel.features(model, np.asarray(x, np.float32)[None]))
    if kinds & {"lungs", "both"}:
        small = np.asarray(small, np.float32)
        feats["lungs"] = lung_features(small, lungs.mask(small) if mask is None else mask)[None]
    if "both" in kinds:
        feats["both"] = np.concatenate([feats["classifier"], feats["lungs"]], axis=1)
    out = {}
    for name, m in record["models"].items():
        top = float(m["range"][1])
        v = float(predict_bag(m["members"], feats, top)[0])
        q10, q90 = m["residual_q10_q90"]
        out[name] = {"value": v, "low": max(0.0, v + q10), "high": min(top, v + q90),
                     "cv_mae": float(m["cv_mae"]), "range": [0.0, top]}
    return out


def _log(on: bool, msg: str) -> None:
    if on:
        print(msg, file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m core.severity",
        description="Severity estimate (geographic extent 0-8, opacity 0-6) of COVID-19 films from expert "
                    "scores: 'train' evaluates by nested patient-grouped CV and writes assets/severity/; "
                    "'evaluate' only prints the CV figures.",
    )
    p.add_argument("command", choices=("train", "evaluate"))
    p.add_argument("--run", default=None, help="classifier run whose features are used (default: assets/model)")
    p.add_argument("--data", default=None, help="data root holding ieee8023/ (default: $CXR_DATA_DIR or data/)")
    p.add_argument("--out", default=None, help="output folder for train (default: assets/severity)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args(argv)
    try:
        if args.command == "train":
            res = train(args.run, args.data, args.out, progress=not args.json)["cv"]
        else:
            res = evaluate(args.run, args.data, progress=not args.json)
    except (FileNotFoundError, runs.RunError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, default=float))
    else:
        for name in TARGETS:
            d = res[name]
            print(f"{name}: MAE {_ci(d, 'mae')} vs baseline {_ci(d, 'baseline_mae')}; r {_ci(d, 'r')}; "
                  f"{'beats' if d['beats_baseline'] else 'does NOT beat'} the baseline")
        print(f"{res['n_images']} films of {res['n_patients']} patients; shown on the dashboard: {res['show']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
