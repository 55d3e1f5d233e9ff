"""core.runs: run folders, atomic files, clear errors, safe model loading, default run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from core import config, inputs, runs


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
    split = runs.read_split(tiny_run)
    assert set(split["split"]) == {"train", "test"}  # validation comes from the folds of train
    assert set(split.loc[split["split"] == "train", "fold"]) == {0, 1} and (split.loc[split["split"] == "test", "fold"] == -1).all()
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


# ----------------------------------------------------------------------------- provenance


def _git(repo, *args):
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org", "PATH": os.environ.get("PATH", ""), "HOME": str(repo)}
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


@pytest.fixture
def code_repo(tmp_path):
    """A scratch git repository with one committed core/ module."""
    repo = tmp_path / "repo"
    (repo / "core").mkdir(parents=True)
    (repo / "core" / "train.py").write_text("EPOCHS = 2\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "code")
    return repo


def test_provenance_of_a_clean_tree_is_its_commit(code_repo):
    p = runs.provenance(code_repo)
    assert len(p["git_commit"]) == 40 and p["git_dirty"] is False
    assert p["source_files"] == ["core/train.py"] and p["source_matches_commit"] is True
    assert p["source_sha256"] == runs.source_sha256(code_repo, commit=p["git_commit"])


def test_untracked_code_is_in_the_source_hash_and_marks_the_tree_dirty(code_repo):
    """The old git_commit() ran `git status --untracked-files=no`: a run trained by an untracked
    module recorded a clean commit that does not hold the code. Now the hash covers it."""
    clean = runs.provenance(code_repo)
    (code_repo / "core" / "augment.py").write_text("ROTATE = 10\n")  # untracked, never committed
    p = runs.provenance(code_repo)
    assert p["git_commit"] == clean["git_commit"]
    assert p["git_dirty"] is True and p["source_matches_commit"] is False
    assert "core/augment.py" in p["source_files"] and p["source_sha256"] != clean["source_sha256"]
    # an edit of a tracked file changes the hash too, and undoing it restores it
    (code_repo / "core" / "augment.py").unlink()
    (code_repo / "core" / "train.py").write_text("EPOCHS = 3\n")
    assert runs.provenance(code_repo)["source_sha256"] not in (clean["source_sha256"], p["source_sha256"])
    (code_repo / "core" / "train.py").write_text("EPOCHS = 2\n")
    assert runs.provenance(code_repo) == clean


def test_provenance_outside_git_still_hashes_the_code(tmp_path):
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "x.py").write_text("A = 1\n")
    p = runs.provenance(tmp_path)
    assert p["git_commit"] is None and p["git_dirty"] is None and p["source_matches_commit"] is None
    assert p["source_sha256"] == runs.source_sha256(tmp_path) and p["source_files"] == ["core/x.py"]


def test_a_trained_run_records_the_source_that_trained_it(tiny_run):
    env, cfg = runs.read_env(tiny_run), runs.read_config(tiny_run)
    here = runs.provenance()
    for record in (env, cfg):
        assert record["source_sha256"] == here["source_sha256"]  # this session's code trained it
        assert record["git_commit"] == here["git_commit"] and "git_dirty" in record
    assert env["source_files"] == here["source_files"] and "core/train.py" in env["source_files"]


def test_history_curves_keep_each_network_its_own_line():
    """Two networks of 3 epochs: each (series, network) is one curve in epoch order, ``member`` is
    no series, each column lands on the chart its Keras name says, and NaN rows are left out."""
    rows = [{"member": m, "epoch": e, "loss": 1.0 / e + m, "val_auc": 0.5 + 0.1 * e, "val_ws_auc": np.nan if e == 1 else 0.6,
             "accuracy": 0.7, "grl_lambda": 0.1 * e} for m in (0, 1) for e in (1, 2, 3)]
    hist = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # the order on disk does not matter
    curves = runs.history_curves(hist)
    assert set(curves["series"]) == {"loss", "val_auc", "val_ws_auc", "accuracy", "grl_lambda"}
    charts = curves.groupby("series")["chart"].first().to_dict()
    assert charts == {"loss": "Loss", "val_auc": "AUC", "val_ws_auc": "AUC", "accuracy": "Accuracy",
                      "grl_lambda": "Other"}
    for (series, member), g in curves.groupby(["series", "member"]):
        assert g["epoch"].tolist() == ([2, 3] if series == "val_ws_auc" else [1, 2, 3]), (series, member)
    loss1 = curves[(curves["series"] == "loss") & (curves["member"] == 1)]
    np.testing.assert_allclose(loss1["value"], [2.0, 1.5, 1 + 1 / 3])
    # one network without a member column: member 0
    single = runs.history_curves(pd.DataFrame({"epoch": [1, 2], "loss": [0.9, 0.8]}))
    assert single["member"].tolist() == [0, 0] and single["chart"].tolist() == ["Loss", "Loss"]


# --------------------------------------------------------------------------- the Run handle
def _run_with(tmp_path, cfg, metrics=None, name="r"):
    run = tmp_path / name
    run.mkdir()
    (run / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    if metrics is not None:
        (run / "metrics.json").write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
    return run


def test_open_run_reads_the_shipped_run(shipped_run):
    run = runs.open_run()
    assert run.path == shipped_run.resolve() and run.name == "model" and "model" in run.label
    assert run.classes == ("covid", "other") and run.positive == "covid" and run.positive_index == config.COVID_INDEX
    assert run.size == 128 and run.channels == 1 and run.lung_crop["margin"] == 0.08
    thr = runs.read_metrics(shipped_run)["threshold"]["value"]
    assert run.threshold == thr and "chosen on val" in run.threshold_source
    assert run.has("metrics.json") and not run.has("nothing.json") and run.stamp("nothing.json") is None
    assert run.stamp("config.json")[0] == (shipped_run / "config.json").stat().st_size
    assert runs.open_run(run) is run
    assert run.audit()["model_sha256"] and len(run.audit_table())


def test_open_run_defaults_and_threshold_sources(tmp_path):
    run = runs.open_run(_run_with(tmp_path, {"task": "multiclass"}, name="a"))
    assert run.classes == config.TASKS["multiclass"] and run.size is None and run.lung_crop is None
    assert run.threshold is None and "no metrics.json" in run.threshold_source
    assert run.audit() is None and run.audit_table() is None
    assert runs.open_run(_run_with(tmp_path, {}, {"threshold": 0.3}, name="b")).threshold == 0.3
    odd = runs.open_run(_run_with(tmp_path, {}, {"threshold": "high"}, name="c"))
    assert odd.threshold is None and "no numeric threshold" in odd.threshold_source
    broken = runs.open_run(_run_with(tmp_path, {}, "{", name="d"))
    assert broken.threshold is None and "corrupt metrics.json" in broken.threshold_source
    assert runs.open_run(_run_with(tmp_path, {"lung_crop": {}}, name="e")).lung_crop == inputs.LUNG_CROP
    assert runs.open_run(_run_with(tmp_path, {"lung_crop": False}, name="f")).lung_crop is None


@pytest.mark.parametrize("cfg, field", [
    ([1, 2], "not a JSON object"),
    ({"classes": "covid"}, "'classes'"),
    ({"classes": ["covid", 3]}, "'classes'"),
    ({"task": "ternary"}, "'task'"),
    ({"size": "128"}, "'size'"),
    ({"size": -4}, "'size'"),
    ({"size": True}, "'size'"),
    ({"lung_crop": "yes"}, "'lung_crop'"),
    ({"lung_crop": {"margin": "wide"}}, "'lung_crop'"),
    ({"data_root": 5}, "'data_root'"),
])
def test_a_bad_config_is_a_run_error_naming_the_run_and_field(tmp_path, cfg, field):
    folder = _run_with(tmp_path, cfg, name="badrun")
    with pytest.raises(runs.RunError, match=field) as err:
        runs.open_run(folder)
    assert "'badrun'" in str(err.value)


def test_data_root_rule(tmp_path, monkeypatch):
    trained = tmp_path / "trained_here"
    run = runs.open_run(_run_with(tmp_path, {"data_root": str(trained)}))
    monkeypatch.delenv("CXR_DATA_DIR", raising=False)
    assert run.recorded_data_root == trained.resolve()
    assert run.data_root() == config.REPO_ROOT / "data"  # recorded root missing here
    trained.mkdir()
    assert run.data_root() == trained.resolve()
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "env"))
    assert run.data_root() == (tmp_path / "env").resolve()
    assert run.data_root(tmp_path / "arg") == (tmp_path / "arg").resolve()
    rel = runs.open_run(_run_with(tmp_path, {"data_root": "data/x"}, name="rel"))
    assert rel.recorded_data_root == (config.REPO_ROOT / "data/x").resolve()


def test_run_model_is_cached_and_hash_checked(shipped_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shipped_run, copy, ignore=shutil.ignore_patterns("audit*", "ood_reference.npz"))
    run = runs.open_run(copy)
    model = run.model()
    assert run.model() is model and model.output_shape[-1] == len(run.classes)
    with open(copy / "model.keras", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(runs.RunError, match="sha256 does not match"):
        run.model()


def test_open_for_cli_prints_one_sentence(tmp_path, capsys):
    assert runs.open_for_cli(_run_with(tmp_path, [1])) is None
    assert capsys.readouterr().err.startswith("error: run 'r'")
