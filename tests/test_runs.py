"""core.runs: run folders, atomic files, clear errors, safe model loading, default run."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from core import config, runs


def test_new_run_names_are_unique_and_timestamped(tmp_path):
    a = runs.new_run(tmp_path, "my run/1")
    b = runs.new_run(tmp_path, "my run/1")
    assert a != b and a.is_dir() and b.is_dir()
    assert a.name.endswith("-my-run-1")
    assert a.name[:8].isdigit() and a.name[8] == "-"


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    runs.write_json(tmp_path / "x.json", {"a": 1, "p": tmp_path})
    runs.write_csv(tmp_path / "x.csv", pd.DataFrame({"a": [1, 2]}))
    assert json.loads((tmp_path / "x.json").read_text())["a"] == 1
    assert pd.read_csv(tmp_path / "x.csv")["a"].tolist() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.csv", "x.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    runs.write_json(tmp_path / "x.json", {"a": 1})
    with pytest.raises(TypeError):
        runs.write_json(tmp_path / "x.json", {"a": object()})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_missing_and_corrupt_files_raise_one_sentence(tmp_path):
    run = tmp_path / "20260101-000000-broken"
    with pytest.raises(runs.RunError, match="does not exist"):
        runs.read_config(run)
    run.mkdir()
    with pytest.raises(runs.RunError, match="has no config.json") as exc:
        runs.read_config(run)
    assert "broken" in str(exc.value) and str(exc.value).endswith(".")
    (run / "config.json").write_text("{not json")
    with pytest.raises(runs.RunError, match="corrupt config.json"):
        runs.read_config(run)
    (run / "history.csv").write_text("loss\n1.0\n")
    with pytest.raises(runs.RunError, match="history.csv without the column"):
        runs.read_history(run)
    with pytest.raises(runs.RunError, match="has no model.keras"):
        runs.load_model(run)
    (run / "model.keras").write_bytes(b"not a zip")
    (run / "config.json").write_text("{}")
    with pytest.raises(runs.RunError, match="cannot be loaded"):
        runs.load_model(run)


def test_load_model_checks_sha256(tiny_run, tmp_path):
    model = runs.load_model(tiny_run)
    assert model.output_shape[-1] == 2
    copy = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, copy)
    with open(copy / "model.keras", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(runs.RunError, match="sha256 does not match"):
        runs.load_model(copy)


def test_readers_on_a_real_run(tiny_run):
    cfg = runs.read_config(tiny_run)
    assert cfg["task"] == "binary" and cfg["classes"] == ["covid", "other"]
    assert len(runs.read_history(tiny_run)) >= 1
    pred = runs.read_predictions(tiny_run)
    assert {"p_covid", "p_other", "split"} <= set(pred.columns)
    assert pred["patient_id"].map(type).eq(str).all()
    assert set(runs.read_split(tiny_run)["split"]) == {"train", "val", "test"}
    assert runs.read_env(tiny_run)["packages"]["keras"]


def test_list_and_resolve_runs(tiny_run, monkeypatch, tmp_path):
    root = tiny_run.parent
    assert tiny_run in runs.list_runs(root)
    assert runs.resolve_run(tiny_run) == tiny_run.resolve()
    monkeypatch.setenv("CXR_RUNS_DIR", str(root))
    assert runs.resolve_run(tiny_run.name) == tiny_run.resolve()  # a bare name under runs/
    # None -> the shipped run; listed first
    monkeypatch.setattr(config, "DEFAULT_RUN", tiny_run)
    assert runs.resolve_run(None) == tiny_run.resolve()
    assert runs.list_runs(tmp_path)[0] == tiny_run
    monkeypatch.setattr(config, "DEFAULT_RUN", tmp_path / "nothing")
    with pytest.raises(runs.RunError, match="does not exist"):
        runs.resolve_run(None)
