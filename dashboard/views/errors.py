"""Misclassified cases: false positives and negatives of the run's test split at its operating point."""

from __future__ import annotations

import streamlit as st

from core import images, report, runs
from dashboard import components, state

GALLERY = 12  # thumbnails shown at once
THUMB = 160

st.title("Misclassified cases")
run = state.require_run()
try:
    pred = state.run_predictions(run)
except runs.RunError as exc:
    st.error(components.plain(state.error_sentence(exc)))
    st.stop()
thr = state.threshold(run)
if thr is None:
    st.info("This run has no metrics.json, hence no operating point: run `python -m core.evaluate --run RUN`.")
    st.stop()

wrong = report.misclassified(pred, thr)
n_test = int((pred["split"] == "test").sum())
st.caption(f"{len(wrong)} of {n_test} test images are misclassified at the operating point "
           f"P(covid) ≥ {thr:.3f} (chosen on held-out development data, never the test split).")

f1, f2, f3, f4 = st.columns(4)
kinds = f1.multiselect("Error", ["false positive", "false negative"], default=["false positive", "false negative"],
                       key="err_kind")
src = f2.multiselect("Source", sorted(pred["source"].dropna().unique()), key="err_source",
                     placeholder="all sources")
lab = f3.multiselect("True label", sorted(pred["label"].dropna().unique()), key="err_label",
                     placeholder="all labels")
order = f4.radio("Sort by confidence", ["most confident first", "least confident first"], key="err_sort")

shown = wrong[wrong["error"].isin(kinds)]
if src:
    shown = shown[shown["source"].isin(src)]
if lab:
    shown = shown[shown["label"].isin(lab)]
if order == "least confident first":
    shown = shown.iloc[::-1]

if shown.empty:
    st.success("No misclassified test image matches these filters.")
    st.stop()

cols = [c for c in ("path", "source", "label", "error", "p_covid", "confidence") if c in shown.columns]
st.dataframe(shown[cols], hide_index=True, key="err_table")

root = state.data_root()
if not state.has_data(root):
    st.info(state.NO_DATA)
    st.stop()

st.subheader("Gallery")
grid = st.columns(4)
for i, r in enumerate(shown.head(GALLERY).itertuples()):
    with grid[i % 4]:
        try:
            thumb = state.dataset_image(str(root), r.path, THUMB)
            st.image(thumb.astype("uint8"), caption=components.plain(f"{r.error}, {r.source}/{r.label}, P(covid) {r.p_covid:.2f}"))
        except images.ImageError as exc:
            st.warning(components.plain(state.error_sentence(exc)))

st.subheader("Open a case")
kind_of = dict(zip(shown["path"], shown["error"], strict=False))
case = st.selectbox("Case", list(kind_of), key="err_case", format_func=lambda p: f"{p}  ({kind_of[p]})")
try:
    data = state.dataset_bytes(str(root), case)
    state.model_size(run)
except (images.ImageError, runs.RunError) as exc:
    st.error(components.plain(state.error_sentence(exc)))
    st.stop()
row = shown[shown["path"] == case].iloc[0]
st.caption(f"True label: **{components.plain(row['label'])}** ({components.plain(row['source'])}); the model called it "
           f"{'covid' if row['error'] == 'false positive' else 'not covid'}.")
components.show_case(run, data, case, colour_check=False, case_id=case, key="err")
