"""Shortcut audit: the findings as cards (with the images behind each), then every measure behind
them, and two runs side by side (all from the runs' audit.json / audit.csv; see core.audit)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from core import audit_maps, findings, report, runs
from core.metrics import fmt
from dashboard import components, state

BADGE = {"high": ":red-background[**high**]", "medium": ":orange-background[**medium**]",
         "low": ":blue-background[**low**]", "ok": ":green-background[**ok**]"}
SHOW = 8  # images shown behind a card

st.title("Shortcut audit")
st.caption("Does the model know where a film came from, and where does it fail? Checks that a source "
           "shortcut cannot pass (after DeGrave et al., Nature Machine Intelligence 2021; Zech et al., "
           "PLOS Medicine 2018).")
run = state.require_run()
try:
    summary = state.audit_summary(run)
    table = state.audit_table(run)
except runs.RunError as exc:
    st.error(components.plain(state.error_sentence(exc)))
    st.stop()
if summary is None:
    st.info("This run has not been audited yet: run `python -m core.audit --run RUN --data DIR` "
            "(it needs the images; see the Data page) and reload this page.")
    st.stop()


# ------------------------------------------------------------------ findings
def show_cases(card: dict, key: str) -> None:
    """The images behind a card, each with the model's heatmap on the film."""
    paths = card.get("paths") or []
    root = state.data_root()
    if not state.has_data(root):
        st.info(state.NO_DATA)
        return
    method = card.get("method") or next(iter(summary.get("methods") or {"gradcam": 0}))
    st.caption(f"{card.get('paths_note', '')}: {min(SHOW, len(paths))} of {card.get('n_paths', len(paths))}, with their "
               f"{method} heatmaps (class COVID-19).")
    cols = st.columns(4)
    for i, case in enumerate(state.audit_cases(run, str(root), tuple(paths[:SHOW]), method)):
        col = cols[i % 4]
        if case["error"]:
            col.warning(components.plain(f"{case['path']}: {case['error']}."))
            continue
        col.image(case["overlay"], width="stretch",
                  caption=components.plain(f"{case['path'].split('/')[-1]} · P(covid) {case['p_covid']:.2f}")
                          + (" · no lungs found" if case["fell_back"] else ""))


def card(c: dict, key: str) -> None:
    with st.container(border=True):
        st.markdown(f"{BADGE.get(c['severity'], c['severity'])} severity · {components.plain(c['claim'])}")
        n = len(c.get("paths") or [])
        total = c.get("n_paths", n)
        if n:
            opened = st.session_state.get("sc_open") == c["id"]
            label = f"the {n} image{'s' if n > 1 else ''}" if total <= n else f"{n} of the {total} images"
            if st.button(("Hide " if opened else "Show ") + label + " behind it", key=f"sc_card_{key}"):
                st.session_state["sc_open"] = None if opened else c["id"]
                st.rerun()
            if opened:
                show_cases(c, key)


cards = summary.get("findings")
st.subheader("Findings")
if cards is None:
    st.info("This audit predates the findings: rerun `python -m core.audit` on the run to get them.")
else:
    open_cards = [c for c in cards if c["severity"] != "ok"]
    if not open_cards:
        st.success("No check found a problem.")
    for i, c in enumerate(open_cards):
        card(c, f"o{i}")
    passed = [c for c in cards if c["severity"] == "ok"]
    if passed:
        with st.expander(f"{len(passed)} checks passed"):
            for i, c in enumerate(passed):
                card(c, f"p{i}")
st.caption(f"{summary.get('n_images', '?')} test images, explaining class '{summary.get('explained_class', 'covid')}'; "
           f"audited {summary.get('created', '')}"
           + (f"; the network sees a lung crop, and on {summary.get('n_fell_back', 0)} films no lungs were found"
              if summary.get("lung_crop") else "") + ".")
with st.expander("The audit in plain words"):
    st.warning(components.plain(summary.get("verdict", "The audit has no verdict.")))

# ------------------------------------------------------------------ source probe
sp = summary.get("source_probe") or {}
if sp.get("model"):
    st.subheader("Does the model know where a film came from?")
    rows = []
    for key, r in sp["model"].items():
        floor = (sp.get("random") or {}).get(key) or {}
        rows.append({"images": "all" if key == "all" else key.replace("label:", "within "), "n": r.get("n"),
                     "sources": " / ".join(r.get("sources", {})) or "-",
                     "source AUC, model": fmt(r.get("auc")) if "auc" in r else r.get("reason", ""),
                     "source AUC, random-weights floor": fmt(floor.get("auc")),
                     "accuracy (chance)": f"{fmt(r.get('accuracy'))} ({r['chance_accuracy']:.2f})"
                     if "accuracy" in r else ""})
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="sc_source")
    st.caption("A cross-validated logistic probe on the network's penultimate features predicts each image's "
               "collection (patient-grouped folds; macro one-vs-rest AUC, 0.5 = chance). Within one label, a high "
               "AUC means the features encode the collection beyond the diagnosis. The floor is the same probe on "
               "a random-weights network of the same architecture.")
elif sp.get("reason"):
    st.info(f"Source probe: {components.plain(sp['reason'])}")

# ------------------------------------------------------------------ map of the model's features
st.subheader("A map of the model's features")
components.show_feature_map(run, summary.get("feature_map"))

# ------------------------------------------------------------------ ROAD and pointing game
rd = (summary.get("road") or {}).get("maps") or {}
titles = {k: v.get("title", k) for k, v in (summary.get("methods") or {}).items()}
titles.update({"random": "random map (baseline)", "lungs": "lung map (remove the lungs first)"})
if rd:
    st.subheader("ROAD: does removing what a map calls relevant move the score?")
    st.dataframe(pd.DataFrame([{
        "map": titles.get(k, k), "ROAD combined": fmt((d.get("combined") or {}).get("all")),
        "MoRF change": fmt((d.get("morf_mean") or {}).get("all")),
        "LeRF change": fmt((d.get("lerf_mean") or {}).get("all")),
        "minus random map": fmt(d.get("vs_random"))} for k, d in rd.items()]),
        hide_index=True, key="sc_road")
    r = summary["road"]
    st.caption(f"Removal with noisy linear imputation (Rong et al. 2022, as pytorch-grad-cam) at "
               f"{', '.join(f'{100 * f:.0f}%' for f in r.get('fractions', []))} of the pixels; change of "
               f"{r.get('score', 'P(COVID-19)')}. Combined = (LeRF - MoRF) / 2: higher = more faithful.")
pg = summary.get("pointing_game") or {}
if pg:
    st.subheader("Pointing game: is the map's peak on the lungs?")
    rows = []
    for name in dict.fromkeys(list((pg.get("boxes") or {}).get("methods", {})) + list((pg.get("lungs") or {}).get("methods", {}))):
        b = (pg.get("boxes") or {}).get("methods", {}).get(name) or {}
        m = (pg.get("lungs") or {}).get("methods", {}).get(name) or {}
        rows.append({"map": titles.get(name, name),
                     f"peak in expert boxes (n={pg.get('boxes', {}).get('n', 0)})": findings.pct(b.get("hit")),
                     "heat in expert boxes": findings.pct(b.get("mass")),
                     f"peak in lung mask (n={pg.get('lungs', {}).get('n', 0)})": findings.pct(m.get("hit")),
                     "heat in lung mask": findings.pct(m.get("mass"))})
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="sc_pointing")
    area = ((pg.get("boxes") or {}).get("methods", {}).get("random") or {}).get("area")
    st.caption("Expert lung boxes: ieee8023's COCO annotations, mapped into the network's view."
               + (f" The boxes cover {area:.0%} of the view on average." if area else ""))

# ------------------------------------------------------------------ trust by outcome (core.audit_outcome)
bo = summary.get("by_outcome") or {}
if bo.get("methods"):
    st.subheader("Do wrong calls come with worse maps?")
    st.dataframe(pd.DataFrame([{
        "map": titles.get(m, m), "outcome": o, "n": r["n"],
        "heat in lungs": findings.pct(r.get("in_lung_share")), "ROAD combined": fmt(r.get("road_combined")),
        "peak in lung mask": findings.pct(r.get("lungs_hit"))}
        for m, per in bo["methods"].items() for o, r in per.items()]), hide_index=True, key="sc_by_outcome")
    st.caption(components.plain(bo.get("sentence", "")) + f" Outcomes at the run's threshold {bo.get('threshold', 0.5):.2f} "
               f"on {bo.get('score', 'P(COVID-19)')}: TP/FP/TN/FN, right = TP + TN, wrong = FP + FN.")

# ------------------------------------------------------------------ burned-in text and markers (core.audit_markers)
mk = summary.get("markers") or {}
if mk.get("methods"):
    st.subheader("Heat on burned-in text and markers")
    st.dataframe(pd.DataFrame([{
        "map": titles.get(m, m), "films": part.removeprefix("source:"), "marked films": r.get("n_marked"),
        "heat on markers": f"{r['heat_share']:.1%}" if r.get("heat_share") is not None else "",
        "their area": f"{r['area_share']:.1%}" if r.get("area_share") is not None else "",
        "times a uniform map": f"{r['ratio']:.1f}" if r.get("ratio") is not None else ""}
        for m, per in mk["methods"].items() for part, r in per.items()]), hide_index=True, key="sc_markers")
    st.caption(f"{mk.get('n_marked')} of {mk.get('n_films')} test films carry text or markers where the network looks "
               "(core.markers). Far above 1 times a uniform map in one collection: the model reads its labels.")

# ------------------------------------------------------------------ slices
sl = summary.get("slices") or {}
if sl.get("slices"):
    st.subheader("Where does the model fail? Slices")
    only = st.toggle("Only flagged slices", value=bool(sl.get("flagged")), key="sc_only_flagged")
    rows = [{"slice": s["name"], "n": s["n"], "COVID-19": s["n_pos"], "other": s["n_neg"],
             "ROC AUC": fmt(s["metrics"]["roc_auc"]), "sensitivity": fmt(s["metrics"]["sensitivity"]),
             "specificity": fmt(s["metrics"]["specificity"]), "flagged": ", ".join(s["flags"])}
            for s in sl["slices"] if s["flags"] or not only]
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="sc_slices")
    st.caption(f"Threshold {sl.get('threshold', 0.5):.2f} (chosen on held-out development data). Rule: {sl.get('rule', '')}.")

# ------------------------------------------------------------------ probes
probes = summary.get("probes") or {}
if probes:
    st.subheader("Lung-blanked probes")
    auc = probes.get("auc", {})
    c = st.columns(3)
    c[0].metric("ROC AUC, original images", fmt(auc.get("original")))
    c[1].metric("ROC AUC, lungs blanked", fmt(auc.get("lungs_blanked")),
                help="High = the model separates the classes without seeing the lungs: a shortcut.")
    c[2].metric("ROC AUC, only the lungs", fmt(auc.get("lungs_only")))
    rows = [{"source": s, "n": w.get("n"), **{k: fmt(w.get(k)) for k in ("original", "lungs_blanked", "lungs_only")}}
            for s, w in (probes.get("within_source") or {}).items()]
    if rows:
        st.caption("Within one source (both classes present):")
        st.dataframe(pd.DataFrame(rows), hide_index=True, key="sc_probes")

# ------------------------------------------------------------------ sanity + trust per method
methods = summary.get("methods") or {}
if methods:
    st.subheader("Per explanation method")
    rows = []
    for name, info in methods.items():
        g = (info.get("groups") or {}).get("all", {})
        s = info.get("sanity") or {}
        rows.append({
            "method": info.get("title", name),
            "heat in lungs": fmt(g.get("in_lung_share")),
            "lung area": f"{g.get('lung_area_share', float('nan')):.2f}",
            "border band": f"{g.get('border_share', float('nan')):.2f}",
            "randomisation check": ("passes" if s.get("passes") else "FAILS") + f" (Spearman {s.get('spearman_mean', float('nan')):.2f})"
            if s else "not run",
            **({"deletion AUC": f"{g['deletion_auc']:.3f}", "insertion AUC": f"{g['insertion_auc']:.3f}"}
               if "deletion_auc" in g else {}),
        })
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="sc_methods")
    st.caption("Heat in lungs above the lung area = the maps favour the lungs. The randomisation check passes "
               "when maps of the trained model differ from those of the same network with random weights.")

# ------------------------------------------------------------------ mean heatmaps
counts = summary.get("map_counts") or {}
if counts:
    with st.expander("Mean heatmaps per class and source"):
        shown_any = False
        for name in methods:
            keys = sorted(k for k in counts if k.startswith(f"heat__{name}__") and counts[k] >= audit_maps.MIN_MEAN_N)
            if not keys:
                continue
            st.markdown(f"**{methods[name].get('title', name)}**")
            cols = st.columns(min(len(keys), 6))
            for i, k in enumerate(keys):
                group = k.split("__", 2)[2]
                rgb = state.mean_map(run, name, group)
                if rgb is not None:
                    cols[i % len(cols)].image(rgb, caption=components.plain(f"{group} (n={counts[k]})"), width="stretch")
                    shown_any = True
        if not shown_any:
            st.info("No class or source has enough audited images for a mean heatmap: audit more test images.")
        st.caption(f"Groups of fewer than {audit_maps.MIN_MEAN_N} images are left out (their mean is close to one image).")

# ------------------------------------------------------------------ distributions and worst cases
if table is not None and not table.empty:
    st.subheader("In-lung share of the heat, per image")
    by = st.radio("Group by", ["class", "source"], horizontal=True, key="sc_by")
    col = by if by in table.columns else "label"
    fig = px.box(table, x="method", y="in_lung_share", color=col, points="all", height=380)
    fig.update_layout(yaxis_title="share of heat inside the lungs", margin=dict(l=10, r=10, t=10, b=10))
    st.plotly_chart(fig, key="sc_box")

    st.subheader('Right for the wrong reason')
    thr = state.threshold(run)
    method = st.selectbox("Method", list(dict.fromkeys(table["method"])), key="sc_method")
    worst = report.right_for_wrong_reason(table, 0.5 if thr is None else thr, method)
    st.caption("Correctly classified test images whose heat lies least inside the lungs"
               + ("" if thr is not None else " (no metrics.json: threshold 0.5)") + ".")
    show = [c for c in ("path", "source", "label", "p_covid_original", "in_lung_share", "border_share", "top_share")
            if c in worst.columns]
    st.dataframe(worst[show], hide_index=True, key="sc_worst")
    root = state.data_root()
    if not state.has_data(root):
        st.info(state.NO_DATA)
    elif not worst.empty and st.toggle("Show these films with their heatmaps", key="sc_worst_show"):
        cases = state.audit_cases(run, str(root), tuple(worst["path"].head(8)), method)
        shares = dict(zip(worst["path"], worst["in_lung_share"], strict=False))
        cols = st.columns(4)
        for i, case in enumerate(cases):
            r = worst[worst["path"] == case["path"]].iloc[0]
            if case["error"]:
                cols[i % 4].warning(f"{case['path']}: {case['error']}.")
                continue
            cols[i % 4].image(case["overlay"], width="stretch",
                              caption=components.plain(f"{r.source}/{r.label}: {100 * shares[case['path']]:.0f} % in lungs"))

# ------------------------------------------------------------------ compare two runs
st.subheader("Compare two audited runs")
audited = state.audited_runs()
if len(audited) < 2:
    st.caption("Audit a second run (for example a candidate model) to compare it here with this one: every figure "
               "and every card side by side, with the difference.")
else:
    c1, c2 = st.columns(2)
    a = c1.selectbox("Run A", audited, index=audited.index(str(run)) if str(run) in audited else 0,
                     format_func=state.run_label, key="sc_cmp_a")
    b = c2.selectbox("Run B", audited, index=1 if audited[0] == a else 0, format_func=state.run_label, key="sc_cmp_b")
    if a == b:
        st.info("Pick two different runs.")
    else:
        try:
            figs, cmp_cards = state.compare_runs(a, b)
        except runs.RunError as exc:
            st.error(components.plain(state.error_sentence(exc)))
        else:
            st.markdown("**Cards**: `gone` = the finding no longer appears in B; `better` / `worse` = its severity "
                        "changed. A shortcut that only moved shows up as one card better and another worse.")
            st.dataframe(cmp_cards, hide_index=True, key="sc_cmp_cards")
            sections = list(dict.fromkeys(figs["section"]))
            pick = st.multiselect("Sections", sections, default=sections, key="sc_cmp_sections")
            view = figs[figs["section"].isin(pick)].drop(columns=["key", "value_a", "value_b"])
            st.dataframe(view, hide_index=True, key="sc_cmp_figs",
                         column_config={"difference": st.column_config.NumberColumn(format="%+.3f")})
