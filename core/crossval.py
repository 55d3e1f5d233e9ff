"""Leave-one-source-out: does the recipe hold up on a collection it never saw?

``python -m core.crossval --data DIR [--json]`` trains the recipe (the same options as
``core.train``; without options, the shipped recipe) once per held-out source: every source in
turn whose removal still leaves both classes to train on (so a COVID-19 source is held out only
when another COVID-19 source remains). The held-out source's images are the "external" split of
that fold's run; the decision threshold is the one that run chose on its own out-of-fold
predictions. One table comes out:

- held-out source, n;
- AUC against the other class: within the source when it holds both classes, else the
  held-out images ranked against the other class of that run's internal test;
- specificity (a source of non-COVID films) or sensitivity (COVID-19 films), or both, at the
  run's threshold; every figure with its patient-bootstrap 95% CI;
- the mean and the worst AUC over the folds.

Fold runs live in ``<out>/folds/<timestamp>-holdout-<source>/``. A fold whose run has its
metrics.json is kept; a fold killed mid-way resumes from its checkpoint, so the command can be
rerun after a kill. Either only when that run was trained with the recipe asked for: a fold run of
another recipe in the same ``--out`` stops the command with the settings that differ. ``crossval.json`` in ``<out>`` holds
``{"folds": {source: {"n", "roc_auc", "specificity"|"sensitivity", ...}}, "mean_roc_auc",
"worst_roc_auc", ...}``; the shipped model keeps its recipe's table as
``assets/model/crossval.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from core import config, runs, splits
from core.evaluate import evaluate_run

# The settings that make a recipe: recorded in crossval.json, and compared before a fold run is kept or resumed.
RECIPE_KEYS = ("task", "preset", "backbone", "size", "epochs", "folds", "members", "lung_crop", "adversarial",
               "augment", "balance", "seed", "split_seed", "exclude_sources", "limit", "field", "clahe", "mixup")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def eligible_sources(table, task: str = "binary") -> list[str]:
    """Sources that can be held out: what remains still has every class of the task."""
    cls = [config.label_to_class(lab, task) for lab in table["label"]]
    t = table.assign(_cls=cls)
    need = set(t["_cls"])
    return [s for s in sorted(set(t["source"])) if set(t.loc[t["source"] != s, "_cls"]) == need]


def _fold_run(folds_dir: Path, source: str) -> Path | None:
    """The newest run folder of a fold (complete or resumable), if any."""
    found = sorted(folds_dir.glob(f"*-holdout-{source}")) if folds_dir.is_dir() else []
    return found[-1] if found else None


def _complete(run: Path | None) -> bool:
    return run is not None and (run / "metrics.json").is_file() and (run / "model.keras").is_file()


def _fold_recipe(run: Path) -> dict:
    """The settings a fold run was trained with: its config.json when finished, else its checkpoint's
    train_config.json; {} when it has neither (such a folder is not kept or resumed)."""
    for f in (run / "config.json", run / "checkpoint" / "train_config.json"):
        if f.is_file():
            return json.loads(f.read_text())
    return {}


def _norm(key: str, value):
    """A recipe value as both records write it: the lung crop is on or off (config.json holds its
    settings), lists and tuples alike, no excluded sources = None."""
    if key == "lung_crop":
        return bool(value)
    value = json.loads(json.dumps(value, default=str))
    return None if value == [] else value


def recipe_mismatch(cfg: dict, run: Path) -> list[str]:
    """``"key: fold's value (asked: value)"`` for every recipe setting (:data:`RECIPE_KEYS`) that the fold
    ``run`` records differently from ``cfg``; settings an older run does not record are not compared."""
    had = _fold_recipe(run)
    return [f"{k}: {had[k]!r} (asked: {cfg.get(k)!r})" for k in RECIPE_KEYS
            if k in had and _norm(k, had[k]) != _norm(k, cfg.get(k))]


def train_fold(cfg: dict, source: str, folds_dir: Path) -> Path:
    """The finished run of one fold: kept if complete, resumed if killed, else trained. A kept or
    resumed run must have been trained with ``cfg``'s recipe: ValueError, naming the settings, if not
    (its numbers would be another recipe's under this one's name)."""
    # lazy: core.train imports TensorFlow (~4 s); the dashboard imports this module for table_rows
    from core import train

    run = _fold_run(folds_dir, source)
    diff = recipe_mismatch(cfg, run) if run is not None else []
    if diff:
        raise ValueError(f"fold {source}: {run} was trained with another recipe ({'; '.join(diff)}); "
                         f"write these folds to another --out, or remove that folder to train the fold again")
    if _complete(run):
        log(f"fold {source}: kept {run.name}")
        return run
    if run is not None and (run / "model.keras").is_file() and (run / "predictions.csv").is_file():
        # killed while it was being evaluated: the model is done
        log(f"fold {source}: evaluating {run.name}")
        evaluate_run(run, progress=False)
        return run
    if run is not None and (run / "checkpoint" / "state.json").is_file():
        log(f"fold {source}: resuming {run.name}")
        return train.train(resume=str(run), verbose=cfg.get("verbose", 1))
    fold_cfg = {**cfg, "holdout_source": source, "runs": str(folds_dir), "name": f"holdout-{source}",
                "evaluate": True}
    return train.train(fold_cfg)


def _fig(d) -> dict:
    """A metric cell {value, ci_low, ci_high} (NaN-safe)."""
    if not isinstance(d, dict):
        d = {"value": d}
    return {k: d.get(k) for k in ("value", "ci_low", "ci_high")}


def fold_row(run: Path) -> dict:
    """The table row of one finished fold run (from its metrics.json ``external`` block)."""
    m = runs.open_run(run).metrics()
    ext = m.get("external")
    if not ext:
        raise runs.RunError(f"run {run.name!r} ({run}) has no external (held-out source) results")
    row = {"n": int(ext["n"]), "n_covid": int(ext.get("n_covid", 0)), "n_patients": ext.get("n_patients"),
           "roc_auc": _fig(ext["roc_auc"]), "roc_auc_definition": ext.get("roc_auc_definition"),
           "threshold": float(ext["threshold"]), "run": str(run)}
    for k in ("sensitivity", "specificity"):
        if k in ext:
            row[k] = _fig(ext[k])
    within = (m.get("within_source") or {}).get("ieee8023")
    if within:
        row["internal_within_ieee8023_auc"] = _fig(within["roc_auc"])
    row["internal_roc_auc"] = _fig(m.get("roc_auc"))
    return row


def summarise(folds: dict) -> dict:
    """Mean and worst held-out AUC (and specificity/sensitivity) over the folds."""
    def values(key):
        return {s: r[key]["value"] for s, r in folds.items() if key in r and r[key].get("value") is not None}

    out: dict = {"folds": folds}
    auc = values("roc_auc")
    finite = {s: v for s, v in auc.items() if math.isfinite(v)}
    out["mean_roc_auc"] = float(np.mean(list(finite.values()))) if finite else None
    if finite:
        worst = min(finite, key=finite.get)
        out["worst_roc_auc"], out["worst_source"] = float(finite[worst]), worst
    else:
        out["worst_roc_auc"], out["worst_source"] = None, None
    for key in ("specificity", "sensitivity"):
        v = values(key)
        if v:
            out[f"mean_{key}"] = float(np.mean(list(v.values())))
            out[f"worst_{key}"] = float(min(v.values()))
    return out


def crossval(cfg: dict, out: Path, sources: list[str] | None = None) -> dict:
    """Run (or resume) every fold of the leave-one-source-out table; write and return crossval.json."""
    # lazy: core.train imports TensorFlow (~4 s); the dashboard imports this module for table_rows
    from core import train

    full = train.resolve({**train.DEFAULTS, **cfg})
    root = config.data_dir(full.get("data"))
    full["data"] = str(root)
    table = splits.prepare(root, seed=full["split_seed"], split_file=full.get("split_file"))
    table = table[~table["source"].isin(full.get("exclude_sources") or [])]
    can = eligible_sources(table, full["task"])
    todo = sources or can
    bad = sorted(set(todo) - set(can))
    if bad:
        raise ValueError(f"source(s) {bad} cannot be held out (what remains would lack a class); "
                         f"eligible: {can}")
    out.mkdir(parents=True, exist_ok=True)
    folds = {}
    for i, source in enumerate(todo, 1):
        log(f"== fold {i}/{len(todo)}: {source} held out")
        folds[source] = fold_row(train_fold(full, source, out / "folds"))
    result = summarise(folds)
    recipe = {k: full.get(k) for k in RECIPE_KEYS}
    result.update(recipe=recipe, data_root=str(root), eligible_sources=can)
    runs.write_json(out / "crossval.json", result)
    return result


def _cell(d: dict | None) -> str:
    if not d or d.get("value") is None or not math.isfinite(d["value"]):
        return "–"
    lo, hi = d.get("ci_low"), d.get("ci_high")
    ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
    return f"{d['value']:.3f}{ci}"


def table_rows(result: dict):
    """The leave-one-source-out table as a DataFrame of plain-words columns (for the dashboard)."""
    rows = []
    for s, r in result["folds"].items():
        rows.append({"held-out source": s, "images": r["n"], "AUC vs other class [95% CI]": _cell(r["roc_auc"]),
                     "specificity": _cell(r.get("specificity")), "sensitivity": _cell(r.get("sensitivity")),
                     "AUC compares": r.get("roc_auc_definition") or ""})
    return pd.DataFrame(rows)


def format_table(result: dict) -> str:
    """The leave-one-source-out table as Markdown."""
    lines = ["| held-out source | n | AUC vs other class [95% CI] | specificity | sensitivity |",
             "|---|---:|---|---|---|"]
    for s, r in result["folds"].items():
        lines.append(f"| {s} | {r['n']} | {_cell(r['roc_auc'])} | {_cell(r.get('specificity'))} | "
                     f"{_cell(r.get('sensitivity'))} |")
    mean, worst = result.get("mean_roc_auc"), result.get("worst_roc_auc")
    if mean is not None:
        lines.append(f"\nmean AUC {mean:.3f}; worst {worst:.3f} ({result['worst_source']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    # lazy: core.train imports TensorFlow (~4 s); the dashboard imports this module for table_rows
    from core import train

    p = argparse.ArgumentParser(
        prog="python -m core.crossval",
        description="Leave-one-source-out: train the recipe once per held-out source and print the table "
        "(AUC against the other class, specificity/sensitivity at each run's own threshold, 95%% CIs, mean and "
        "worst). Takes every core.train recipe option; without them, the shipped recipe. Rerun to resume.",
    )
    train.add_recipe_arguments(p)
    p.add_argument("--out", help="folder of the fold runs and crossval.json (default <runs>/crossval-<name>)")
    p.add_argument("--sources", help="comma-separated sources to hold out (default: every eligible source)")
    p.add_argument("--json", action="store_true", help="print crossval.json on stdout")
    a = p.parse_args(argv)
    cfg = train.recipe_from_args(a)
    cfg.pop("holdout_source", None)
    out = Path(a.out) if a.out else config.runs_dir(a.runs) / f"crossval-{a.name}"
    try:
        result = crossval(cfg, out, [s.strip() for s in a.sources.split(",")] if a.sources else None)
    except (ValueError, FileNotFoundError, runs.RunError) as exc:
        log(f"error: {exc}")
        return 2
    print(json.dumps(result, default=str) if a.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
