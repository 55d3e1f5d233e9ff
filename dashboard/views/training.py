"""Training: loss, accuracy and AUC per epoch, the run's config and its split summary."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core import runs
from dashboard import state

st.title("Training")
run = state.require_run()
st.caption(f"Run: `{state.run_label(str(run))}`")

try:
    hist = state.run_history(run)
except runs.RunError as exc:
    st.error(state.error_sentence(exc))
    hist = None

if hist is not None:
    # Keras names: loss/val_loss, accuracy/val_accuracy, auc/val_auc (plus whatever else was logged).
    groups = {"Loss": "loss", "Accuracy": "accuracy", "AUC": "auc"}

    def members(key: str) -> list[str]:
        return [c for c in hist.columns if c == key or c.endswith("_" + key) or c.startswith(key + "_")]

    used = {c for key in groups.values() for c in members(key)} | {"epoch"}
    rest = [c for c in hist.columns if c not in used and pd.api.types.is_numeric_dtype(hist[c])]
    if rest:
        groups["Other"] = None
    cols = st.columns(len(groups))
    for col, (title, key) in zip(cols, groups.items(), strict=False):
        series = members(key) if key else rest
        if not series:
            col.info(f"history.csv has no {title.lower()} column.")
            continue
        fig = go.Figure()
        for c in series:
            fig.add_trace(go.Scatter(x=hist["epoch"], y=hist[c], mode="lines+markers", name=c))
        fig.update_layout(title=f"{title} per epoch", xaxis_title="epoch", height=320,
                          margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h"))
        col.plotly_chart(fig, key=f"train_{key or 'other'}")
    st.caption("`val_` = validation split; `ws_auc` = AUC within one source (covid vs other pneumonia in "
               "ieee8023), the check a source shortcut cannot pass.")
    with st.expander("history.csv"):
        st.dataframe(hist, hide_index=True)

c1, c2 = st.columns(2)
with c1:
    st.subheader("Configuration")
    try:
        st.json(state.run_config(run), expanded=1)
    except runs.RunError as exc:
        st.error(state.error_sentence(exc))
with c2:
    st.subheader("Split")
    try:
        split = state.run_split(run)
    except runs.RunError as exc:
        st.error(state.error_sentence(exc))
    else:
        idx = [c for c in ("source", "label") if c in split.columns]
        if idx:
            counts = pd.crosstab([split[c] for c in idx], split["split"], margins=True, margins_name="total")
            st.dataframe(counts)
        else:
            st.dataframe(split["split"].value_counts())
        if "patient_id" in split.columns:
            st.caption(f"{len(split)} images of {split['patient_id'].nunique()} patients; "
                       "patients never span two splits.")
