"""The shortcut audit: can a model's explanations, and its predictions, be trusted?

Most published COVID-19 chest X-ray classifiers learned the image *source* (hospital, age,
text, borders) rather than the disease (DeGrave et al., Nature Machine Intelligence 2021). The
audit measures that, per image and per explanation method, with checks a shortcut cannot pass:

- :func:`core.heat.heat_share`: where a heatmap's energy lies: inside the lung fields (against
  the lungs' share of the image), in the border band and in the top band (where text and
  markers sit).
- :mod:`core.audit_markers`: the share of each map's heat on burned-in text and markers
  (:func:`core.markers.detect`) against their area, per collection (``markers`` in ``audit.json``).
- :mod:`core.audit_checks`: deletion/insertion AUCs (RISE, kept for comparison:
  ``--di-methods``), the model randomisation check (Adebayo et al., NeurIPS 2018; a method
  **passes** if the mean Spearman correlation of its maps of the trained and the re-initialised
  model is below 0.5) and the lung-blanking probes of DeGrave et al. (the ROC AUC, COVID-19 vs
  the rest, that survives with the lungs blanked and with only the lungs left).
- :func:`run_audit` runs all of it over a run's test split, one named step after another
  (:func:`open_run`, then the steps of :mod:`core.audit_steps`: ``load_images``,
  ``explain_all``, ``trust_table``, ``sanity_checks``, :func:`probes`, ``road_step``,
  ``pointing_step``, ``source_probe_step``, ``slices_step``, then
  :func:`core.findings.findings`), and writes ``audit.csv`` (per image and method),
  ``audit.json`` (summary, the findings as cards and a plain-words verdict) and ``audit_maps/``
  (mean heatmaps per class and per source as ``.npy``, :mod:`core.audit_maps`) into the run
  folder. Images are prepared through ``core.inputs``: a lung-crop run is audited on what its
  network sees, with the lung masks and expert boxes mapped into that view.
- Any Keras model (an adopted run, ``core.adopt``): the explained class is the run's positive
  class; methods that do not apply to the model (:func:`core.explain.applicable`: no reachable
  convolution layer, no gradients through a SavedModel signature) are left out with their
  reason in ``audit.json`` (``methods_left_out``; when none applies, occlusion runs instead);
  the source probe reads the penultimate features (config ``adopted.penultimate``, else the
  input of the network's last Dense layer); the randomisation check re-initialises every
  weight of the adopted network; a black box gets no randomisation check (``sanity_note``).

CLI (``--json`` prints the summary with the same findings; ``--markdown FILE`` rewrites the
generated block of ``assets/AUDIT.md``; audit_maps.png is drawn unless ``--no-png``)::

    python -m core.audit --run assets/model --data ../shared/cxr [--methods gradcam,scorecam_fast]
                         [--limit N] [--json] [--markdown assets/AUDIT.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core import config, evaluate, explain, findings, lungs, pointing, road, runs
from core import model as cxr_model
from core.audit_checks import SANITY_THRESHOLD, probes, randomised_copy
from core.audit_maps import mean_maps, mean_maps_png, save_maps
from core.audit_markers import markers_step
from core.audit_outcome import outcome_step
from core.audit_steps import (
    explain_all,
    load_images,
    mean_ci,
    pointing_step,
    road_step,
    sanity_checks,
    slices_step,
    source_probe_step,
    test_rows,
    trust_table,
    usable_methods,
)
from core.explain.registry import AUDIT_DEFAULT
from core.feature_map import audit_step as feature_map_step

# LayerCAM is left out by default: at a last convolution followed by global pooling its maps equal
# Grad-CAM++'s; full Score-CAM (scorecam_fast's slow original) and SmoothGrad (20 passes per map) would
# each add a minute or more to the audit on two cores (--methods adds any of them).
DEFAULT_METHODS = AUDIT_DEFAULT  # the methods marked audit=True in core.explain.registry
SANITY_N = 8  # images per method for the randomisation check


@contextlib.contextmanager
def _timed(timing: dict, key: str):
    t0 = time.time()
    yield
    timing[key] = time.time() - t0
    # the process's peak resident memory so far (MB; Linux reports KB): which step raised it
    timing[key[:-2] + "_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- whole-run audit, step by step
def _pick(test: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """All test rows, or ``limit`` of them taken round-robin over classes (both classes kept)."""
    if not limit or limit >= len(test):
        return test.reset_index(drop=True)
    shuffled = test.sample(frac=1.0, random_state=seed)
    rank = shuffled.groupby("class").cumcount()
    return shuffled.assign(_r=rank.values).sort_values(["_r"], kind="stable").head(limit).drop(columns="_r").reset_index(drop=True)


def _with_class(preds: pd.DataFrame, handle) -> pd.DataFrame:
    """``class`` from ``label`` where predictions.csv has none (an adopted run): the labels config
    ``adopted.positive_labels`` counts as positive are the positive class; the others are the
    other class of a two-class run, or themselves."""
    if "class" in preds:
        return preds
    adopted = handle.config.get("adopted") if isinstance(handle.config.get("adopted"), dict) else {}
    positive = set(adopted.get("positive_labels") or [handle.positive])
    others = [c for c in handle.classes if c != handle.positive]
    label = preds["label"].astype(str)
    other = label.where(label.isin(handle.classes), others[0]) if len(others) == 1 else label
    return preds.assign(**{"class": np.where(label.isin(positive), handle.positive, other)})


def open_run(run=None, data=None, methods=DEFAULT_METHODS, limit: int | None = None, seed: int = config.SEED) -> dict:
    """Step 1: the run, its model and settings, and the rows to audit (test; external for the source probe).

    Returns a context dict: ``run``, ``cfg``, ``model``, ``size``, ``classes``, ``crop`` (the
    run's lung-crop settings or None), ``root`` (data root), ``test`` and ``external`` tables.
    """
    handle = runs.open_run(run)
    unknown = [m for m in methods if m not in explain.METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(explain.METHODS)}")
    split = handle.split() if handle.has("split.csv") else None
    # ``group``: the bootstrap's and the folds' unit, patients the split kept together (as core.evaluate)
    preds = _with_class(evaluate.with_groups(handle.predictions(), split), handle)
    test = preds[preds["split"] == "test"]
    if test.empty and not handle.training_data_known:
        # adopted without --trained-on: every film was scored as external, and those are the films to audit
        test, preds = preds[preds["split"] == "external"], preds[preds["split"] != "external"]
    if test.empty:
        raise runs.RunError(f"run {handle.name}: predictions.csv has no test rows to audit")
    test = _pick(test, limit, seed)
    external = preds[preds["split"] == "external"].reset_index(drop=True)
    if limit:
        external = external.head(0)
    clf = handle.model()
    kept, left_out = usable_methods(clf, methods)
    adopted = handle.config.get("adopted") if isinstance(handle.config.get("adopted"), dict) else {}
    return {"run": handle.path, "handle": handle, "cfg": handle.config, "model": clf,
            "size": cxr_model.input_size(clf), "classes": list(handle.classes), "crop": handle.lung_crop,
            "root": handle.data_root(data), "test": test, "external": external,
            "methods": kept, "methods_left_out": left_out, "ci": handle.positive_index,
            "penultimate": adopted.get("penultimate"), "blackbox": explain.is_blackbox(clf), "limit": limit}


def run_audit(run=None, data=None, methods=DEFAULT_METHODS, limit: int | None = None,
              di_methods=(), sanity_n: int = SANITY_N, steps: int = 16, n_boot: int = 1000,
              write: bool = True, progress: bool = True, seed: int = config.SEED, lung_model=None,
              road_fractions=road.FRACTIONS, road_n: int | None = -1) -> dict:
    """Audit a run over its test split (``predictions.csv`` rows with split == test).

    The steps: :func:`open_run`, then those of :mod:`core.audit_steps`: ``load_images`` (through
    ``core.inputs``, so a lung-crop run is audited on what its network sees), ``explain_all``,
    ``trust_table`` and :func:`core.audit_maps.mean_maps`, ``sanity_checks``, :func:`probes`,
    ``road_step``, ``pointing_step``, ``source_probe_step``, ``slices_step``, then the findings (:func:`core.findings.findings`). Heatmaps explain class 0 (COVID-19) for
    every image; ``di_methods`` also get RISE deletion/insertion AUCs (off by default: ROAD
    replaces them); ``lung_model`` replaces the shipped lung net (tests); ``road_n``: see ``road_step``
    (-1: by the model's cost). Writes ``audit.csv``, ``audit.json``, ``audit_maps/*.npy`` (``write``).
    """
    t_start = time.time()
    timing: dict = {}
    with _timed(timing, "open_s"):
        ctx = open_run(run, data, methods, limit, seed)
    clf, size, classes, ci, methods = ctx["model"], ctx["size"], ctx["classes"], ctx["ci"], ctx["methods"]
    with _timed(timing, "load_s"):
        boxes, box_counts = pointing.read_boxes(ctx["root"])
        loaded = load_images(ctx["test"], ctx["root"], size, ctx["crop"], boxes, lung_model, progress)
        test = test_rows(ctx, loaded)
        x, lung = loaded["x"], loaded["lung"]
        ext = _load_external(ctx, lung_model, progress)
    with _timed(timing, "explain_s"):
        maps = explain_all(clf, x, methods, progress, ci)
    with _timed(timing, "trust_s"):
        table = trust_table(clf, test, x, lung, maps, [m for m in di_methods or () if m in maps], steps, ci)
        sums, counts = mean_maps(test, x, lung, maps)
    with _timed(timing, "sanity_s"):
        # a black box's weights cannot be reached, so it has no randomised copy (and no check)
        rand = None if ctx["blackbox"] else randomised_copy(clf, seed)
        sanity = sanity_checks(clf, x, methods, sanity_n, rand, seed, maps, ci) if rand is not None else {}
        for v in sanity.values():
            v["paths"] = test["path"].to_numpy()[v["_pick"]].tolist()
    with _timed(timing, "probes_s"):
        pr = probes(clf, x, lung, test["y"].to_numpy(), test["group"].to_numpy(), test["source"].to_numpy(),
                    class_index=ci, n_boot=n_boot)
        p_by = pr.pop("_p")
    with _timed(timing, "road_s"):
        road_res, road_cols = road_step(clf, test, x, lung, maps, classes, road_fractions, n_boot, seed, progress, ci, road_n)
    with _timed(timing, "pointing_s"):
        point_res, point_cols = pointing_step(test, lung, loaded["expert"], maps, n_boot, seed)
        point_res["boxes"]["counts"] = box_counts
    with _timed(timing, "source_probe_s"):
        source_res, p_true = source_probe_step(clf, rand, x, test, ext, n_boot, seed, ctx["penultimate"])
    with _timed(timing, "slices_s"):
        slices_res = slices_step(ctx, test, p_by["original"], n_boot, seed)
    with _timed(timing, "markers_s"):
        markers_res = markers_step(test, ctx["root"], loaded["boxes"], maps, progress)

    table = _per_image_columns(table, test, p_by, road_cols, point_cols, p_true)
    summary = _summary(ctx, test, loaded, table, sanity, pr, lung, counts, n_boot, steps, di_methods)
    summary.update({"road": road_res, "pointing_game": point_res, "source_probe": source_res, "slices": slices_res,
                    "markers": markers_res})
    return _finish(ctx, summary, table, (sums, counts), timing, t_start, n_boot, progress, write)


def _finish(ctx: dict, summary: dict, table: pd.DataFrame, mean_sums: tuple, timing: dict, t_start: float,
            n_boot: int, progress: bool, write: bool) -> dict:
    """The steps that read the assembled per-film table (trust by outcome, the feature map and the
    neighbour index), then the verdict and the findings; writes the run (``write``)."""
    with _timed(timing, "by_outcome_s"):  # trust measures per TP/FP/TN/FN (core.audit_outcome)
        summary["by_outcome"] = outcome_step(ctx, table, n_boot)
    with _timed(timing, "feature_map_s"):
        summary["feature_map"] = feature_map_step(ctx, progress, write)  # and the neighbour index (core.neighbours)
    summary["verdict"] = verdict(summary)
    summary["findings"] = findings.findings(summary, table)
    timing["total_s"] = time.time() - t_start
    summary["timing"] = {k: round(v, 2) for k, v in timing.items()}
    if write:
        _write(ctx["run"], summary, table, *mean_sums)
    return summary


def _load_external(ctx: dict, lung_model, progress: bool) -> dict | None:
    """The external images (for the source probe) as the network sees them, or None when the run has none."""
    if not len(ctx["external"]):
        return None
    e = load_images(ctx["external"], ctx["root"], ctx["size"], ctx["crop"], None, lung_model, progress, "external")
    return {"x": e["x"], "rows": ctx["external"].iloc[e["kept"]].reset_index(drop=True)}


def _write(run: Path, summary: dict, table: pd.DataFrame, sums: dict, counts: dict) -> None:
    """audit_maps/*.npy (their names go into the summary), audit.csv and audit.json in the run folder."""
    summary["maps"] = save_maps(run / "audit_maps", sums, counts)
    runs.write_csv(run / "audit.csv", table)
    runs.write_json(run / "audit.json", summary)


def _per_image_columns(table: pd.DataFrame, test: pd.DataFrame, p_by: dict, road_cols: dict, point_cols: dict,
                       p_true: dict) -> pd.DataFrame:
    """audit.csv: the trust rows plus, per image, the probe probabilities, ROAD, pointing and source-probe columns."""
    k = table["method"].nunique()
    table = table.copy()
    for name, v in p_by.items():
        table[f"p_covid_{name}"] = np.tile(v, k)
    for name, v in road_cols.items():
        if (table["method"] == name).any():
            table.loc[table["method"] == name, "road_combined"] = v
        else:  # the baselines are per image: the same on every method's row
            table[f"road_combined_{name}"] = np.tile(v, k)
    for (method, col), v in point_cols.items():
        table.loc[table["method"] == method, col] = v
    for net, per in p_true.items():
        suffix = "" if net == "model" else "_random"
        within = np.full(len(test), np.nan)
        for key, v in per.items():
            if key.startswith("label:"):
                within = np.where(np.isfinite(v), v, within)
        table[f"source_p_all{suffix}"] = np.tile(per["all"], k)
        table[f"source_p_label{suffix}"] = np.tile(within, k)
    return table


def _summary(ctx, test, loaded, table, sanity, pr, lung, counts, n_boot, steps, di_methods) -> dict:
    cfg = ctx["cfg"]
    explained = ctx["classes"][ctx.get("ci", 0)]
    pcol = f"p_{explained}"
    consistency = None
    if pcol in test:
        diff = np.abs(test[pcol].to_numpy(float) - table[table["method"] == table["method"].iloc[0]]
                      ["p_covid_original"].to_numpy(float))
        consistency = float(np.nanmax(diff)) if len(diff) else 0.0
    return {
        "run": ctx["run"].name,
        "run_name": cfg.get("name"),
        "model_sha256": cfg.get("model_sha256"),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "n_images": int(len(test)),
        "n_unreadable": len(loaded["errors"]),
        "unreadable": loaded["errors"][:20],
        "limit": ctx.get("limit"),
        "classes": ctx["classes"],
        "explained_class": explained,
        "methods_left_out": ctx.get("methods_left_out", {}),
        "sanity_note": ("no randomisation check: the weights of a black box (a SavedModel signature) cannot be "
                        "re-initialised") if ctx.get("blackbox") else None,
        "lung_crop": ctx["crop"],
        "n_fell_back": int(np.sum(loaded["fell_back"])),
        "methods": _methods_summary(table, ctx["classes"], sanity, n_boot),
        "probes": pr,
        "lungs": {"model": str(lungs.MODEL_PATH.relative_to(config.REPO_ROOT)),
                  "mean_area_share": float(np.mean([m.mean() for m in lung])) if len(lung) else float("nan")},
        "p_consistency_max_abs_diff": consistency,
        "settings": {"steps": steps, "di_methods": list(di_methods or ()), "deletion_baseline": "image mean",
                     "insertion_baseline": "Gaussian blur", "sanity_n": len(next(iter(sanity.values()))["_pick"])
                     if sanity else 0, "sanity_threshold": SANITY_THRESHOLD, "border": 0.1, "top": 0.15,
                     "probe_fill": pr["fill"], "probe_lung_dilation": 0.03},
        "map_counts": {k: v for k, v in counts.items() if k.startswith("heat__")},
    }


def _methods_summary(table: pd.DataFrame, classes, sanity: dict, n_boot: int) -> dict:
    """Per method: trust measures per group (all, class, source), and its sanity check."""
    out = {}
    for method in table["method"].unique():
        t = table[table["method"] == method]
        per = {}
        for name, sub in [("all", t)] + [(c, t[t["class"] == c]) for c in classes] + \
                         [(f"source:{s}", t[t["source"] == s]) for s in sorted(t["source"].unique())]:
            if sub.empty:
                continue
            d = {"n": int(len(sub)),
                 "in_lung_share": mean_ci(sub["in_lung_share"], sub["group"].astype(str).to_numpy(), n_boot),
                 **{k: float(sub[k].mean()) for k in ("lung_area_share", "lung_ratio", "border_share", "top_share")}}
            if "deletion_auc" in sub and sub["deletion_auc"].notna().any():
                d["deletion_auc"] = float(sub["deletion_auc"].mean())
                d["insertion_auc"] = float(sub["insertion_auc"].mean())
            per[name] = d
        s = sanity.get(method)
        out[method] = {"title": explain.TITLES.get(method, method), "groups": per,
                       "sanity": None if s is None else {k: v for k, v in s.items() if k != "_pick"}}
    return out


def verdict(summary: dict) -> str:
    """The audit in plain words: probes first (they decide), then where the heatmaps point."""
    parts = [summary["probes"]["verdict"]]
    for info in summary["methods"].values():
        g = info["groups"].get("all")
        if not g:
            continue
        share, area = g["in_lung_share"]["value"], g["lung_area_share"]
        where = "more than" if share > area * 1.1 else ("about as much as" if share > area * 0.9 else "less than")
        parts.append(f"{info['title']}: {share:.0%} of the heat lies in the lungs, which cover {area:.0%} of "
                     f"the image ({where} a uniform map); {g['border_share']:.0%} lies in the border band.")
        s = info.get("sanity")
        if s:
            parts.append(f"{info['title']} {'passes' if s['passes'] else 'FAILS'} the randomisation check "
                         f"(mean Spearman {s['spearman_mean']:.2f} vs threshold {s['threshold']}).")
    return " ".join(parts)


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.audit",
        description="Shortcut audit of a run over its test split: findings ranked by severity, from heatmap "
                    "trust measures, ROAD, the pointing game against expert lung boxes, the randomisation "
                    "check, lung-blanking probes, a source probe on the model's features and per-slice "
                    "metrics. Writes audit.csv, audit.json, audit_maps/ and audit_maps.png into the run.",
    )
    parser.add_argument("--run", help="run folder or name (default: the shipped model, assets/model)")
    parser.add_argument("--data", help="data root (default: $CXR_DATA_DIR or data/)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated explanation methods (default: %(default)s)")
    parser.add_argument("--di-methods", help="methods that also get RISE deletion/insertion AUCs (default: none; "
                                             "ROAD replaces them)")
    parser.add_argument("--limit", type=int, help="audit only N test images (both classes kept)")
    parser.add_argument("--road-n", type=int, default=-1,
                        help="ROAD on a class-stratified sample of N films (0: all; default: as many as a fixed "
                             "budget of multiply-adds pays for at this model's cost, all 221 for the shipped net, "
                             "35 for a DenseNet121 at 224 px; audit.json's road.n says how many)")
    parser.add_argument("--sanity-n", type=int, default=SANITY_N, help="images per method for the randomisation check")
    parser.add_argument("--no-png", action="store_true", help="do not draw audit_maps.png (mean maps over mean X-rays)")
    parser.add_argument("--markdown", metavar="FILE",
                        help="also rewrite the generated block of FILE (e.g. assets/AUDIT.md) with the findings "
                             "and figures")
    parser.add_argument("--json", action="store_true", help="print the summary (with its findings) as one JSON object")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    di = [m.strip() for m in args.di_methods.split(",")] if args.di_methods else ()
    try:
        summary = run_audit(args.run, args.data, methods, args.limit, di, args.sanity_n, progress=not args.json,
                            road_n=args.road_n or None)
    except (FileNotFoundError, ValueError, runs.RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run = runs.open_run(args.run).path
    if not args.no_png:
        mean_maps_png(run)
    if args.markdown:
        findings.update_markdown(args.markdown, summary, run)
    if args.json:
        print(json.dumps(summary, default=float))
    else:
        print(summary["verdict"])
        for f in summary["findings"]:
            print(f"[{f['severity']}] {f['claim']}")
        print(f"({summary['n_images']} images, {summary['timing']['total_s']:.0f} s; written to "
              f"audit.csv / audit.json in the run)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
