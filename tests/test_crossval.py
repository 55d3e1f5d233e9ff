"""core.crossval: leave-one-source-out folds, the table, and resuming after a stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from core import config, crossval

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(config.REPO_ROOT)}
QUICK = ["--size", "32", "--limit", "3", "--epochs", "1", "--folds", "2", "--members", "1", "--batch-size", "8",
         "--quiet"]


def test_eligible_sources_keep_both_classes_in_training():
    t = pd.DataFrame({"source": ["a", "a", "b", "c", "d"], "label": ["covid", "pneumonia", "covid", "normal", "normal"]})
    # a holds both classes; b is covid only (a still has covid); c and d are normal only
    assert crossval.eligible_sources(t) == ["a", "b", "c", "d"]
    t2 = pd.DataFrame({"source": ["a", "c", "d"], "label": ["covid", "normal", "normal"]})
    assert crossval.eligible_sources(t2) == ["c", "d"]  # the only covid source cannot be held out


def _row(auc, spec=None, sens=None):
    row = {"n": 10, "roc_auc": {"value": auc, "ci_low": auc - 0.1, "ci_high": auc + 0.05}}
    if spec is not None:
        row["specificity"] = {"value": spec}
    if sens is not None:
        row["sensitivity"] = {"value": sens}
    return row


def test_summary_is_the_mean_and_the_worst_fold():
    out = crossval.summarise({"nih": _row(0.7, spec=0.4), "kermany": _row(0.9, spec=0.8), "hannover": _row(0.8, sens=0.9)})
    assert out["mean_roc_auc"] == pytest.approx(0.8)
    assert out["worst_roc_auc"] == pytest.approx(0.7) and out["worst_source"] == "nih"
    assert out["mean_specificity"] == pytest.approx(0.6) and out["worst_specificity"] == pytest.approx(0.4)
    assert out["worst_sensitivity"] == pytest.approx(0.9)
    text = crossval.format_table(out)
    assert "| nih | 10 | 0.700 [0.600, 0.750] | 0.400 |" in text and "worst 0.700 (nih)" in text


@pytest.mark.slow
def test_crossval_cli_trains_each_fold_once_and_keeps_finished_folds(cxr_root, tmp_path):
    out = tmp_path / "cv"
    cmd = [sys.executable, "-m", "core.crossval", "--data", str(cxr_root), "--out", str(out), *QUICK, "--json"]
    first = subprocess.run([*cmd, "--sources", "nih"], env=ENV, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    res = json.loads(first.stdout)
    fold = res["folds"]["nih"]
    assert fold["n"] > 0 and fold["n_covid"] == 0 and "specificity" in fold and "sensitivity" not in fold
    assert 0.0 <= fold["roc_auc"]["value"] <= 1.0
    assert fold["roc_auc_definition"].startswith("internal test covid images vs external")
    (nih_run,) = (out / "folds").glob("*-holdout-nih")
    stamp = (nih_run / "metrics.json").stat().st_mtime_ns
    # the run never saw nih: not in its split, and its external rows are exactly nih
    split = pd.read_csv(nih_run / "split.csv")
    assert "nih" not in set(split["source"])
    pred = pd.read_csv(nih_run / "predictions.csv")
    assert set(pred.loc[pred["split"] == "external", "source"]) == {"nih"}

    again = subprocess.run([*cmd, "--sources", "nih,hannover"], env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    res = json.loads(again.stdout)
    assert "kept" in again.stderr and (nih_run / "metrics.json").stat().st_mtime_ns == stamp
    assert set(res["folds"]) == {"nih", "hannover"}
    assert "sensitivity" in res["folds"]["hannover"]  # a covid-only source: sensitivity at the run's threshold
    assert res["worst_roc_auc"] == min(f["roc_auc"]["value"] for f in res["folds"].values())
    assert json.loads((out / "crossval.json").read_text())["folds"].keys() == res["folds"].keys()

    # another recipe in the same folder: refused, naming the setting, before anything is trained
    other = subprocess.run([*cmd, "--sources", "nih", "--seed", "7"], env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert other.returncode == 2 and "another recipe" in other.stderr and "seed" in other.stderr, other.stderr[-2000:]
    assert list((out / "folds").glob("*-holdout-nih")) == [nih_run]

    # killed while it was being evaluated (model written, metrics not): evaluated, not trained again
    before = (nih_run / "metrics.json").read_text()
    (nih_run / "metrics.json").unlink()
    third = subprocess.run([*cmd, "--sources", "nih"], env=ENV, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "evaluating" in third.stderr and list((out / "folds").glob("*-holdout-nih")) == [nih_run]
    assert json.loads((nih_run / "metrics.json").read_text())["external"] == json.loads(before)["external"]


def test_crossval_refuses_a_source_that_cannot_be_held_out(cxr_root, tmp_path):
    out = subprocess.run([sys.executable, "-m", "core.crossval", "--data", str(cxr_root), "--out", str(tmp_path),
                          "--sources", "mars", *QUICK], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "cannot be held out" in out.stderr


def _fake_fold(folds, source, record, where="config.json"):
    run = folds / f"20260101-000000-holdout-{source}"
    (run / "checkpoint").mkdir(parents=True)
    for name in ("metrics.json", "model.keras") if where == "config.json" else ("checkpoint/state.json",):
        (run / name).write_text("{}")
    (run / where).write_text(json.dumps(record))
    return run


@pytest.mark.parametrize("where", ["config.json", "checkpoint/train_config.json"])
def test_a_fold_of_another_recipe_is_neither_kept_nor_resumed(tmp_path, where):
    from core import train

    asked = train.resolve({**train.DEFAULTS, "seed": 2})
    record = {k: asked.get(k) for k in crossval.RECIPE_KEYS}
    record.update(lung_crop={"margin": 0.08}, exclude_sources=[])  # as config.json writes them
    same = _fake_fold(tmp_path / "a", "nih", record, where)
    assert crossval.recipe_mismatch(asked, same) == []
    if where == "config.json":
        assert crossval.train_fold(asked, "nih", tmp_path / "a") == same  # finished, same recipe: kept

    other = _fake_fold(tmp_path / "b", "nih", {**record, "seed": 1, "clahe": not asked["clahe"]}, where)
    with pytest.raises(ValueError, match="another recipe") as err:
        crossval.train_fold(asked, "nih", tmp_path / "b")
    assert str(other) in str(err.value) and "seed: 1 (asked: 2)" in str(err.value) and "clahe" in str(err.value)

    older = _fake_fold(tmp_path / "c", "nih", {k: v for k, v in record.items() if k not in ("clahe", "mixup")}, where)
    assert crossval.recipe_mismatch(asked, older) == []  # settings an older run does not record are not compared
