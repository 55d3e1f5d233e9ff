"""Rules of the test suite itself, checked so that they cannot quietly erode.

- A test that trains a model through the project's trainers is marked ``slow`` (the fast suite may
  use the one shared ``tiny_run`` fixture, and small synthetic fits inside fixtures).
- No skip hides a missing shipped asset: ``assets/model`` and ``assets/lungs`` are part of the
  repository, their tests use the ``shipped_run`` / ``shipped_lungs`` fixtures, which fail.
- No assertion passes on NaN through ``... or isnan(x)``.
- CI fails, and does not go green without a browser, when chromium cannot be installed; under CI
  the browser test fails instead of skipping.
"""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
from pathlib import Path

from core import config

TESTS = Path(__file__).resolve().parent
SOURCES = {p.name: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(TESTS.glob("test_*.py"))}
TRAINERS = {("train", "train"), ("train", "main"), ("lungs", "train"), ("lungs", "main")}


def _tests(tree):
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            yield node


def _is_slow(fn: ast.FunctionDef) -> bool:
    return any("slow" in ast.unparse(d) for d in fn.decorator_list)


def _trains(fn: ast.FunctionDef) -> str | None:
    """What in ``fn`` trains a model: a trainer call, or a ``core.train``/``core.lungs train`` process with --data."""
    for node in ast.walk(fn):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in TRAINERS:
            return ast.unparse(node)[:80]
        consts = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
        if ("core.train" in consts or "core.lungs" in consts) and "--data" in consts:
            return ast.unparse(node)[:80]
    return None


def test_tests_that_train_are_marked_slow():
    offenders = [f"{name}::{fn.name} ({what})" for name, tree in SOURCES.items() for fn in _tests(tree)
                 if not _is_slow(fn) and (what := _trains(fn))]
    assert not offenders, "train a model but are not marked @pytest.mark.slow: " + "; ".join(offenders)


def test_no_skip_hides_a_missing_shipped_asset():
    words = ("assets", "shipped", "not present", "not trained", "not in this checkout", "no shipped")
    offenders = []
    for name, tree in SOURCES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("pytest.skip", "pytest.mark.skipif"):
                text = ast.unparse(node).lower()
                if any(w in text for w in words):
                    offenders.append(f"{name}:{node.lineno} {ast.unparse(node)[:90]}")
    assert not offenders, "a missing shipped file must fail (shipped_run / shipped_lungs), not skip: " + \
        "; ".join(offenders)


def test_no_assertion_passes_on_nan_by_an_or():
    offenders = []
    for name, tree in SOURCES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Assert):
                for op in ast.walk(node.test):
                    if isinstance(op, ast.BoolOp) and isinstance(op.op, ast.Or) and "isnan" in ast.unparse(op):
                        offenders.append(f"{name}:{node.lineno} {ast.unparse(node.test)[:90]}")
    assert not offenders, "assertions that pass whenever a value is NaN: " + "; ".join(offenders)


# --------------------------------------------------------------------------- CI without chromium


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_ci_fails_when_chromium_cannot_be_installed(tmp_path):
    """.ci/run on a machine without chromium whose apt-get fails: CI must stop with a non-zero code
    instead of running the tests (the fake python3 and pytest below would pass) without a browser."""
    repo = tmp_path / "clone"
    (repo / ".ci").mkdir(parents=True)
    (repo / ".ci" / "run").write_bytes((config.REPO_ROOT / ".ci" / "run").read_bytes())
    (repo / "requirements.txt").write_text("")
    bin_ = tmp_path / "bin"  # a PATH with the tools .ci/run uses, but no chromium
    bin_.mkdir()
    for tool in ("dirname", "mkdir", "cat", "chmod", "touch"):
        (bin_ / tool).symlink_to(subprocess.check_output(["sh", "-c", f"command -v {tool}"], text=True).strip())
    _script(bin_ / "apt-get", "echo 'E: Unable to locate package chromium' >&2\nexit 100\n")
    # python3 -m venv .venv makes a venv whose pip and python succeed and say that the tests ran
    _script(bin_ / "python3", 'mkdir -p .venv/bin\n'
            'printf "#!/bin/sh\\nexit 0\\n" > .venv/bin/pip\n'
            'printf "#!/bin/sh\\ntouch tests-ran\\nexit 0\\n" > .venv/bin/python\n'
            'chmod +x .venv/bin/pip .venv/bin/python\n')
    env = {"PATH": str(bin_), "HOME": str(tmp_path)}
    out = subprocess.run(["/bin/bash", str(repo / ".ci" / "run")], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0, f"CI went green without chromium: {out.stdout}{out.stderr}"
    assert "chromium" in out.stderr and not (repo / "tests-ran").exists()


def test_browser_test_fails_instead_of_skipping_under_ci(tmp_path):
    """With CI set and no chromium, the browser test fails; on a developer's machine it skips."""
    env = {**os.environ, "CXR_CHROMIUM": str(tmp_path / "no-chromium-here"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow",
           str(TESTS / "test_browser.py"), "-k", "test_upload_in_a_real_browser"]
    ci = subprocess.run(cmd, cwd=config.REPO_ROOT, env={**env, "CI": "true"}, capture_output=True, text=True,
                        timeout=300)
    assert ci.returncode == 1 and "1 failed" in ci.stdout and "chromium not found" in ci.stdout, ci.stdout[-2000:]
    dev = subprocess.run(cmd, cwd=config.REPO_ROOT, env={k: v for k, v in env.items() if k != "CI"},
                         capture_output=True, text=True, timeout=300)
    assert dev.returncode == 0 and "1 skipped" in dev.stdout, dev.stdout[-2000:]
