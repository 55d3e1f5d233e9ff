"""Explain an X-ray: upload one (PNG, JPEG, DICOM) or pick one from the run's test split."""

from __future__ import annotations

import streamlit as st

from core import images, runs
from dashboard import components, state

st.title("Explain a chest X-ray")
st.caption("Research use only, not for diagnosis. Uploads stay in memory and are never written to disk.")

run = state.require_run()


def model_size() -> int:
    """The model's input size; loads the model (once per process). Stops the page on RunError."""
    try:
        return state.model_size(run)
    except runs.RunError as exc:
        st.error(components.plain(state.error_sentence(exc)))
        st.stop()


opened = st.session_state.pop("explain_open", None)  # a film picked on another page (the audit's map)
if opened:
    st.session_state["explain_source"] = "Pick from the test split"
    st.session_state["explain_pick"] = opened

source = st.radio("Image", ["Upload a file", "Pick from the test split"], horizontal=True, key="explain_source")

if source == "Upload a file":
    # No `type=` filter: DICOM files often have no extension, and every file goes through
    # core.images.load, which refuses anything that is not a usable image with a clear reason.
    up = st.file_uploader("Chest X-ray (PNG, JPEG or DICOM, frontal view)", key="explain_upload")
    if up is None:
        st.info("Upload a frontal chest X-ray to see the model's output and its heatmaps.")
        model_size()  # load the model after the page is drawn, so that the first upload is fast
        st.stop()
    model_size()  # a broken run stops the page here, with one sentence
    components.show_case(run, up.getvalue(), up.name, case_id="uploaded image", key="explain")
else:
    root = state.data_root()
    if not state.has_data(root):
        st.info(state.NO_DATA)
        st.stop()
    try:
        pred = state.run_predictions(run)
    except runs.RunError as exc:
        st.error(components.plain(state.error_sentence(exc)))
        st.stop()
    test = pred[pred["split"] == "test"]
    if st.session_state.get("explain_pick") in set(pred["path"]) - set(test["path"]):  # a film opened from the map
        test = pred[(pred["split"] == "test") | (pred["path"] == st.session_state["explain_pick"])]
    if test.empty:
        st.info("This run's predictions.csv has no test rows to pick from.")
        st.stop()
    labels = {r.path: f"{r.path}  ({r.source}, {r.label}, P(covid) {r.p_covid:.2f})" for r in test.itertuples()}
    rel = st.selectbox("Test image", list(labels), format_func=labels.get, key="explain_pick")
    model_size()
    try:
        data = state.dataset_bytes(str(root), rel)
    except images.ImageError as exc:
        st.error(components.plain(state.error_sentence(exc)) + " Is the data root the one this run was trained on?")
        st.stop()
    row = test[test["path"] == rel].iloc[0]
    st.caption(f"True label: **{components.plain(row['label'])}** (source {components.plain(row['source'])}).")
    components.show_case(run, data, rel, colour_check=False, case_id=rel, key="explain")
