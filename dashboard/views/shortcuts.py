"""Shortcut audit: where the heatmaps point, the randomisation check, the lung-blanking probes,
and the cases the model got right for the wrong reason (from the run's audit.json / audit.csv)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from core import images, report, runs
from core.metrics import fmt
from dashboard import state

st.title("Shortcut audit")
st.caption("Does the model look at the lungs? Checks that a source shortcut cannot pass "
           "(after DeGrave et al., Nature Machine Intelligence 2021).")
run = state.require_run()
try:
    summary = state.audit_summary(run)
    table = state.audit_table(run)
except runs.RunError as exc:
    st.error(state.error_sentence(exc))
    st.stop()
if summary is None:
    st.info("This run has not been audited yet: run `python -m core.audit --run RUN --data DIR` "
            "(it needs the images; see the Data page) and reload this page.")
    st.stop()


st.warning(summary.get("verdict", "The audit has no verdict."))
st.caption(f"{summary.get('n_images', '?')} test images, explaining class "
           f"'{summary.get('explained_class', 'covid')}'; audited {summary.get('created', '')}.")

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
            "deletion AUC": f"{g['deletion_auc']:.3f}" if "deletion_auc" in g else "",
            "insertion AUC": f"{g['insertion_auc']:.3f}" if "insertion_auc" in g else "",
            "randomisation check": ("passes" if s.get("passes") else "FAILS") + f" (Spearman {s.get('spearman_mean', float('nan')):.2f})"
            if s else "not run",
        })
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="sc_methods")
    st.caption("Heat in lungs above the lung area = the maps favour the lungs. The randomisation check passes "
               "when maps of the trained model differ from those of the same network with random weights.")

# ------------------------------------------------------------------ mean heatmaps
counts = summary.get("map_counts") or {}
if counts:
    from core import audit as core_audit

    st.subheader("Mean heatmaps per class and source")
    shown_any = False
    for name in methods:
        keys = sorted(k for k in counts if k.startswith(f"heat__{name}__") and counts[k] >= core_audit.MIN_MEAN_N)
        if not keys:
            continue
        st.markdown(f"**{methods[name].get('title', name)}**")
        cols = st.columns(min(len(keys), 6))
        for i, k in enumerate(keys):
            group = k.split("__", 2)[2]
            rgb = state.mean_map(run, name, group)
            if rgb is not None:
                cols[i % len(cols)].image(rgb, caption=f"{group} (n={counts[k]})", width="stretch")
                shown_any = True
    if not shown_any:
        st.info("No class or source has enough audited images for a mean heatmap: audit more test images.")
    st.caption(f"Groups of fewer than {core_audit.MIN_MEAN_N} images are left out (their mean is close to one image).")

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
    method = st.selectbox("Method", sorted(table["method"].unique()), key="sc_method")
    worst = report.right_for_wrong_reason(table, 0.5 if thr is None else thr, method)
    st.caption("Correctly classified test images whose heat lies least inside the lungs"
               + ("" if thr is not None else " (no metrics.json: threshold 0.5)") + ".")
    show = [c for c in ("path", "source", "label", "p_covid_original", "in_lung_share", "border_share", "top_share")
            if c in worst.columns]
    st.dataframe(worst[show], hide_index=True, key="sc_worst")
    root = state.data_root()
    if not state.has_data(root):
        st.info(state.NO_DATA)
    elif not worst.empty:
        from core import explain

        size = state.model_size(run)
        cols = st.columns(4)
        for i, r in enumerate(worst.head(8).itertuples()):
            try:
                img = state.dataset_image(str(root), r.path, size)
            except images.ImageError as exc:
                cols[i % 4].warning(state.error_sentence(exc))
                continue
            hmap = state.heatmap(str(run), img, method)
            cols[i % 4].image(explain.overlay(img, hmap), width="stretch",
                              caption=f"{r.source}/{r.label}: {100 * r.in_lung_share:.0f} % in lungs")
