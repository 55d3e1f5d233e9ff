"""The audit's findings as cards, its figures as one table, and two runs side by side.

:func:`findings` turns an audit summary (``audit.json``) and its per-image table (``audit.csv``)
into a list of cards, ranked by severity: each holds ``id`` (stable across runs, so two runs'
cards can be matched), ``kind``, ``severity`` (``high`` > ``medium`` > ``low`` > ``ok``), a
one-sentence ``claim`` with its number and CI, ``paths`` (the test images behind it, relative
to the data root, at most :data:`MAX_PATHS`, the clearest first), ``n_paths`` (how many there
are in all), ``paths_note`` (what those images are) and ``method`` (whose heatmaps to show
beside them). The severity rules are in :data:`RULES`. Two cards read where the heat lies per film
(``audit.csv``): ``border_heat`` (the border band's share against its area) and ``corner_heat`` (films
whose heat piles up in one corner square, :func:`core.heat.corner_share`, where a burned-in marker sits; needs the
``corner_share``/``corner``/``corner_area`` columns in the table).

:func:`figures` flattens every figure of a summary into one table (``key``, ``section``,
``figure``, ``value``, ``ci_low``, ``ci_high``, ``text``); :func:`compare` joins two such tables
with the difference, and :func:`compare_findings` matches two runs' cards, so a change can be
read as "removed the shortcut" or "only moved it". :func:`compare_runs` does both from two run
folders. :func:`update_markdown` writes the findings and key figures into a generated block of
a Markdown file (``assets/AUDIT.md``). :func:`case_images` draws the images behind a card with
their heatmaps (for the dashboard).
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import pandas as pd

from core import metrics, runs, safepath
from core.audit_markers import CARD_RULE, marker_cards

SEVERITIES = ("high", "medium", "low", "ok")
MAX_PATHS = 48
MAX_SLICE_CARDS = 8
RULES = {
    "probe": "lungs-blanked AUC >= 0.8: high; >= 0.65: medium; else ok",
    "probe_within": "within a source, lungs-only AUC whose CI reaches 0.5: medium; else ok",
    "source_probe": "within a label, source-probe AUC CI low > 0.8: high; > 0.6: medium; above 0.5: low; else ok",
    "source_probe_all": "over all images (label and source confounded): low when above chance, else ok",
    "road": "ROAD of a method not above the random-map baseline (CI of the difference reaches 0): medium; else ok",
    "road_lungs": "ROAD of the lung map below 0 (CI): high; not above the random map: medium; else ok",
    "pointing": "hit rate (expert boxes; lung masks) below the random map's (CI): medium; not above it: low; else ok",
    "sanity": "randomisation check failed: medium; else ok",
    "slice": "flagged slice (see the slices rule): high when the gap is >= 0.3, else medium",
    "fell_back": "films on which no lungs were found (lung-crop runs): low",
    "border_heat": "mean heat in the border band / the band's area >= 1.4 (half the heat in 36% of the film): high; >= 1.25: medium; else ok",
    "corner_heat": "films with >= 25% of the heat in one corner square (4% of the film): >= 20% of the films: "
                   "high; >= 10%: medium; >= 5%: low; else ok",
}
# Where burned-in markers and text sit: the border band (core.heat.heat_share's, 10% of each side) and
# the four corner squares (core.heat.CORNER_SIDE of each side). Ratios are against a uniform map's share.
BORDER_RATIO = {"high": 1.4, "medium": 1.25}  # high: about half the heat in the band; medium: the trust panel's red line
CORNER_FILM = 0.25  # a film "puts its heat in a corner" from this share on (about 6x a uniform map)
CORNER_FILMS = {"high": 0.2, "medium": 0.1, "low": 0.05}
RULES["marker_heat"] = CARD_RULE  # heat on burned-in text and markers per collection (core.audit_markers)


# --------------------------------------------------------------------------- formatting
def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pct(d) -> str:
    """:func:`core.metrics.fmt` of a share, in per cent: ``81% [69, 94]``."""
    if not isinstance(d, dict) or not _finite(d.get("value")):
        return metrics.fmt(d)
    scaled = {k: 100 * v for k, v in d.items() if k in ("value", "ci_low", "ci_high") and _finite(v)}
    text = metrics.fmt(scaled, digits=0)
    return text.replace(" [", "% [", 1) if " [" in text else text + "%"


def _v(d) -> float:
    return float(d["value"]) if isinstance(d, dict) and _finite(d.get("value")) else float("nan")


def _lo(d) -> float:
    return float(d["ci_low"]) if isinstance(d, dict) and _finite(d.get("ci_low")) else float("nan")


def _hi(d) -> float:
    return float(d["ci_high"]) if isinstance(d, dict) and _finite(d.get("ci_high")) else float("nan")


def _card(id_, kind, severity, claim, paths=(), note="", method=None, strength=0.0) -> dict:
    paths = list(paths)
    return {"id": id_, "kind": kind, "severity": severity, "claim": claim, "paths": paths[:MAX_PATHS],
            "n_paths": len(paths), "paths_note": note, "method": method,
            "strength": float(strength) if _finite(strength) else 0.0}


def _rows(table: pd.DataFrame | None, method: str | None) -> pd.DataFrame:
    """One row per image (the rows of ``method``, else of the first method)."""
    if table is None or table.empty:
        return pd.DataFrame(columns=["path"])
    m = method if method in set(table["method"]) else table["method"].iloc[0]
    return table[table["method"] == m]


# --------------------------------------------------------------------------- cards
def _probe_cards(s: dict, rows: pd.DataFrame, method) -> list[dict]:
    pr = s.get("probes") or {}
    auc = pr.get("auc") or {}
    out = []
    b = auc.get("lungs_blanked")
    if _finite(_v(b)):
        sev = "high" if _v(b) >= 0.8 else ("medium" if _v(b) >= 0.65 else "ok")
        verb = "still separates" if sev != "ok" else "separates"
        paths = []
        if "p_covid_lungs_blanked" in rows:
            pos = rows[rows["class"] == s.get("explained_class", "covid")].sort_values("p_covid_lungs_blanked",
                                                                                       ascending=False)
            paths = pos[pos["p_covid_lungs_blanked"] >= 0.5]["path"].tolist()
        out.append(_card("probe:lungs_blanked", "probe", sev,
                         f"With the lungs blanked, the model {verb} COVID-19 from the rest with ROC AUC {metrics.fmt(b)}, "
                         f"against {metrics.fmt(auc.get('original'))} on the intact images.",
                         paths, "COVID-19 films still called COVID-19 (p >= 0.5) with the lungs blanked", method,
                         _v(b)))
    for src, w in (pr.get("within_source") or {}).items():
        only = w.get("lungs_only")
        if not _finite(_v(only)):
            continue
        sev = "medium" if not _lo(only) > 0.5 else "ok"
        sub = rows[rows["source"] == src] if "source" in rows else rows
        out.append(_card(f"probe:within:{src}", "probe_within", sev,
                         f"Within {src} ({w.get('n')} images, both classes), the lungs alone separate COVID-19 from "
                         f"the rest with ROC AUC {metrics.fmt(only)} (intact images: {metrics.fmt(w.get('original'))}).",
                         sub["path"].tolist(), f"the {src} test films", method, 1 - _v(only)))
    return out


def _source_cards(s: dict, rows: pd.DataFrame, method) -> list[dict]:
    sp = s.get("source_probe") or {}
    model, rand = sp.get("model") or {}, sp.get("random") or {}
    out = []
    for key, r in model.items():
        if "auc" not in r:
            continue
        auc, floor = r["auc"], (rand.get(key) or {}).get("auc")
        names = " / ".join(r.get("sources", {}))
        lo = _lo(auc)
        if key == "all":
            sev = "low" if r.get("above_chance") else "ok"
            where = f"Over all {r['n']} images"
        else:
            sev = "high" if lo > 0.8 else ("medium" if lo > 0.6 else ("low" if r.get("above_chance") else "ok"))
            where = f"Within the {key.split(':', 1)[1]} films ({r['n']} images)"
        claim = (f"{where}, a linear probe on the model's features tells {names} apart with AUC {metrics.fmt(auc)} "
                 f"(chance 0.50; a random-weights network of the same architecture: {metrics.fmt(floor)}).")
        col = "source_p_all" if key == "all" else "source_p_label"
        paths = []
        if col in rows:
            sub = rows if key == "all" else rows[rows["label"].astype(str) == key.split(":", 1)[1]]
            paths = sub.sort_values(col, ascending=False)["path"].tolist()
        out.append(_card(f"source_probe:{key}", "source_probe_all" if key == "all" else "source_probe", sev, claim,
                         paths, "the films whose source the probe names most confidently", method, _v(auc)))
    return out


def _road_cards(s: dict, table: pd.DataFrame | None) -> list[dict]:
    rd = (s.get("road") or {}).get("maps") or {}
    rand = ((rd.get("random") or {}).get("combined") or {}).get("all")
    titles = {k: v.get("title", k) for k, v in (s.get("methods") or {}).items()}
    out = []
    for name, d in rd.items():
        if name == "random":
            continue
        comb, diff = (d.get("combined") or {}).get("all"), d.get("vs_random")
        if name == "lungs":
            sev = "high" if _hi(comb) < 0 else ("medium" if not _lo(diff) > 0 else "ok")
            verb = "more" if _v(comb) > 0 else "less"
            claim = (f"Removing the lungs first (filled by noisy linear imputation) moves P(COVID-19) {verb} than "
                     f"removing the rest first: ROAD of the lung map {metrics.fmt(comb)}, random map {metrics.fmt(rand)}.")
            paths = []
            if table is not None and "road_combined_lungs" in table:
                r = _rows(table, None).sort_values("road_combined_lungs")
                paths = r[r["road_combined_lungs"] < 0]["path"].tolist()
            claim += _road_sample(s)
            out.append(_card("road:lungs", "road_lungs", sev, claim, paths,
                             "films on which removing the lungs moves the score less than removing the rest",
                             None, -_v(comb)))
            continue
        sev = "medium" if not _lo(diff) > 0 else "ok"
        better = "more" if _lo(diff) > 0 else ("less" if _hi(diff) < 0 else "no more")
        claim = (f"{titles.get(name, name)} maps are {better} faithful than random maps by ROAD: "
                 f"{metrics.fmt(comb)} against {metrics.fmt(rand)} (difference {metrics.fmt(diff)}; higher = more faithful).")
        claim += _road_sample(s)
        paths = []
        if table is not None and "road_combined" in table:
            paths = _rows(table, name).dropna(subset=["road_combined"]).sort_values("road_combined")["path"].tolist()
        out.append(_card(f"road:{name}", "road", sev, claim, paths, "the films on which its maps score lowest by ROAD",
                         name, -_v(diff)))
    return out


def _road_sample(s: dict) -> str:
    """' (ROAD scored n of N films: ...)' when the audit scored ROAD on a sample of the films, else ''."""
    rd = s.get("road") or {}
    n, n_of = rd.get("n"), rd.get("n_of")
    return f" (ROAD scored a class-stratified sample of {n} of the {n_of} films.)" if n and n_of and n < n_of else ""


def _pointing_cards(s: dict, table: pd.DataFrame | None) -> list[dict]:
    pg = s.get("pointing_game") or {}
    titles = {k: v.get("title", k) for k, v in (s.get("methods") or {}).items()}
    out = []
    for region, what, note in (("boxes", "the expert lung boxes", "annotated films"),
                               ("lungs", "the lung fields (lung-net masks)", "films")):
        block = pg.get(region) or {}
        ms = block.get("methods") or {}
        rand = (ms.get("random") or {}).get("hit")
        for name, d in ms.items():
            if name == "random" or not _finite(_v(d.get("hit"))):
                continue
            hit, r = d["hit"], _v(rand)
            sev = "medium" if _hi(hit) < r else ("low" if not _lo(hit) > r else "ok")
            claim = (f"{titles.get(name, name)}'s peak falls inside {what} on {pct(hit)} of "
                     f"{block.get('n')} {note}; a random map's does on {pct(rand)} "
                     f"(the region covers {d.get('area', float('nan')):.0%} of the view).")
            paths = []
            if table is not None and f"{region}_hit" in table:
                rows = _rows(table, name)
                paths = rows[rows[f"{region}_hit"] < 0.5]["path"].tolist()
            out.append(_card(f"pointing:{region}:{name}", "pointing", sev, claim, paths,
                             f"{note} whose peak lies outside {what}", name, r - _v(hit)))
    return out


def _sanity_cards(s: dict) -> list[dict]:
    out = []
    for name, info in (s.get("methods") or {}).items():
        sc = info.get("sanity")
        if not sc:
            continue
        ok = bool(sc.get("passes"))
        claim = (f"{info.get('title', name)} maps {'change' if ok else 'barely change'} when the learned weights are "
                 f"re-initialised (mean Spearman {sc['spearman_mean']:.2f} over {sc['n']} images; passes below "
                 f"{sc['threshold']})" + ("." if ok else ": they show image structure, not what the model learned."))
        out.append(_card(f"sanity:{name}", "sanity", "ok" if ok else "medium", claim, sc.get("paths", []),
                         "the films of the randomisation check", name, sc["spearman_mean"]))
    return out


def _band_area(border: float) -> float:
    return 1.0 - (1.0 - 2.0 * border) ** 2


def _border_card(s: dict, rows: pd.DataFrame, name: str, title: str) -> dict:
    """Heat in the border band (where text, markers and the film's edge sit) against the band's area."""
    area = _band_area(float((s.get("settings") or {}).get("border", 0.1)))
    share = rows["border_share"].astype(float)
    mean, ratio = float(share.mean()), float(share.mean()) / area
    sev = next((k for k, v in BORDER_RATIO.items() if ratio >= v), "ok")
    over = share / area > BORDER_RATIO["medium"]
    claim = (f"{title} puts {mean:.0%} of its heat in the border band (10% of each side, where text and markers "
             f"sit), which covers {area:.0%} of the film: {ratio:.2f} times a uniform map; on {int(over.sum())} of "
             f"{len(share)} films more than {BORDER_RATIO['medium']:.2f} times.")
    paths = rows.assign(_s=share).sort_values("_s", ascending=False)[over.to_numpy()]["path"].tolist()
    return _card(f"border_heat:{name}", "border_heat", sev, claim, paths,
                 "films whose map favours the border band most", name, ratio)


def _corner_card(rows: pd.DataFrame, name: str, title: str) -> dict:
    """Films whose heat piles up in one corner square (a burned-in marker's place) against the square's area."""
    share = rows["corner_share"].astype(float)
    area = float(rows["corner_area"].astype(float).mean())
    hot = (share >= CORNER_FILM).to_numpy()
    frac = float(hot.mean()) if len(hot) else 0.0
    sev = next((k for k, v in CORNER_FILMS.items() if frac >= v), "ok")
    corners = rows.loc[hot, "corner"].value_counts() if "corner" in rows else pd.Series(dtype=int)
    where = f" (the {corners.index[0]} one on {int(corners.iloc[0])})" if len(corners) else ""
    claim = (f"On {int(hot.sum())} of {len(share)} films ({frac:.0%}), {title} puts at least {CORNER_FILM:.0%} of "
             f"its heat in one corner square{where} that covers {area:.0%} of the film, where burned-in markers "
             f"and text sit (mean over all films: {float(share.mean()):.0%} in the hottest corner).")
    paths = rows.assign(_s=share).sort_values("_s", ascending=False)[lambda d: d["_s"] >= CORNER_FILM]["path"]
    return _card(f"corner_heat:{name}", "corner_heat", sev, claim, paths.tolist(),
                 "films whose map puts the most heat in one corner", name, frac)


def _place_cards(s: dict, table: pd.DataFrame | None) -> list[dict]:
    """Cards on heat in the border band and in the corners, per method (needs audit.csv's per-image rows)."""
    if table is None or table.empty or "method" not in table:
        return []
    titles = {k: v.get("title", k) for k, v in (s.get("methods") or {}).items()}
    out = []
    for name in table["method"].unique():
        rows = table[table["method"] == name]
        if "border_share" in rows and rows["border_share"].notna().any():
            out.append(_border_card(s, rows[rows["border_share"].notna()], name, titles.get(name, name)))
        if "corner_share" in rows and rows["corner_share"].notna().any():
            out.append(_corner_card(rows[rows["corner_share"].notna()], name, titles.get(name, name)))
    return _agreed(out, titles)


def _agreed(cards: list[dict], titles: dict) -> list[dict]:
    """A place card stays high only when another method agrees: where two or more methods were audited and
    one alone puts its heat on the border or a corner, that is as likely how the method draws (Grad-CAM++
    favours bright edges, such as a marker the model ignores) as what the model reads, so it is medium."""
    for kind in ("border_heat", "corner_heat", "marker_heat"):
        of_kind = [c for c in cards if c["kind"] == kind]
        high = [c for c in of_kind if c["severity"] == "high"]
        if len(of_kind) >= 2 and len(high) == 1:
            lone = high[0]
            lone["severity"] = "medium"
            others = ", ".join(titles.get(c["method"], c["method"]) for c in of_kind if c is not lone)
            lone["claim"] += (f" The other methods audited ({others}) do not, so it may be how this method draws "
                              f"rather than what the model reads.")
    return cards


def _slice_cards(s: dict, method) -> list[dict]:
    """Cards of flagged slices. The simplest slices come first, and among them the one with the most
    errors of the flagged kind (false positives for specificity, false negatives for sensitivity);
    a slice whose such errors are mostly (>= 80%) those of a card already kept for the same
    metric adds nothing and is left out (a sub-slice of ``source=ieee8023`` repeats it)."""
    sl = s.get("slices") or {}
    names = {"roc_auc": "ROC AUC", "sensitivity": "Sensitivity", "specificity": "Specificity"}
    errors = {"specificity": ("false_positives",), "sensitivity": ("false_negatives",),
              "roc_auc": ("false_positives", "false_negatives")}
    cand = []
    for sc in sl.get("slices", []):
        for m in sc.get("flags", []):
            wrong = [p for k in errors[m] for p in sc.get(k, [])] or list(sc.get("paths", []))
            cand.append((len(sc["columns"]), -len(wrong), sc, m, wrong))
    cand.sort(key=lambda t: (t[0], t[1]))
    kept: dict[str, list[set]] = {}
    cards = []
    for _, _, sc, m, wrong in cand:
        ws = set(wrong)
        if any(ws and len(ws & k) >= 0.8 * len(ws) for k in kept.get(m, [])):
            continue
        kept.setdefault(m, []).append(ws)
        v, rest = sc["metrics"][m], sc["rest"][m]
        gap = rest - _v(v)
        kind = {"specificity": "the films of this slice wrongly called COVID-19",
                "sensitivity": "the COVID-19 films of this slice that were missed"}.get(m, "its misclassified films")
        cards.append(_card(f"slice:{sc['name']}:{m}", "slice", "high" if gap >= 0.3 else "medium",
                           f"{names[m]} on {sc['name']} ({sc['n']} images) is {metrics.fmt(v)}, against {rest:.2f} "
                           f"on the other test images (threshold {sl.get('threshold', 0.5):.2f}).",
                           wrong, kind, method, gap))
    cards.sort(key=lambda c: -c["strength"])
    return cards[:MAX_SLICE_CARDS]


def findings(summary: dict, table: pd.DataFrame | None = None) -> list[dict]:
    """The audit's findings as cards (module docstring), ranked by severity, then by strength."""
    method = next(iter(summary.get("methods") or {}), None)
    rows = _rows(table, method)
    cards = (_probe_cards(summary, rows, method) + _source_cards(summary, rows, method)
             + _road_cards(summary, table) + _pointing_cards(summary, table)
             + _sanity_cards(summary) + _slice_cards(summary, method) + _place_cards(summary, table))
    cards += _agreed(marker_cards(summary), {k: v.get("title", k) for k, v in (summary.get("methods") or {}).items()})
    n_fb = summary.get("n_fell_back") or 0
    if n_fb:
        cards.append(_card("fell_back", "fell_back", "low",
                           f"On {n_fb} of {summary.get('n_images')} films no lungs were found, so the network saw "
                           "the whole film instead of its lung crop.", [], "", method, n_fb))
    cards.sort(key=lambda c: (SEVERITIES.index(c["severity"]), -c["strength"]))
    return cards


# --------------------------------------------------------------------------- figures and comparison
def _fig(rows, key, section, figure, d):
    if isinstance(d, dict):
        rows.append({"key": key, "section": section, "figure": figure, "value": _v(d), "ci_low": _lo(d),
                     "ci_high": _hi(d), "text": metrics.fmt(d)})
    elif _finite(d):
        rows.append({"key": key, "section": section, "figure": figure, "value": float(d), "ci_low": float("nan"),
                     "ci_high": float("nan"), "text": f"{d:.2f}"})


def figures(summary: dict, metrics: dict | None = None) -> pd.DataFrame:
    """Every figure of an audit summary (and of a run's ``metrics.json``) as one row each."""
    rows: list[dict] = []
    if metrics:
        _fig(rows, "metrics:roc_auc", "evaluation", "test ROC AUC (COVID-19 vs rest)", metrics.get("roc_auc"))
        for src, v in (metrics.get("within_source") or {}).items():
            _fig(rows, f"metrics:within:{src}", "evaluation", f"within-source ROC AUC, {src}", v.get("roc_auc"))
    pr = summary.get("probes") or {}
    names = {"original": "the intact images", "lungs_blanked": "the lungs blanked", "lungs_only": "only the lungs"}
    for k, v in (pr.get("auc") or {}).items():
        _fig(rows, f"probe:{k}", "lung-blanked probes", f"AUC with {names.get(k, k)}", v)
    for src, w in (pr.get("within_source") or {}).items():
        for k in names:
            _fig(rows, f"probe:within:{src}:{k}", "lung-blanked probes", f"{src}: AUC with {names[k]}", w.get(k))
    for k, v in (pr.get("flipped") or {}).items():
        if k != "original":
            _fig(rows, f"probe:flipped:{k}", "lung-blanked probes", f"decisions flipped, {names.get(k, k)}", v)
    sp = summary.get("source_probe") or {}
    for net, label in (("model", "model"), ("random", "random-weights floor")):
        for key, r in (sp.get(net) or {}).items():
            where = "all images" if key == "all" else key.replace("label:", "within ")
            _fig(rows, f"source:{net}:{key}:auc", "source probe", f"{label}: source AUC, {where}", r.get("auc"))
            _fig(rows, f"source:{net}:{key}:acc", "source probe", f"{label}: source accuracy, {where}",
                 r.get("accuracy"))
    titles = {k: v.get("title", k) for k, v in (summary.get("methods") or {}).items()}
    for name, d in ((summary.get("road") or {}).get("maps") or {}).items():
        t = titles.get(name, {"random": "random map", "lungs": "lung map"}.get(name, name))
        _fig(rows, f"road:{name}", "ROAD", f"{t}: ROAD combined", (d.get("combined") or {}).get("all"))
        _fig(rows, f"road:{name}:morf", "ROAD", f"{t}: MoRF change of P(COVID-19)", (d.get("morf_mean") or {}).get("all"))
        _fig(rows, f"road:{name}:lerf", "ROAD", f"{t}: LeRF change of P(COVID-19)", (d.get("lerf_mean") or {}).get("all"))
        if "vs_random" in d:
            _fig(rows, f"road:{name}:vs_random", "ROAD", f"{t}: ROAD minus random map", d["vs_random"])
    pg = summary.get("pointing_game") or {}
    for region, label in (("boxes", "expert lung boxes"), ("lungs", "lung masks")):
        for name, d in ((pg.get(region) or {}).get("methods") or {}).items():
            t = titles.get(name, "random map" if name == "random" else name)
            _fig(rows, f"pointing:{region}:{name}:hit", "pointing game", f"{t}: peak inside the {label}", d.get("hit"))
            _fig(rows, f"pointing:{region}:{name}:mass", "pointing game", f"{t}: heat inside the {label}",
                 d.get("mass"))
    for name, info in (summary.get("methods") or {}).items():
        g = (info.get("groups") or {}).get("all") or {}
        t = info.get("title", name)
        _fig(rows, f"trust:{name}:in_lung", "heat in the lungs", f"{t}: in-lung share of heat", g.get("in_lung_share"))
        _fig(rows, f"trust:{name}:ratio", "heat in the lungs", f"{t}: in-lung share / lung area", g.get("lung_ratio"))
        _fig(rows, f"trust:{name}:border", "heat in the lungs", f"{t}: heat in the border band", g.get("border_share"))
        for k in ("deletion_auc", "insertion_auc"):
            _fig(rows, f"trust:{name}:{k}", "heat in the lungs", f"{t}: {k.replace('_', ' ')}", g.get(k))
        sc = info.get("sanity") or {}
        _fig(rows, f"sanity:{name}", "randomisation check", f"{t}: mean Spearman, trained vs random",
             sc.get("spearman_mean"))
    mnames = {"roc_auc": "ROC AUC", "sensitivity": "sensitivity", "specificity": "specificity"}
    for sc in (summary.get("slices") or {}).get("slices", []):
        for m, v in sc["metrics"].items():
            if _finite(_v(v)):
                _fig(rows, f"slice:{sc['name']}:{m}", "slices", f"{sc['name']} (n={sc['n']}): {mnames.get(m, m)}", v)
    return pd.DataFrame(rows, columns=["key", "section", "figure", "value", "ci_low", "ci_high", "text"])


def compare(a: pd.DataFrame, b: pd.DataFrame, names=("a", "b")) -> pd.DataFrame:
    """Two :func:`figures` tables side by side: ``section, figure, <a>, <b>, difference`` (b - a) and
    the numeric values (``value_a``, ``value_b``); figures only one run has are kept (blank on the other)."""
    m = a.merge(b, on="key", how="outer", suffixes=("_a", "_b"), sort=False)
    out = pd.DataFrame({
        "key": m["key"],
        "section": m["section_a"].fillna(m["section_b"]),
        "figure": m["figure_a"].fillna(m["figure_b"]),
        names[0]: m["text_a"].fillna("-"),
        names[1]: m["text_b"].fillna("-"),
        "value_a": m["value_a"], "value_b": m["value_b"],
    })
    out["difference"] = out["value_b"] - out["value_a"]
    return out.reset_index(drop=True)


def compare_findings(a: list[dict], b: list[dict], names=("a", "b")) -> pd.DataFrame:
    """Two runs' cards matched by ``id``: severities, claims and the ``change`` (``gone``, ``new``,
    ``better``, ``worse``, ``same``)."""
    fa, fb = {f["id"]: f for f in a}, {f["id"]: f for f in b}
    ids = list(fa) + [i for i in fb if i not in fa]
    rows = []
    for i in ids:
        x, y = fa.get(i), fb.get(i)
        if x is None or y is None:
            change = "new" if x is None else "gone"
        else:
            d = SEVERITIES.index(y["severity"]) - SEVERITIES.index(x["severity"])
            change = "better" if d > 0 else ("worse" if d < 0 else "same")
        rows.append({"id": i, f"severity {names[0]}": x["severity"] if x else "-",
                     f"severity {names[1]}": y["severity"] if y else "-", "change": change,
                     f"claim {names[0]}": x["claim"] if x else "-", f"claim {names[1]}": y["claim"] if y else "-"})
    return pd.DataFrame(rows)


def read_summary(run) -> tuple[dict, dict | None]:
    """(audit.json, metrics.json or None) of a run folder; RunError when it has not been audited."""
    run = runs.open_run(run)
    summary = run.audit()
    if summary is None:
        raise runs.RunError(f"run {run.name!r} has not been audited: run `python -m core.audit --run {run.path}`")
    try:
        metrics = run.metrics()
    except runs.RunError:
        metrics = None
    return summary, metrics


def compare_runs(run_a, run_b, names=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every audit figure and every card of two audited runs side by side (:func:`compare`,
    :func:`compare_findings`)."""
    names = names or (Path(run_a).name, Path(run_b).name)
    if names[0] == names[1]:
        names = (f"{names[0]} (a)", f"{names[1]} (b)")
    sa, ma = read_summary(run_a)
    sb, mb = read_summary(run_b)
    return (compare(figures(sa, ma), figures(sb, mb), names),
            compare_findings(sa.get("findings") or [], sb.get("findings") or [], names))


def compare_markdown(runs_by_name: dict, sections=None) -> str:
    """A Markdown table of :func:`figures` for ``{"label": run_folder, ...}`` (one column per run)."""
    tables = []
    for name, run in runs_by_name.items():
        s, m = read_summary(run)
        t = figures(s, m)
        tables.append(t.set_index("key")[["section", "figure", "text"]].rename(columns={"text": name}))
    keys = list(dict.fromkeys(k for t in tables for k in t.index))
    lines = ["| figure | " + " | ".join(runs_by_name) + " |", "|---|" + "---|" * len(runs_by_name)]
    for k in keys:
        first = next(t.loc[k] for t in tables if k in t.index)
        if sections and first["section"] not in sections:
            continue
        vals = [t.loc[k, name] if k in t.index else "n/a" for t, name in zip(tables, runs_by_name, strict=True)]
        lines.append(f"| {first['section']}: {first['figure']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- Markdown report
BEGIN, END = "<!-- audit:begin (generated by python -m core.audit --markdown; do not edit) -->", "<!-- audit:end -->"
KEY_SECTIONS = ("evaluation", "lung-blanked probes", "source probe", "ROAD", "pointing game", "randomisation check")


def markdown(summary: dict, metrics: dict | None = None) -> str:
    """The findings and the key figures of an audit as Markdown (the generated block of AUDIT.md)."""
    t = summary.get("timing") or {}
    lines = [f"Audited run `{summary.get('run')}` (config name `{summary.get('run_name')}`, model sha256 "
             f"`{str(summary.get('model_sha256'))[:12]}…`), {summary.get('n_images')} test images, "
             f"{summary.get('created')}, {t.get('total_s', float('nan')):.0f} s.", "",
             "### Findings, most severe first", ""]
    for f in summary.get("findings") or []:
        lines.append(f"- **{f['severity']}**: {f['claim']}")
    lines += ["", "### Key figures ([low, high]: 95% patient-bootstrap CI)", "", "| section | figure | value |", "|---|---|---|"]
    fig = figures(summary, metrics)
    for r in fig[fig["section"].isin(KEY_SECTIONS)].itertuples():
        lines.append(f"| {r.section} | {r.figure} | {r.text} |")
    flagged = (summary.get("slices") or {}).get("flagged") or []
    lines += ["", f"Flagged slices ({(summary.get('slices') or {}).get('rule', '')}): "
              + (", ".join(f"`{s}`" for s in flagged) if flagged else "none") + "."]
    return "\n".join(lines) + "\n"


def update_markdown(path, summary: dict, run=None) -> Path:
    """Replace the generated block of a Markdown file (between :data:`BEGIN` and :data:`END`;
    appended when absent) with :func:`markdown` of ``summary``."""
    path = Path(path)
    metrics = None
    if run is not None:
        try:
            metrics = runs.open_run(run).metrics()
        except runs.RunError:
            pass
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{BEGIN}\n{markdown(summary, metrics)}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- the images behind a card
def case_images(run, root, paths, method: str = "gradcam", side: int = 320, *, model=None) -> list[dict]:
    """The films behind a card with the model's heatmap (the positive class, COVID-19) on each, for display.

    Each film is analysed by :func:`core.case.analyse` (prepared as the run prepares it); the map
    is put back onto the film with ``inputs.to_film``. ``model``: the run's model when the caller
    holds it. Returns ``{path, overlay (RGB, longer side <= side), p_covid, fell_back, error}`` per
    path; a film that cannot be read has ``error`` set and no overlay.
    """
    # lazy: core.case and core.explain import TensorFlow (~3.5 s); the rest of this module is TF-free
    from core import case as ccase
    from core import explain, images, inputs

    run = runs.open_run(run)
    m = run.model() if model is None else model
    out = []
    for rel in paths:
        try:
            c = ccase.analyse(run, safepath.read_film(root, rel), name=rel, colour_check=False, model=m)
        except images.ImageError as exc:
            out.append({"path": rel, "overlay": None, "error": exc.reason})
            continue
        heat = explain.explain(m, c.x, method, class_index=run.positive_index)
        scale = min(1.0, side / max(c.shown.shape))
        small = c.shown if scale >= 1.0 else cv2.resize(
            c.shown, (max(1, round(c.shown.shape[1] * scale)), max(1, round(c.shown.shape[0] * scale))),
            interpolation=cv2.INTER_AREA)
        rgb = explain.overlay(small, inputs.to_film(heat, c.box, small.shape), alpha=0.45)
        out.append({"path": rel, "overlay": rgb, "p_covid": c.p_positive, "fell_back": c.fell_back, "error": None})
    return out
