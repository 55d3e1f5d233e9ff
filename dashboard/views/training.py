"""Training: loss, accuracy and AUC per epoch, the run's config and its split summary."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from core import runs
from dashboard import components, state

st.title("Training")
run = state.require_run()
st.caption(f"Run: {components.plain(state.run_label(str(run)))}")

handle = state.run_handle(run)
hist = None
if handle.adopted and not handle.has("history.csv"):
    st.info("No history was given: this model was adopted (`python -m core.adopt`) without `--history` "
            "(a Keras CSVLogger file of its training), so there are no training curves to show.")
else:
    try:
        hist = state.run_history(run)
    except runs.RunError as exc:
        st.error(components.plain(state.error_sentence(exc)))

if hist is not None:
    curves = runs.history_curves(hist)
    charts = [c for c in (*runs.HISTORY_CHARTS, "Other") if (curves["chart"] == c).any()]
    several = curves["member"].nunique() > 1
    if not charts:
        st.info("history.csv has no measured column.")
    cols = st.columns(len(charts)) if charts else []
    palette, dashes = px.colors.qualitative.Plotly, ("solid", "dot", "dash", "dashdot", "longdash")
    for col, title in zip(cols, charts, strict=False):
        fig = go.Figure()
        part = curves[curves["chart"] == title]
        colour = {s: palette[i % len(palette)] for i, s in enumerate(part["series"].unique())}  # a colour per series
        for (series, member), g in part.groupby(["series", "member"], sort=False):
            name = f"{series} (network {member})" if several else series
            fig.add_trace(go.Scatter(x=g["epoch"], y=g["value"], mode="lines+markers", name=name, marker_size=4,
                                     line=dict(color=colour[series], dash=dashes[int(member) % len(dashes)])))
        fig.update_layout(title=f"{title} per epoch", xaxis_title="epoch", height=380,
                          margin=dict(l=10, r=10, t=40, b=10),
                          legend=dict(orientation="h", yanchor="top", y=-0.25, xanchor="left", x=0))
        col.plotly_chart(fig, key=f"train_{title.lower()}")
    st.caption("`val_` = the network's held-out fold of the development data (cross-validation: images "
               "that network never trained on; no epoch is chosen on them, the calibration and threshold "
               "are fitted on them once training ends). "
               "`ws_auc` = AUC within one source (covid vs other pneumonia in ieee8023), the check a "
               "source shortcut cannot pass. An ensemble draws one line per network.")
    with st.expander("history.csv"):
        st.dataframe(hist, hide_index=True)

c1, c2 = st.columns(2)
with c1:
    st.subheader("Configuration")
    try:
        st.json(state.run_config(run), expanded=1)
    except runs.RunError as exc:
        st.error(components.plain(state.error_sentence(exc)))
with c2:
    st.subheader("Split")
    if not handle.training_data_known:
        st.info("Training data unknown: this model was adopted without `--trained-on`, so every film it was "
                "scored on counts as external, and some may be films it was trained on.")
    try:
        split = state.run_split(run)
    except runs.RunError as exc:
        if handle.training_data_known:
            st.error(components.plain(state.error_sentence(exc)))
        split = None
    if split is not None:
        idx = [c for c in ("source", "label") if c in split.columns]
        if idx:
            counts = pd.crosstab([split[c] for c in idx], split["split"], margins=True, margins_name="total")
            st.dataframe(counts)
        else:
            st.dataframe(split["split"].value_counts())
        if "patient_id" in split.columns:
            st.caption(f"{len(split)} images of {split['patient_id'].nunique()} patients; "
                       "patients never span two splits.")
