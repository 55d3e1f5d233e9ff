"""core.distribute: TF_CONFIG checks, who is chief, and real multi-worker training on 127.0.0.1.

The two slow tests start two worker processes each (free ports on 127.0.0.1), as a cluster's
hosts would run them: the first trains the project's network a few steps through
``tf.distribute.MultiWorkerMirroredStrategy`` and checks that both workers end with the same
weights; the second runs ``python -m core.train --strategy multiworker`` and checks that only the
chief writes a run folder, and that it is sound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from test_browser import free_port

from core import config, distribute, runs

REPO = config.REPO_ROOT
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}


def cluster(n: int = 2) -> list[str]:
    return [f"127.0.0.1:{free_port()}" for _ in range(n)]


def tf_config(hosts: list[str], i: int, kind: str = "worker") -> str:
    return json.dumps({"cluster": {"worker": hosts}, "task": {"type": kind, "index": i}})


# --------------------------------------------------------------------------- TF_CONFIG, chief
def test_tf_config_parsed_and_chief_is_worker_0():
    hosts = ["10.0.0.1:2222", "10.0.0.2:2222", "10.0.0.3:2222"]
    for i in range(3):
        cfg = distribute.tf_config(tf_config(hosts, i))
        assert cfg["workers"] == 3 and cfg["index"] == i and cfg["chief"] == (i == 0)
    with_chief = {"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {"type": "worker", "index": 0}}
    assert not distribute.tf_config(json.dumps(with_chief))["chief"]  # a named chief, not worker 0
    with_chief["task"] = {"type": "chief", "index": 0}
    cfg = distribute.tf_config(json.dumps(with_chief))
    assert cfg["chief"] and cfg["workers"] == 3
    assert distribute.tf_config("") is None


@pytest.mark.parametrize("raw, words", [
    ("{not json", "not valid JSON"),
    ('{"task": {"type": "worker", "index": 0}}', '"cluster"'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "out of range"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "not in the cluster"),
    ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
    ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}', "twice"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:1"]}, "task": {"type": "worker", "index": 0}}', "no 'ps'"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": "0"}}', "index"),
])
def test_bad_tf_config_says_what_is_wrong(raw, words):
    with pytest.raises(distribute.ClusterError, match="TF_CONFIG") as err:
        distribute.tf_config(raw)
    assert words in str(err.value)


def test_strategy_names_and_chief_rule(monkeypatch, tmp_path):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="unknown strategy 'ring'"):
        distribute.check("ring")
    with pytest.raises(distribute.ClusterError, match="needs the TF_CONFIG"):
        distribute.check("multiworker")
    with pytest.raises(ValueError, match="--resume"):
        distribute.check("multiworker", resume=True)
    for name in (None, "default", "mirrored"):
        distribute.check(name)
        assert distribute.is_chief(name) and distribute.runs_root(tmp_path, name) == tmp_path
    monkeypatch.setenv("TF_CONFIG", tf_config(["a:1", "b:1"], 1))
    assert not distribute.is_chief("multiworker")
    assert distribute.is_chief("mirrored")  # TF_CONFIG only matters to the multi-worker strategy
    scratch = distribute.runs_root(tmp_path, "multiworker")
    assert scratch != tmp_path and scratch.is_dir()
    run = scratch / "20260101-000000-x"
    run.mkdir()
    distribute.discard(run, "multiworker")
    assert not scratch.exists()
    monkeypatch.setenv("TF_CONFIG", tf_config(["a:1", "b:1"], 0))
    assert distribute.is_chief("multiworker") and distribute.runs_root(tmp_path, "multiworker") == tmp_path


def test_train_refuses_multiworker_without_tf_config(monkeypatch, tmp_path):
    env = {k: v for k, v in ENV.items() if k != "TF_CONFIG"}
    out = subprocess.run([sys.executable, "-m", "core.train", "--strategy", "multiworker", "--runs", str(tmp_path)],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "needs the TF_CONFIG" in out.stderr
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- real workers
def run_workers(cmds: list[list[str]], hosts: list[str], timeout: int = 400) -> list[subprocess.CompletedProcess]:
    """Start one process per worker with its TF_CONFIG; wait for all (kill all on a timeout)."""
    procs = [subprocess.Popen(cmd, env={**ENV, "TF_CONFIG": tf_config(hosts, i)}, cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i, cmd in enumerate(cmds)]
    results = []
    try:
        for cmd, p in zip(cmds, procs, strict=True):
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.mark.slow
def test_two_workers_train_in_step_and_agree_on_the_weights(tmp_path):
    hosts = cluster(2)
    outs = [tmp_path / f"w{i}.npz" for i in range(2)]
    res = run_workers([[sys.executable, str(REPO / "tests" / "multiworker_job.py"), str(o)] for o in outs], hosts)
    for r in res:
        assert r.returncode == 0, r.stderr[-3000:]
    w = [np.load(o) for o in outs]
    assert int(w[0]["replicas"]) == 2 and bool(w[0]["chief"]) and not bool(w[1]["chief"])
    names = sorted(k for k in w[0].files if k.startswith("after_"))
    assert names
    for k in names:
        np.testing.assert_array_equal(w[0][k], w[1][k], err_msg=k)  # every weight, BN statistics too
    moved = max(float(np.abs(w[0][k] - w[0][k.replace("after", "before")]).max()) for k in names)
    assert moved > 1e-3  # they trained, not just stayed at the (broadcast) initial weights


@pytest.mark.slow
def test_train_cli_multiworker_chief_writes_the_only_run(cxr_root, tmp_path):
    hosts = cluster(2)
    cmd = [sys.executable, "-m", "core.train", "--data", str(cxr_root), "--runs", str(tmp_path), "--size", "32",
           "--limit", "3", "--epochs", "2", "--batch-size", "8", "--width", "0.25", "--folds", "2", "--members", "1",
           "--strategy", "multiworker",
           "--no-evaluate", "--no-calibrate", "--no-cache", "--quiet", "--json"]
    res = run_workers([cmd, cmd], hosts)
    for r in res:
        assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(res[0].stdout)
    assert res[1].stdout.strip() == "" and "the chief wrote the run folder" in res[1].stderr
    written = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert written == [Path(result["run"])]
    run = Path(result["run"])
    cfg = runs.read_config(run)
    assert cfg["strategy"] == "multiworker" and cfg["replicas"] == 2
    runs.load_model(run)  # sha256 recorded by the chief matches its model.keras
    # The held-out fold's AUC after the last epoch (history.csv) equals the one computed from the
    # out-of-fold rows of predictions.csv (no calibration: it could reverse a tiny run's ranking).
    pred = runs.read_predictions(run)
    val = pred[pred["split"] == "val"]
    hist = pd.read_csv(run / "history.csv")
    auc = roc_auc_score(val["class"] == "covid", val["p_covid"])
    assert hist["val_auc"].iloc[-1] == pytest.approx(auc, abs=1e-6)
