"""core.predict: batch prediction, bad files skipped, and p_covid really is P(COVID-19)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from core import config, predict, runs
from core import model as model_lib

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(config.REPO_ROOT)}


def _test_images(run, root, n=12):
    """Up to n covid and n non-covid *test* images of the run (never seen in training)."""
    pred = runs.read_predictions(run)
    test = pred[pred["split"] == "test"]
    covid = test[test["label"] == "covid"].head(n)
    other = test[test["label"] == "normal"].head(n)
    return [root / p for p in covid["path"]], [root / p for p in other["path"]]


def test_predict_paths_skips_bad_files(tiny_run, cxr_root, tmp_path):
    model = runs.load_model(tiny_run)
    covid, normal = _test_images(tiny_run, cxr_root, 2)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    paths = [covid[0], bad, normal[0], tmp_path / "missing.jpg"]
    df, errors = predict.predict_paths(model, paths)
    assert df["path"].tolist() == [str(covid[0]), str(normal[0])]
    assert sorted(e.name for e in errors) == sorted([str(bad), str(tmp_path / "missing.jpg")])
    np.testing.assert_allclose(df["p_covid"] + df["p_other"], 1.0, atol=1e-5)
    # p_covid is column COVID_INDEX of the model's softmax
    from core import images

    x = images.load(covid[0], model_lib.input_size(model))
    assert df["p_covid"].iloc[0] == pytest.approx(float(model_lib.probabilities(model, x)[0, config.COVID_INDEX]), abs=1e-5)


def test_cli_json_and_csv(tiny_run, cxr_root, tmp_path):
    covid, normal = _test_images(tiny_run, cxr_root, 2)
    folder = tmp_path / "in"
    folder.mkdir()
    for p in covid + normal:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "notes.png").write_text("not an image")
    out_csv = tmp_path / "out.csv"
    res = subprocess.run(
        [sys.executable, "-m", "core.predict", str(folder), "--run", str(tiny_run), "--csv", str(out_csv), "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=config.REPO_ROOT,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["n"] == len(covid) + len(normal)
    assert [e["path"].endswith("notes.png") for e in out["errors"]] == [True]
    assert "notes.png" in res.stderr
    assert all(0.0 <= r["p_covid"] <= 1.0 for r in out["predictions"])
    assert out_csv.is_file() and "p_covid" in out_csv.read_text().splitlines()[0]


def test_p_covid_is_higher_on_covid_images(cxr_root, shipped_run):
    """The trap of the original project (it reported P(normal)): on real held-out test images,
    the shipped model's p_covid must be high on COVID-19 films and low on normal films."""
    run = shipped_run
    model = runs.load_model(run)
    covid, normal = _test_images(run, cxr_root, 12)
    df, errors = predict.predict_paths(model, covid + normal)
    assert not errors
    y = np.r_[np.ones(len(covid)), np.zeros(len(normal))]
    p = df["p_covid"].to_numpy()
    assert p[: len(covid)].mean() > p[len(covid) :].mean() + 0.2
    assert roc_auc_score(y, p) > 0.85
    # and the other column is its complement, so reading p_other as P(covid) would fail the check
    assert roc_auc_score(y, df["p_other"]) < 0.15
