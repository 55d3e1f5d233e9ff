"""core.predict: batch prediction, bad files skipped, and p_covid really is P(COVID-19)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
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
    from core import inputs

    x = inputs.load(covid[0], model_lib.input_size(model))[0][None]  # the one path (decoded at the needed size)
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


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory):
    """A copy of the shipped run whose config.json asks for the lung crop (defaults)."""
    import shutil

    run = tmp_path_factory.mktemp("runs") / "lung-crop"
    shutil.copytree(config.DEFAULT_RUN, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["lung_crop"] = {}
    (run / "config.json").write_text(json.dumps(cfg, indent=2))
    return run


def _films(cxr_root, n):
    from test_load import pool_files

    return pool_files(cxr_root, n)


def test_parse_shard():
    assert predict.parse_shard("2/8") == (2, 8) and predict.parse_shard("1/1") == (1, 1)
    for bad in ("0/4", "5/4", "a/b", "3", "1/2/3"):
        with pytest.raises(ValueError, match="--shard"):
            predict.parse_shard(bad)
    parts = [predict.shard(list(range(10)), i, 3) for i in (1, 2, 3)]
    assert sum(parts, []) == list(range(10)) and [len(p) for p in parts] == [3, 3, 4]
    assert sum((predict.shard([1, 2], i, 4) for i in range(1, 5)), []) == [1, 2]  # more parts than files
    parts = [predict.shard(list(range(14)), i, 3, batch_size=4) for i in (1, 2, 3)]  # 4 batches: 1, 1, 2
    assert sum(parts, []) == list(range(14)) and [p[0] % 4 for p in parts] == [0, 0, 0]


def test_shards_concatenate_to_the_whole_csv(cxr_root, tmp_path, capsys):
    folder = tmp_path / "archive"
    for sub, f in (("a", f) if i % 2 else ("b", f) for i, f in enumerate(_films(cxr_root, 13))):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / f.name).write_bytes(f.read_bytes())
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    whole = tmp_path / "whole.csv"
    assert predict.main([str(folder), "--csv", str(whole), "--batch-size", "4"]) == 0
    parts = []
    for i in (1, 2, 3):  # 14 files in batches of 4: parts of 1, 1 and 2 batches
        parts.append(tmp_path / f"part{i}.csv")
        predict.main([str(folder), "--shard", f"{i}/3", "--csv", str(parts[-1]), "--batch-size", "4"])
    err = capsys.readouterr().err
    assert err.count("broken.png") == 2  # reported by the whole run and by the one shard that holds it
    text = [p.read_text().splitlines() for p in parts]
    assert whole.read_text().splitlines() == text[0][:1] + sum((t[1:] for t in text), [])
    assert len(pd.read_csv(whole)) == 13 and [len(t) - 1 for t in text] == [4, 3, 6]
    with pytest.raises(SystemExit):
        predict.main([str(folder), "--shard", "0/3"])
    assert "numbered 1..N" in capsys.readouterr().err


def test_batch_prediction_prepares_films_through_core_inputs(cxr_root, crop_run):
    """A lung-crop run: each row is what core.inputs.load + the model give, not the whole film."""
    from core import inputs

    files = _films(cxr_root, 6)
    model = runs.load_model(crop_run)
    crop = inputs.settings(runs.read_config(crop_run))
    df, errors = predict.predict_paths(model, files, lung_crop=crop, batch_size=4, workers=2)
    assert not errors and df["path"].tolist() == [str(f) for f in files]
    assert "fell_back" in df.columns
    size = model_lib.input_size(model)
    whole = []
    for f, row in zip(files, df.itertuples(), strict=True):
        x, box, fell_back, film = inputs.load(f, size, crop)
        assert row.p_covid == pytest.approx(float(model_lib.probabilities(model, x)[0, config.COVID_INDEX]), abs=1e-5)
        assert row.fell_back == fell_back
        whole.append(float(model_lib.probabilities(model, inputs.prepare([film], size)[0])[0, config.COVID_INDEX]))
    assert np.abs(df["p_covid"].to_numpy() - np.array(whole)).max() > 1e-3  # the crop changed the answers


def test_cli_uses_the_run_lung_crop(cxr_root, crop_run, capsys):
    files = _films(cxr_root, 3)
    assert predict.main([str(f) for f in files] + ["--run", str(crop_run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 3 and all("fell_back" in r for r in out["predictions"])
