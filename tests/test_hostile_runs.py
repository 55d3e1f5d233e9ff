"""Hostile and careless inputs, part two (issue 22, items 4-8 and 10): the CLIs withhold the answer
where the dashboard does, broken sibling runs never break another run's page, text from run files
is shown as plain text, a resume says what it keeps, a full disk is one sentence, and the
dashboard listens on localhost only.
"""

from __future__ import annotations

import errno
import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

from core import checks, runs

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ 10: the dashboard on localhost
def test_dashboard_listens_on_localhost_only():
    cfg = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text(encoding="utf-8"))
    assert cfg["server"]["address"] == "localhost"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert 'server.address = "localhost"' in readme and "reverse proxy" in readme and "signs people in" in readme


# ------------------------------------------------------------------ 8: a full disk while training
def test_disk_full_during_training_is_one_sentence(cxr_root, tmp_path, monkeypatch, capsys):
    """The second checkpoint's state.json hits ENOSPC: exit 2, one sentence naming the run folder,
    the free and needed space and ``--resume``; no traceback."""
    from core import train

    real, seen = runs._atomic_write, []

    def full_disk(path, write):
        if Path(path).name == "state.json":
            seen.append(path)
            if len(seen) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(runs, "_atomic_write", full_disk)
    rc = train.main(["--data", str(cxr_root), "--runs", str(tmp_path), "--size", "64", "--limit", "3",
                     "--epochs", "2", "--batch-size", "16", "--folds", "2", "--members", "1", "--name", "full",
                     "--quiet", "--no-evaluate", "--no-cache"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    run = next(tmp_path.glob("*-full"))
    last = err[-1]
    assert last.startswith("error: The disk holding ") and str(run) in last, last
    assert re.search(r"\d+ MB free, about \d+ MB needed", last) and f"--resume {run}" in last, last
    assert last.count(". ") == 0 and last.endswith("."), last
