"""Findings as cards and two runs side by side (core.findings), from hand-made summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd

from core import findings, heat


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


def _marked_table(n: int = 40, marked: float = 0.5, seed: int = 0) -> pd.DataFrame:
    """audit.csv rows of one method: Grad-CAM maps (32x32) centred on the lungs, and on a ``marked`` share of
    the films a hot spot on a letter in the top-left corner (a burned-in marker's place)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    rows = []
    for i in range(n):
        h = np.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / (2 * 6.0 ** 2)) + 0.05 * rng.random((32, 32))
        if i < marked * n:
            h[:3, :3] += 60.0
        share = heat.heat_share(h, np.zeros((32, 32), bool))
        rows.append({"path": f"f{i}.png", "method": "gradcam", "border_share": share["border_share"],
                     **heat.corner_share(h)})
    return pd.DataFrame(rows)


def test_corner_share_names_the_corner_and_its_area():
    h = np.zeros((40, 40))
    h[32:, 36:] = 1.0  # all the heat in the bottom-right square (8 x 8 = 4% of the map)
    got = heat.corner_share(h)
    assert got["corner"] == "bottom-right" and got["corner_share"] == 1.0 and got["corner_area"] == 0.04
    flat = heat.corner_share(np.zeros((40, 40)))  # a blank map counts as uniform
    assert flat["corner_share"] == 0.04


def test_heat_on_a_corner_marker_is_a_high_finding_and_lung_heat_is_not():
    s = {"methods": {"gradcam": {"title": "Grad-CAM", "groups": {}, "sanity": None}}, "settings": {"border": 0.1}}
    marked = {c["kind"]: c for c in findings.findings(s, _marked_table(marked=0.5))}
    corner = marked["corner_heat"]
    assert corner["severity"] == "high" and corner["n_paths"] == 20
    assert "20 of 40 films (50%)" in corner["claim"] and "top-left one on 20" in corner["claim"]
    assert corner["claim"].count("4%") == 1 and set(corner["paths"]) == {f"f{i}.png" for i in range(20)}
    assert marked["border_heat"]["severity"] == "ok"  # half the films on the marker: the band's mean stays low ...
    border = {c["kind"]: c for c in findings.findings(s, _marked_table(marked=1.0))}["border_heat"]
    assert border["severity"] == "high" and "covers 36% of the film" in border["claim"]  # ... all of them: high
    assert "on 40 of 40 films" in border["claim"] and border["n_paths"] == 40
    clean = {c["kind"]: c for c in findings.findings(s, _marked_table(marked=0.0))}
    assert clean["corner_heat"]["severity"] == "ok" and clean["corner_heat"]["n_paths"] == 0
    assert clean["border_heat"]["severity"] == "ok"
    few = {c["kind"]: c for c in findings.findings(s, _marked_table(marked=0.125))}
    assert few["corner_heat"]["severity"] == "medium"  # 5 of 40 films


def test_cards_need_the_per_film_columns():
    s = {"methods": {"gradcam": {"title": "Grad-CAM", "groups": {}, "sanity": None}}}
    t = _marked_table().drop(columns=["corner_share", "corner", "corner_area"])
    kinds = [c["kind"] for c in findings.findings(s, t)]
    assert kinds == ["border_heat"]  # no corner card without corner_share, border band from its default 10%


def test_corner_heat_of_one_method_alone_is_not_high():
    """Grad-CAM++ alone on the corner (it favours bright edges, e.g. a marker the model ignores) is medium,
    with the reason; two methods agreeing stay high (the planted-marker benchmark's case)."""
    s = {"methods": {"gradcam": {"title": "Grad-CAM", "groups": {}, "sanity": None},
                     "gradcam_pp": {"title": "Grad-CAM++", "groups": {}, "sanity": None}},
         "settings": {"border": 0.1}}
    lone = pd.concat([_marked_table(marked=0.5).assign(method="gradcam_pp"), _marked_table(marked=0.0)])
    cards = {c["id"]: c for c in findings.findings(s, lone)}
    assert cards["corner_heat:gradcam_pp"]["severity"] == "medium"
    assert "The other methods audited (Grad-CAM) do not" in cards["corner_heat:gradcam_pp"]["claim"]
    both = pd.concat([_marked_table(marked=0.5).assign(method="gradcam_pp"), _marked_table(marked=0.5)])
    cards = {c["id"]: c for c in findings.findings(s, both)}
    assert cards["corner_heat:gradcam_pp"]["severity"] == "high" and cards["corner_heat:gradcam"]["severity"] == "high"
