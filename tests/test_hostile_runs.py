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


# ------------------------------------------------------------------ 6: text from run files is plain text
HOSTILE_TEXT = ["![x](http://host/x.png)", "[link](http://evil.example/)", ":red[alarm] <b>bold</b>"]


def _rendered(body: str) -> str:
    """What a browser gets from Streamlit's Markdown body (CommonMark; Streamlit adds GFM on top)."""
    import markdown_it

    return markdown_it.MarkdownIt("commonmark").render(body)


@pytest.mark.parametrize("text", HOSTILE_TEXT + ["- a list? 1. no", "# not a heading", "a_b*c*"])
def test_plain_text_renders_literally(text):
    from dashboard.components import plain

    html = _rendered(plain(text))
    assert "<a " not in html and "<img" not in html and "<b>" not in html and "<li>" not in html
    assert "<h1>" not in html and "<em>" not in html
    import html as html_lib

    assert html_lib.unescape(re.sub(r"</?p>", "", html)).strip() == text


def _hostile_copy(tmp_path, monkeypatch, cxr_root) -> Path:
    """A copy of the shipped run whose test rows' ``source`` hold Markdown links and images."""
    import shutil

    import pandas as pd

    from core import config

    run = tmp_path / "runs" / "20990101-000000-hostile"
    shutil.copytree(config.DEFAULT_RUN, run, ignore=shutil.ignore_patterns("audit_maps"))
    pred = pd.read_csv(run / "predictions.csv", dtype={"patient_id": str})
    test = pred.index[pred["split"] == "test"]
    pred.loc[test, "source"] = [HOSTILE_TEXT[i % len(HOSTILE_TEXT)] for i in range(len(test))]
    pred.to_csv(run / "predictions.csv", index=False)
    monkeypatch.setenv("CXR_DATA_DIR", str(cxr_root))
    monkeypatch.setenv("CXR_RUNS_DIR", str(run.parent))
    return run


def _markdown_bodies(at) -> list[str]:
    out = [c for el in at.image for c in el.captions if c]
    for kind in ("markdown", "caption", "info", "warning", "error", "success"):
        out += [str(e.value) for e in getattr(at, kind)]
    return out


@pytest.mark.parametrize("page", ["errors", "explain"])
def test_run_file_text_is_shown_as_plain_text(page, tmp_path, monkeypatch, cxr_root):
    """Misclassified (gallery and case caption) and Explain's pick caption show the ``source`` literally:
    no link, no image fetched."""
    from streamlit.testing.v1 import AppTest

    run = _hostile_copy(tmp_path, monkeypatch, cxr_root)
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=180)
    at.session_state["run"] = str(run)
    at.run()
    at.switch_page(f"views/{page}.py").run()
    if page == "explain":
        at.radio(key="explain_source").set_value("Pick from the test split").run()
    assert not at.exception, [e.value for e in at.exception]
    bodies = _markdown_bodies(at)
    shown = " ".join(_rendered(b) for b in bodies)
    assert "<a " not in shown and "<img" not in shown and "<b>" not in shown
    import html as html_lib

    assert any(t in html_lib.unescape(shown) for t in HOSTILE_TEXT), bodies[:8]
