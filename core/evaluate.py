"""Honest evaluation of a run: metrics with patient-bootstrap CIs, shortcut checks, external data.

``python -m core.evaluate`` evaluates the shipped model (``assets/model``) on its own test split
from the run's ``predictions.csv`` and writes ``metrics.json`` into the run folder:

- every headline metric as ``{"value", "ci_low", "ci_high"}`` (95% CI, patients resampled);
- the decision threshold chosen on VALIDATION rows for a target (default sensitivity >= 0.95),
  then applied unchanged to the test rows;
- calibration (reliability curve, ECE, Brier score);
- results per source, and the checks a source shortcut cannot pass: ``within_source`` (covid vs
  not covid among test images of one source that has both, e.g. ieee8023 COVID-19 vs its other
  pneumonias) and ``external`` (a source held out of training entirely, predictions split
  ``external``).

Binary view everywhere: positive = covid, score = ``p_covid`` (multiclass runs too, which also get
a ``multiclass`` block).

``--data DIR`` naming images the run never saw (another collection, or sources of the same root
that are not in the run's split.csv) makes it an external validation: the model predicts those
images, the same metrics are computed at the run's validation threshold (no re-tuning), and the
change from the internal test is reported as ``delta``; the result goes to
``external-<name>.json`` in the run, never over ``metrics.json``. Images the run saw in another
guise are left out and counted per reason (``excluded``, also in the text output): films of a
patient it saw, byte-identical files and near-duplicates (resized or re-encoded copies, by the
splitter's thumbnail correlation); see :func:`unseen_images`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from core import config, metrics, operating, runs
from core.unseen import seen_images, unseen_images

HEADLINE = ("roc_auc", "pr_auc", "sensitivity", "specificity", "accuracy", "ppv", "npv", "f1", "ece", "brier")
# Internal AUC this much above the within-source AUC means the score is largely the source shortcut.
SHORTCUT_GAP = 0.10
REQUIRED_COLUMNS = ("path", "source", "patient_id", "label", "split", "p_covid")


# ----------------------------------------------------------------------------- helpers


def jsonable(obj):
    """Plain-JSON copy of ``obj``: NaN/inf -> None, numpy scalars/arrays -> Python, Paths -> str."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _y(df: pd.DataFrame) -> np.ndarray:
    """1 for covid rows (by dataset label), else 0."""
    col = "label" if "label" in df.columns else "class"
    return (df[col].astype(str) == "covid").to_numpy().astype(int)


def _groups(df: pd.DataFrame) -> np.ndarray:
    """The bootstrap's resampling units: the split ``group`` (patients merged through duplicates
    and cross-source links), falling back to the patient id where a row has no group."""
    pid = df["patient_id"].astype(object)
    if "group" not in df.columns:
        return pid.to_numpy(dtype=object)
    g = df["group"].astype(object)
    blank = g.isna() | (g.astype(str).str.strip() == "")
    return g.where(~blank, pid).to_numpy(dtype=object)


def with_groups(pred: pd.DataFrame, split: pd.DataFrame | None) -> pd.DataFrame:
    """``pred`` with the ``group`` of the run's split file (by path), so the bootstrap resamples the
    groups the split kept together, not raw patient ids. Rows the split does not list (and runs
    without a split file or whose split has no group column) keep their patient id as the group.
    """
    if split is None or "group" not in split.columns or "group" in pred.columns:
        return pred
    groups = dict(zip(split["path"].astype(str), split["group"], strict=True))
    out = pred.copy()
    out["group"] = [groups.get(str(p), pid) for p, pid in zip(out["path"], out["patient_id"], strict=True)]
    return out


def _check_predictions(pred: pd.DataFrame, where: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in pred.columns]
    if missing:
        raise ValueError(f"{where} lacks column(s) {missing}; expected {list(REQUIRED_COLUMNS)} + p_<class>")


def _point(d: dict) -> float:
    v = d.get("value") if isinstance(d, dict) else d
    return float("nan") if v is None else float(v)


# ----------------------------------------------------------------------------- blocks


def choose_run_threshold(pred: pd.DataFrame, target: str = "sensitivity", value: float = 0.95,
                         n_boot: int = 1000, seed: int = config.SEED) -> tuple[dict, list[str]]:
    """The decision threshold from the validation rows of a predictions table (never test).

    Returns ``({"value", "ci_low", "ci_high", "target", "target_value", "n_val", ...}, warnings)``.
    Without usable validation rows the threshold falls back to 0.5 with a warning.
    """
    val = pred[pred["split"] == "val"]
    warnings: list[str] = []
    try:
        thr = metrics.threshold_ci(_y(val), val["p_covid"], _groups(val), target, value, n_boot, seed)
        at = metrics.at_threshold(_y(val), val["p_covid"], thr["value"])
        thr.update(val_sensitivity=at["sensitivity"], val_specificity=at["specificity"])
    except ValueError as exc:
        warnings.append(f"threshold fell back to 0.5: {exc}")
        thr = {"value": 0.5, "ci_low": 0.5, "ci_high": 0.5, "reason": str(exc)}
    thr.update(target=target, target_value=value, n_val=len(val), chosen_on="val")
    return thr, warnings


def _full_block(df: pd.DataFrame, threshold: float, n_boot: int, seed: int) -> dict:
    """Headline metrics (binary + ece/brier) of one set of predictions at a fixed threshold."""
    y, p, g = _y(df), df["p_covid"].to_numpy(float), _groups(df)
    out = metrics.binary_metrics(y, p, threshold, g, n_boot, seed)
    out.update(metrics.bootstrap(y, p, g, threshold, ("ece", "brier"), n_boot, seed))
    out["n_covid"] = out.pop("n_pos")
    return out


def _source_blocks(test: pd.DataFrame, threshold: float, n_boot: int, seed: int) -> tuple[dict, dict]:
    per_source, within = {}, {}
    for source, df in test.groupby("source", sort=True):
        block = _full_block(df, threshold, n_boot, seed)
        per_source[str(source)] = block
        n_covid = block["n_covid"]
        if 0 < n_covid < len(df):
            within[str(source)] = {
                "roc_auc": block["roc_auc"],
                "pr_auc": block["pr_auc"],
                "sensitivity": block["sensitivity"],
                "specificity": block["specificity"],
                "n": len(df),
                "n_covid": n_covid,
                "n_patients": block["n_patients"],
            }
    return per_source, within


def external_block(ext: pd.DataFrame, test: pd.DataFrame, threshold: float, internal: dict,
                   n_boot: int = 1000, seed: int = config.SEED) -> dict:
    """Metrics on images from sources the model never trained on, against the internal test.

    When the external images hold both classes, every metric is computed on them alone. When
    they hold one class only (e.g. a held-out normal source), sensitivity or specificity is
    computed on them and ``roc_auc`` ranks the internal test's covid images against the external
    non-covid images (``roc_auc_definition`` says which). ``delta`` = external - internal.
    """
    y_e = _y(ext)
    out: dict = {"sources": sorted(map(str, ext["source"].unique())), "n": len(ext),
                 "n_covid": int(y_e.sum()), "threshold": float(threshold)}
    if 0 < y_e.sum() < len(ext):
        block = _full_block(ext, threshold, n_boot, seed)
        out.update({k: block[k] for k in HEADLINE})
        out["confusion"] = block["confusion"]
        out["n_patients"] = block["n_patients"]
        out["roc_auc_definition"] = "covid vs not covid among the external images"
    else:
        p_e, g_e = ext["p_covid"].to_numpy(float), _groups(ext)
        # One class only: accuracy equals sensitivity or specificity, and PR AUC depends on the
        # (artificial) mix of classes, so neither is reported.
        rate = "sensitivity" if y_e.sum() else "specificity"
        b = metrics.bootstrap(y_e, p_e, g_e, threshold, (rate, "ece", "brier"), n_boot, seed)
        out.update(b)
        out["n_patients"] = metrics.group_codes(g_e, len(ext))[1]
        # Rank against the other class taken from the internal test.
        other = test[_y(test) != (1 if y_e.sum() else 0)]
        if len(other):
            mix = pd.concat([other, ext], ignore_index=True)
            # Patient ids of the two parts never collide (ids are prefixed by source); keep apart anyway.
            g = np.r_[["int:" + str(v) for v in _groups(other)], ["ext:" + str(v) for v in g_e]]
            b2 = metrics.bootstrap(_y(mix), mix["p_covid"], g, threshold, ("roc_auc",), n_boot, seed)
            out.update(b2)
            out["roc_auc_definition"] = (
                "internal test covid images vs external non-covid images" if not y_e.sum()
                else "external covid images vs internal test non-covid images")
        else:
            out["roc_auc"] = {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
                              "reason": "internal test has no images of the other class to rank against"}
    comparable = HEADLINE if "confusion" in out else ("sensitivity", "specificity", "roc_auc")
    in_source = {k: internal[k] for k in comparable if k in internal}
    out["in_source"] = in_source
    out["delta"] = {k: _point(out[k]) - _point(in_source[k]) for k in comparable if k in out and k in in_source}
    return out


def evaluate_predictions(
    pred: pd.DataFrame,
    task: str = "binary",
    classes=None,
    n_boot: int = 1000,
    target: str = "sensitivity",
    target_value: float = 0.95,
    seed: int = config.SEED,
    threshold: dict | None = None,
) -> dict:
    """All metrics of a predictions table (val + test [+ external] rows); the body of metrics.json.

    ``threshold``: a fixed threshold (``{"value", "source", ...}``) instead of one chosen on val rows.
    """
    _check_predictions(pred, "predictions")
    classes = list(classes or config.classes(task))
    thr, warnings = (dict(threshold), []) if threshold else choose_run_threshold(pred, target, target_value, n_boot, seed)
    t = thr["value"]
    test = pred[pred["split"] == "test"]
    if test.empty:
        raise ValueError("predictions hold no test rows (split == 'test')")
    y, p = _y(test), test["p_covid"].to_numpy(float)
    block = _full_block(test, t, n_boot, seed)
    curve, _, _ = metrics.calibration(y, p)
    out: dict = {k: block[k] for k in HEADLINE}
    out["threshold"] = thr
    out["confusion"] = block["confusion"]
    out["confusion_layout"] = "[[tn, fp], [fn, tp]], positive = covid, predicted covid when p_covid >= threshold"
    out["calibration"] = {"n_bins": 10, "curve": curve.to_dict("records")}
    out["per_source"], out["within_source"] = _source_blocks(test, t, n_boot, seed)
    val = pred[pred["split"] == "val"]
    if len(val):
        vb = metrics.bootstrap(_y(val), val["p_covid"], _groups(val), t, ("roc_auc", "sensitivity", "specificity"),
                               n_boot, seed)
        out["val"] = {**vb, "n": len(val)}
    ext = pred[pred["split"] == "external"]
    if len(ext):
        out["external"] = external_block(ext, test, t, out, n_boot, seed)
    if task != "binary" and all(f"p_{c}" in pred.columns for c in classes):
        col = "class" if "class" in test.columns else "label"
        idx = test[col].map({c: i for i, c in enumerate(classes)})
        ok = idx.notna().to_numpy()
        out["multiclass"] = metrics.multiclass_metrics(
            idx[ok].astype(int), test.loc[ok, [f"p_{c}" for c in classes]].to_numpy(float), classes,
            _groups(test[ok]), n_boot, seed)
    out["n_test"] = len(test)
    out["n_covid"] = int(y.sum())
    out["n_patients"] = block["n_patients"]
    out["n_val"] = len(val)
    out["task"] = task
    out["classes"] = classes
    out["n_boot"] = n_boot
    out["seed"] = seed
    out["warnings"] = warnings + shortcut_warnings(out)
    return out


def shortcut_warnings(result: dict) -> list[str]:
    """Plain-words warnings when the internal score is likely the source shortcut."""
    out = []
    auc = _point(result.get("roc_auc", {}))
    within = result.get("within_source") or {}
    if not within:
        out.append("No test source holds both covid and non-covid images, so the source shortcut cannot be "
                   "checked on these data; treat the internal AUC with suspicion.")
    for source, w in within.items():
        wa = _point(w["roc_auc"])
        if math.isfinite(auc) and math.isfinite(wa) and auc - wa >= SHORTCUT_GAP:
            hi = w["roc_auc"].get("ci_high")
            sure = hi is not None and math.isfinite(hi) and hi < auc
            out.append(
                f"Internal test AUC {auc:.2f} is much higher than the AUC within {source} alone ({wa:.2f}, "
                f"{w['n']} images): much of the internal score likely comes from recognising which "
                "collection an image came from, not from the disease"
                + (" (the gap is beyond the within-source CI)." if sure else
                   " (the within-source CI still reaches the internal AUC, so part of the gap may be noise)."))
        if w["n"] - w["n_covid"] < 10 or w["n_covid"] < 10:
            out.append(f"The within-{source} check rests on few images ({w['n_covid']} covid, "
                       f"{w['n'] - w['n_covid']} other): its CI is wide.")
    ext = result.get("external")
    if ext:
        d = ext.get("delta", {})
        for k in ("specificity", "roc_auc"):
            if k in d and math.isfinite(d[k]) and d[k] <= -SHORTCUT_GAP:
                out.append(f"On held-out source(s) {', '.join(ext['sources'])} the {k} drops by {-d[k]:.2f}: "
                           "the model does not carry over to collections it has not seen.")
    return out


# ----------------------------------------------------------------------------- runs


def _slug(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name or "data").strip("_") or "data"


def evaluate_run(
    run=None,
    data=None,
    n_boot: int = 1000,
    target_sensitivity: float = 0.95,
    write: bool = True,
    seed: int = config.SEED,
    progress: bool = True,
    site: str | None = None,
) -> dict:
    """Evaluate a run folder (default: the shipped model) and write ``metrics.json`` into it.

    Without ``data`` (or when ``data`` holds no image the run has not seen) the run's own
    ``predictions.csv`` is evaluated: threshold chosen on its val rows for
    ``sensitivity >= target_sensitivity``, metrics on its test rows (see
    :func:`evaluate_predictions`). With ``data`` holding unseen images this is an external
    validation: the model predicts them and the result (``mode: "external"``, with ``delta``
    from the internal test) is written to ``external-<data folder name>.json`` instead. ``site``: a
    SITE.json (core.calibrate) or a named point (core.operating); the result then also holds
    ``operating_point``, the test (or external) rows scored at it.
    """
    run = runs.open_run(run)
    if run.adopted:
        from core import adopt_eval  # lazy: it builds on this module (evaluate_predictions)

        return adopt_eval.evaluate_adopted(run, data, n_boot, write, seed)
    point = operating.choose(run, site) if site else None  # an adopted run's evaluation has no --site
    pred = with_groups(run.predictions(), seen_images(run))
    task = run.config.get("task", "binary")
    internal = evaluate_predictions(pred, task, list(run.classes), n_boot, "sensitivity", target_sensitivity, seed)
    internal["run"] = str(run.path)
    internal["mode"] = "internal"
    if data is not None:
        root = run.data_root(data)
        table, excluded = unseen_images(run, root, progress=progress)
        if len(table):
            result = _external_validation(run, root, table, excluded, internal, n_boot, seed, progress)
            ext_pred = result.pop("_predictions")
            if point is not None:
                result["operating_point"] = operating.scored(ext_pred, point, n_boot, seed)
            if write:
                runs.write_json(run.file(f"external-{_slug(root)}.json"), jsonable(result))
                runs.write_csv(run.file(f"external-{_slug(root)}-predictions.csv"), ext_pred)
            return result
        internal["warnings"].append(
            f"--data {root} holds no image this run has not seen ({sum(excluded.values())} excluded: "
            + ", ".join(f"{k} {v}" for k, v in excluded.items())
            + "); reported the internal test instead of an external validation.")
    if point is not None:  # never written into metrics.json: the run's own threshold stays the run's
        return {**internal, "operating_point": operating.scored(pred[pred["split"] == "test"], point, n_boot, seed)}
    if write:
        runs.write_json(run.file("metrics.json"), jsonable(internal))
    return internal


def _external_metrics(ext: pd.DataFrame, test: pd.DataFrame, internal: dict, n_boot: int, seed: int) -> dict:
    """The metrics of an external validation's predictions at the internal validation threshold."""
    t = internal["threshold"]["value"]
    y = _y(ext)
    result: dict = {}
    if 0 < y.sum() < len(ext):
        # Both classes: the full evaluation, per source and within source, at the val threshold.
        block = _full_block(ext, t, n_boot, seed)
        result.update({k: block[k] for k in HEADLINE})
        result["confusion"] = block["confusion"]
        curve, _, _ = metrics.calibration(y, ext["p_covid"].to_numpy(float))
        result["calibration"] = {"n_bins": 10, "curve": curve.to_dict("records")}
        result["per_source"], result["within_source"] = _source_blocks(ext, t, n_boot, seed)
        result["n_patients"] = block["n_patients"]
        result["delta"] = {k: _point(result[k]) - _point(internal[k]) for k in HEADLINE}
    else:
        eb = external_block(ext, test, t, internal, n_boot, seed)
        result.update({k: v for k, v in eb.items() if k not in ("in_source", "threshold")})
        result["per_source"] = {str(s): _full_block(df, t, n_boot, seed) for s, df in ext.groupby("source")}
        result["within_source"] = {}
    return result


def _external_validation(run: runs.Run, root, table, excluded, internal, n_boot, seed, progress) -> dict:
    # lazy: core.predict imports TensorFlow (~3.5 s); an internal evaluation only reads predictions.csv
    from core import predict

    ext, errors = predict.predict_table(run, table, root, progress=progress)
    if ext.empty:
        raise ValueError(f"none of the {len(table)} unseen images under {root} could be decoded")
    test = with_groups(run.predictions(), seen_images(run))
    test = test[test["split"] == "test"]
    result: dict = {"mode": "external", "run": str(run.path), "data": str(root), "threshold": internal["threshold"]}
    result.update(_external_metrics(ext, test, internal, n_boot, seed))
    result["internal"] = {k: internal[k] for k in HEADLINE}
    result["internal_within_source"] = internal.get("within_source", {})
    result["n"] = len(ext)
    result["n_covid"] = int(_y(ext).sum())
    result["sources"] = sorted(map(str, ext["source"].unique()))
    result["excluded"] = excluded
    result["excluded_near_duplicates"] = table.attrs.get("near_duplicates", [])
    result["errors"] = [str(e) for e in errors]
    result["task"] = internal["task"]
    result["classes"] = internal["classes"]
    result["warnings"] = [table.attrs["unchecked"]] if table.attrs.get("unchecked") else []
    for k in ("roc_auc", "specificity", "sensitivity"):
        d = result.get("delta", {}).get(k)
        if d is not None and math.isfinite(d) and d <= -SHORTCUT_GAP:
            result["warnings"].append(
                f"{k} is {-d:.2f} lower on these data than on the internal test: the model does not carry over.")
    result["_predictions"] = ext
    return result


def seed_spread(results: list[dict]) -> dict:
    """Mean, sd (ddof=1) and values of every headline metric over several runs (e.g. seeds)."""
    out = {}
    for k in HEADLINE + ("threshold",):
        vals = [_point(r[k]) for r in results if k in r]
        vals = [v for v in vals if math.isfinite(v)]
        out[k] = {"mean": float(np.mean(vals)) if vals else float("nan"),
                  "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan"),
                  "n": len(vals), "values": vals}
    within: dict[str, list[float]] = {}
    for r in results:
        for s, w in (r.get("within_source") or {}).items():
            within.setdefault(s, []).append(_point(w["roc_auc"]))
    out["within_source_roc_auc"] = {
        s: {"mean": float(np.nanmean(v)), "sd": float(np.nanstd(v, ddof=1)) if len(v) > 1 else float("nan"),
            "n": len(v), "values": v} for s, v in within.items()}
    return out


# Training settings that define "one configuration": runs that differ only in ``seed`` (and in
# bookkeeping such as dates and hashes) are seeds of one configuration.
CONFIG_KEYS = ("task", "preset", "size", "epochs", "batch_size", "lr", "augment", "hflip", "balance", "monitor",
               "patience", "holdout_source", "limit", "model_kwargs", "lung_mask", "lung_crop", "split_seed",
               "calibrate")


def seed_runs(run, candidates=()) -> pd.DataFrame:
    """``run`` and the ``candidates`` trained with its settings (:data:`CONFIG_KEYS`), i.e. its seeds.

    One row per run folder that has a readable config.json and metrics.json, sorted by folder:
    ``run``, ``seed``, ``n_test``, ``roc_auc`` and one ``within_<source>_roc_auc`` column per
    source with a within-source AUC. Feed the runs' metrics to :func:`seed_spread` for mean +- sd.
    """
    run = runs.open_run(run)
    key = {k: run.config.get(k) for k in CONFIG_KEYS}
    rows = []
    for other in sorted({run.path, *(Path(c).resolve() for c in candidates)}):
        try:  # a sibling whose config.json or metrics.json is missing, unreadable or malformed is no seed
            o = runs.open_run(other)
            m = o.metrics()
        except runs.RunError:
            continue
        if not isinstance(m, dict) or {k: o.config.get(k) for k in CONFIG_KEYS} != key:
            continue
        row = {"run": str(other), "seed": o.config.get("seed"), "n_test": m.get("n_test"),
               "roc_auc": _point(m.get("roc_auc"))}
        within = m.get("within_source")
        for src, w in (within.items() if isinstance(within, dict) else ()):
            row[f"within_{src}_roc_auc"] = _point(w.get("roc_auc") if isinstance(w, dict) else None)
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["run", "seed", "n_test", "roc_auc"])


# ----------------------------------------------------------------------------- output


def _fmt(d) -> str:
    return metrics.fmt(d, digits=3, reason=True)


def format_result(r: dict) -> str:
    """A short human-readable summary of an evaluation result."""
    lines = []
    thr = r["threshold"]
    if r.get("mode") == "external":
        lines.append(f"EXTERNAL validation of {r['run']} on {r['data']}: {r['n']} unseen images "
                     f"({r['n_covid']} covid) from {', '.join(r['sources'])}")
        exc = r.get("excluded") or {}
        lines.append(f"Excluded as seen by the run: {sum(exc.values())}"
                     + (" (" + "; ".join(f"{k}: {v}" for k, v in exc.items()) + ")" if exc else ""))
    else:
        lines.append(f"Run {r.get('run', '?')}  task {r['task']}  test: {r['n_test']} images, "
                     f"{r['n_patients']} patients, {r['n_covid']} covid")
    if thr.get("source"):
        lines.append(f"Threshold {thr['value']:.4f}: {thr['source']}")
    else:
        lines.append(f"Threshold {thr['value']:.4f} chosen on validation for {thr.get('target')} >= "
                     f"{thr.get('target_value')} (never on test)")
    lines.append("")
    lines.append(f"{'metric':<12} {'value  [95% CI, patient bootstrap]':<40}" +
                 (" delta vs internal" if r.get("mode") == "external" else ""))
    for k in HEADLINE:
        if k not in r:
            continue
        extra = ""
        if r.get("mode") == "external" and k in r.get("delta", {}):
            d = r["delta"][k]
            extra = f" {d:+.3f}" if d is not None and math.isfinite(d) else ""
        lines.append(f"{k:<12} {_fmt(r[k]):<40}{extra}")
    if "confusion" in r:
        (tn, fp), (fn, tp) = r["confusion"]
        lines.append(f"confusion    tp {tp}  fn {fn}  fp {fp}  tn {tn}")
    sections = (
        ("within_source", "Within-source AUC (covid vs not covid inside one collection; the shortcut cannot help):",
         lambda s, w: f"  {s:<10} {_fmt(w['roc_auc'])}  n={w['n']} ({w['n_covid']} covid)"),
        ("per_source", "Per source (at the validation threshold):",
         lambda s, b: f"  {s:<10} n={b['n']:<4} covid={b['n_covid']:<4} sens {_fmt(b['sensitivity'])}   "
                      f"spec {_fmt(b['specificity'])}"),
    )
    for field, title, line in sections:
        if r.get(field):
            lines += ["", title, *(line(s, b) for s, b in r[field].items())]
    ext = r.get("external") if r.get("mode") != "external" else None
    if ext:
        lines.append("")
        lines.append(f"Held-out source(s) {', '.join(ext['sources'])} (never trained on): n={ext['n']}")
        for k in ("specificity", "sensitivity", "roc_auc"):
            if k in ext and _point(ext[k]) == _point(ext[k]):
                ins = ext["in_source"].get(k)
                lines.append(f"  {k:<12} {_fmt(ext[k])}   in-source {_fmt(ins)}")
    if r.get("warnings"):
        lines.append("")
        for w in r["warnings"]:
            lines.append("WARNING: " + w)
    return "\n".join(line.rstrip() for line in lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m core.evaluate",
        description="Evaluate a run honestly: metrics with patient-bootstrap 95% CIs, threshold chosen on "
                    "validation, calibration, per-source and within-source results. With --data of images the "
                    "run never saw, an external validation reporting the change from the internal test.")
    ap.add_argument("--run", action="append", help="run folder (default: the shipped model, assets/model); "
                    "repeat to evaluate several runs (e.g. seeds) and report mean +- sd")
    ap.add_argument("--data", help="data root; when it holds images the run never saw, evaluate on them "
                    "(external validation). Default: only the run's own predictions")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--target-sensitivity", type=float, default=0.95,
                    help="threshold = highest one reaching this sensitivity on validation (default 0.95)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    ap.add_argument("--seed", type=int, default=config.SEED, help="bootstrap seed")
    ap.add_argument("--no-write", action="store_true", help="do not write metrics.json / external-*.json")
    ap.add_argument("--site", metavar="SITE.json", help="also score the test (or --data) films at a site's operating "
                    "point (python -m core.calibrate), or at rule-out / balanced; metrics.json is then not rewritten")
    args = ap.parse_args(argv)
    run_args = args.run or [None]
    try:
        results = [evaluate_run(r, args.data, args.n_boot, args.target_sensitivity, not args.no_write, args.seed,
                                progress=not args.json, site=args.site) for r in run_args]
    except (runs.RunError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(results) == 1:
        out = results[0]
    else:
        out = {"runs": results, "spread": seed_spread(results)}
    if args.json:
        print(json.dumps(jsonable(out), allow_nan=False))
    else:
        for r in results:
            print(format_result(r))
            if "operating_point" in r:
                print(operating.format_scored(r["operating_point"]))
            print()
        if len(results) > 1:
            print("Spread over runs (mean +- sd):")
            for k, s in out["spread"].items():
                if k == "within_source_roc_auc":
                    for src, ss in s.items():
                        print(f"  within {src:<6} AUC {ss['mean']:.3f} +- {ss['sd']:.3f} (n={ss['n']})")
                elif s["n"]:
                    print(f"  {k:<12} {s['mean']:.3f} +- {s['sd']:.3f} (n={s['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
