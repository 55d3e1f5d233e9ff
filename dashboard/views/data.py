"""Data: counts by source x label x split and example images, read from the data root at run time."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core import images
from dashboard import components, state

EXAMPLES = 3  # images per class and source
THUMB = 160

st.title("Data")
root = state.data_root()
st.caption(f"Data root: {components.plain(root)}. Images are read from there when the page opens; none are stored in the repository.")
if not state.has_data(root):
    st.info(state.NO_DATA)
    st.stop()

run = state.current_run()
split_file = None
if run is not None and (run / "split.csv").is_file():
    split_file = str(run / "split.csv")
    st.caption(f"Splits as used by {components.plain(state.run_label(str(run)))}.")

try:
    table = state.data_table(str(root), split_file)
except (OSError, ValueError) as exc:
    st.error(components.plain(state.error_sentence(exc)))
    st.stop()
if table.empty:
    st.info("No images were found under the data root. " + state.NO_DATA)
    st.stop()

c1, c2, c3 = st.columns(3)
c1.metric("Images", len(table))
c2.metric("Patients", table["patient_id"].nunique())
c3.metric("Sources", table["source"].nunique())

st.subheader("Counts by source, label and split")
if "split" in table.columns:
    counts = pd.crosstab([table["source"], table["label"]], table["split"], margins=True, margins_name="total")
    counts = counts[[c for c in ("train", "val", "test", "total") if c in counts.columns]]
else:
    counts = pd.crosstab(table["source"], table["label"], margins=True, margins_name="total")
    st.caption("The selected run has no split.csv, so only source x label counts are shown.")
st.dataframe(counts, key="data_counts")

dropped = table.attrs.get("dropped") or {}
if dropped:
    st.caption("Rows left out when reading the sources: " + ", ".join(f"{k}: {v}" for k, v in dropped.items()))

try:
    warnings, predictability = state.data_confounding(str(root), split_file)
except (OSError, ValueError) as exc:
    warnings, predictability = [state.error_sentence(exc)], {}
for w in warnings:
    st.warning(components.plain(w[0].upper() + w[1:]))
if predictability:
    st.caption("How well 'is it covid?' is predicted without looking at the lungs (cross-validated ROC AUC): "
               + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in predictability.items() if v is not None))

st.subheader("Examples per class and source")
for (label, source), g in table.groupby(["label", "source"], sort=True):
    st.markdown(f"**{components.plain(label)}** from **{components.plain(source)}** ({len(g)} images)")
    cols = st.columns(EXAMPLES)
    for col, rel in zip(cols, g["path"].sort_values().head(EXAMPLES), strict=False):
        try:
            col.image(state.dataset_image(str(root), rel, THUMB).astype("uint8"), caption=components.plain(rel.rsplit("/", 1)[-1]))
        except images.ImageError as exc:
            col.warning(components.plain(state.error_sentence(exc)))
