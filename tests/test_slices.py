"""Per-slice metrics (core.slices): a slice where the model fails is flagged, a healthy one is not."""

from __future__ import annotations

import numpy as np
import pandas as pd

from core import findings, slices


def _table(n=120, seed=0):
    rng = np.random.default_rng(seed)
    t = pd.DataFrame({"path": [f"img{i}.png" for i in range(n)],
                      "source": np.where(np.arange(n) % 2 == 0, "A", "B"),
                      "view": np.where(np.arange(n) % 3 == 0, "AP", "PA"),
                      "label": np.where(np.arange(n) % 4 < 2, "covid", "normal")})
    y = (t["label"] == "covid").to_numpy().astype(int)
    p = np.where(y == 1, rng.uniform(0.6, 1.0, n), rng.uniform(0.0, 0.4, n))
    return t, y, p


def test_a_failing_slice_is_flagged():
    t, y, p = _table()
    bad = ((t["source"] == "B") & (t["view"] == "AP")).to_numpy()
    p = np.where(bad, 1 - p, p)  # the model is wrong on every AP film of source B
    res = slices.slice_metrics(t, y, p, t["path"], threshold=0.5, n_boot=200)
    by = {s["name"]: s for s in res["slices"]}
    s = by["source=B & view=AP"]
    assert s["n"] == 20 and set(s["flags"]) == {"roc_auc", "sensitivity", "specificity"}
    assert s["metrics"]["sensitivity"]["value"] == 0.0 and s["rest"]["sensitivity"] > 0.9
    assert len(s["paths"]) == 20
    assert not by["source=A"]["flags"] and not by["view=PA"]["flags"]
    assert "source=B & view=AP" in res["flagged"] and res["columns"] == ["source", "view", "label"]


def test_small_or_healthy_slices_are_not_flagged():
    t, y, p = _table()
    res = slices.slice_metrics(t, y, p, t["path"], 0.5, n_boot=100)
    assert res["flagged"] == []
    names = [s["name"] for s in res["slices"]]
    assert len(names) == len(set(names))
    # Same images as a simpler slice are listed once: "label=covid" and e.g. 4-column cells differ.
    t2, y2, p2 = _table(n=16)
    p2[:] = 1 - p2  # all wrong, but each slice is too small to flag
    assert all(not s["flags"] or s["n"] >= slices.MIN_N
               for s in slices.slice_metrics(t2, y2, p2, t2["path"], 0.5, n_boot=50)["slices"])


def test_a_sub_slice_repeating_a_flagged_slice_gets_no_card_of_its_own():
    t, y, p = _table()
    bad = (t["source"] == "B").to_numpy()
    p = np.where(bad & (y == 0), 0.9, p)  # every negative of source B is called COVID-19
    res = slices.slice_metrics(t, y, p, t["path"], 0.5, n_boot=100)
    flagged = {s["name"] for s in res["slices"] if "specificity" in s["flags"]}
    assert {"source=B", "source=B & view=PA"} <= flagged
    cards = [c for c in findings.findings({"slices": res}) if c["kind"] == "slice" and c["id"].endswith("specificity")]
    assert [c["id"] for c in cards] == ["slice:source=B:specificity"]
    assert cards[0]["severity"] == "high" and set(cards[0]["paths"]) == set(t["path"][bad & (y == 0)])
