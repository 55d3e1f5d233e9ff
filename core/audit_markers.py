"""The audit's step on burned-in text and markers: how much of each method's heat sits on them, per collection.

:func:`markers_step` finds the markers of every audited film (:func:`core.markers.detect`, on the film
as decoded, then mapped onto the network's view of it with the film's crop box), and measures per
film and method the share of the map's heat on them (:func:`core.heat.heat_share` with the marker
mask in place of the lungs) against their share of the view (what a uniform map would put there).
Per collection (``source``) it keeps, over the films that carry a marker: the mean heat share, the
mean area share, their ratio, and the films with the most heat on markers. ``python -m core.audit``
stores the result under ``markers`` in ``audit.json``; :mod:`core.findings` turns it into
``marker_heat`` cards.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from core import images, markers, safepath
from core.heat import heat_share

TOP_PATHS = 12  # films with the most heat on markers kept per method and collection
# the marker_heat card (core.findings): heat share on markers / their area share, in the worst collection
CARD_RULE = ("in the collection where it is largest (>= 5 marked films), heat share on markers / their area share "
             ">= 3 with >= 10% of the heat: high; >= 2: medium; >= 1.5: low; else ok")
MARKER_RATIO = {"high": 3.0, "medium": 2.0, "low": 1.5}
MARKER_SHARE_HIGH = 0.10  # a high card needs this much of the heat on the markers, not only a large ratio
MARKER_MIN_FILMS = 5  # marked films a collection needs before its ratio is read


def marker_masks(paths, root: Path, boxes: np.ndarray, size: int, progress: bool = True) -> np.ndarray:
    """Marker masks (n, size, size) bool on the network's view of each film (``boxes``: the view of each film)."""
    out = np.zeros((len(paths), size, size), bool)
    for i, p in enumerate(tqdm(list(paths), desc="markers", disable=not progress, file=sys.stderr)):
        try:
            film = images.decode(safepath.read_film(root, p), p)
        except images.ImageError:  # it loaded for the audit a moment ago; a film changed since counts as clean
            continue
        out[i] = markers.on_grid(markers.detect(film)[0], boxes[i], size)
    return out


def _group(paths: np.ndarray, share: np.ndarray, area: np.ndarray, marked: np.ndarray) -> dict:
    """Heat and area shares on markers over the marked films of one group, and its films with the most heat there."""
    d = {"n": int(len(share)), "n_marked": int(marked.sum())}
    if not marked.any():
        return d
    s, a = float(share[marked].mean()), float(area[marked].mean())
    order = np.argsort(-share[marked], kind="stable")[:TOP_PATHS]
    return {**d, "heat_share": s, "area_share": a, "ratio": s / a if a > 0 else float("nan"),
            "paths": paths[marked][order].tolist()}


def markers_step(test: pd.DataFrame, root: Path, boxes: np.ndarray, maps: dict, progress: bool = True) -> dict:
    """The ``markers`` block of audit.json (module docstring); ``maps``: method -> (n, size, size) heatmaps."""
    if not maps:  # nothing explained: no heat to place
        return {"detector": "core.markers", "n_films": int(len(test)), "methods": {}}
    size = next(iter(maps.values())).shape[-1]
    mask = marker_masks(test["path"].astype(str), root, np.asarray(boxes), size, progress)
    marked = mask.reshape(len(mask), -1).any(axis=1)
    src = test["source"].astype(str).to_numpy()
    paths = test["path"].astype(str).to_numpy()
    sources = sorted(set(src))
    out = {"detector": "core.markers", "params": dict(markers.PARAMS), "n_films": int(len(test)),
           "n_marked": int(marked.sum()),
           "by_source": {s: {"n": int((src == s).sum()), "n_marked": int(marked[src == s].sum())}
                         for s in sources},
           "methods": {}}
    for method, heat in maps.items():
        t = [heat_share(heat[i], mask[i]) if marked[i] else None for i in range(len(test))]
        share = np.array([r["in_lung_share"] if r else 0.0 for r in t])
        area = np.array([r["lung_area_share"] if r else 0.0 for r in t])
        groups = {"all": _group(paths, share, area, marked)}
        for s in sources:
            groups[f"source:{s}"] = _group(paths[src == s], share[src == s], area[src == s], marked[src == s])
        out["methods"][method] = groups
    return out


def _marker_card(name: str, title: str, groups: dict) -> dict | None:
    """One method's card: the collection whose marked films put the most heat (against area) on their markers."""
    ok = {k.split(":", 1)[1]: g for k, g in groups.items() if k.startswith("source:")
          and g.get("n_marked", 0) >= MARKER_MIN_FILMS and math.isfinite(g.get("ratio", float("nan")))}
    if not ok:
        return None
    src, g = max(ok.items(), key=lambda kv: kv[1]["ratio"])
    sev = next((k for k, v in MARKER_RATIO.items() if g["ratio"] >= v), "ok")
    if sev == "high" and g["heat_share"] < MARKER_SHARE_HIGH:
        sev = "medium"
    others = ", ".join(f"{k} {v['ratio']:.1f}x" for k, v in sorted(ok.items()) if k != src)
    claim = (f"On the {src} films that carry burned-in text or markers ({g['n_marked']} of {g['n']}), {title} puts "
             f"{g['heat_share']:.0%} of its heat on them, which cover {g['area_share']:.1%} of the view: "
             f"{g['ratio']:.1f} times a uniform map" + (f" (other collections: {others})." if others else "."))
    paths = list(g.get("paths", []))
    return {"id": f"marker_heat:{name}", "kind": "marker_heat", "severity": sev, "claim": claim, "paths": paths,
            "n_paths": len(paths), "paths_note": f"{src} films whose map puts the most heat on their markers",
            "method": name, "strength": float(g["ratio"])}


def marker_cards(summary: dict) -> list[dict]:
    """``marker_heat`` cards (core.findings' format), one per method, from audit.json's ``markers``; core.findings
    keeps one high only when another method agrees."""
    per = (summary.get("markers") or {}).get("methods") or {}
    titles = {k: v.get("title", k) for k, v in (summary.get("methods") or {}).items()}
    cards = [_marker_card(name, titles.get(name, name), groups) for name, groups in per.items()]
    return [c for c in cards if c]
