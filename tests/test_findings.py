"""Findings as cards and two runs side by side (core.findings), from hand-made summaries."""

from __future__ import annotations

import numpy as np

from core import findings


def _ci(v, lo, hi):
    return {"value": v, "ci_low": lo, "ci_high": hi}


def _summary(blanked: float, within: float | None) -> dict:
    s = {"explained_class": "covid", "methods": {"gradcam": {"title": "Grad-CAM", "groups": {}, "sanity": None}},
         "probes": {"auc": {"original": _ci(0.9, 0.85, 0.95), "lungs_blanked": _ci(blanked, blanked - 0.1, blanked + 0.05),
                            "lungs_only": _ci(0.8, 0.7, 0.9)}}}
    if within is not None:
        s["source_probe"] = {"model": {"label:normal": {"n": 60, "sources": {"kermany": 24, "nih": 36},
                                                        "auc": _ci(within, within - 0.05, min(1, within + 0.03)),
                                                        "above_chance": True}},
                             "random": {"label:normal": {"auc": _ci(0.7, 0.6, 0.8)}}}
    return s


def test_cards_are_ranked_and_worded_with_their_numbers():
    cards = findings.findings(_summary(0.85, 0.97))
    assert [c["severity"] for c in cards] == ["high", "high"]
    claims = " ".join(c["claim"] for c in cards)
    assert "0.85 [0.75, 0.90]" in claims and "kermany / nih" in claims and "0.70" in claims
    low = findings.findings(_summary(0.55, None))
    assert [c["severity"] for c in low] == ["ok"] and "separates" in low[0]["claim"]


def test_comparison_tells_a_removed_shortcut_from_a_moved_one():
    before, after = _summary(0.85, None), _summary(0.55, 0.97)
    cards = findings.compare_findings(findings.findings(before), findings.findings(after), ("before", "after"))
    change = dict(zip(cards["id"], cards["change"], strict=True))
    assert change["probe:lungs_blanked"] == "better"  # the lungs-blanked shortcut is gone ...
    assert change["source_probe:label:normal"] == "new"  # ... but the features now encode the source
    figs = findings.compare(findings.figures(before), findings.figures(after), ("before", "after"))
    row = figs[figs["key"] == "probe:lungs_blanked"].iloc[0]
    assert np.isclose(row["difference"], -0.30) and row["before"].startswith("0.85")
    assert figs[figs["key"] == "source:model:label:normal:auc"]["before"].iloc[0] == "-"
