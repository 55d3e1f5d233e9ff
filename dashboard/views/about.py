"""About: the model card, the data sources with licences and citations, and the disclaimer."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from core import config

st.title("About")
st.warning("**Research use only, not for diagnosis.** This tool has not been validated clinically. "
         "Most published COVID-19 chest X-ray classifiers learned the image source, not the disease, "
         "and this one was trained on data with the same trap.")

card = config.ASSETS_DIR / "MODEL_CARD.md"
st.header("Model card")
if card.is_file():
    st.markdown(card.read_text(encoding="utf-8"))
else:
    st.info("The model card `assets/MODEL_CARD.md` is missing from this checkout.")

st.header("Data sources")
sources = Path(__file__).resolve().parent.parent / "DATA_SOURCES.md"
st.markdown(sources.read_text(encoding="utf-8"))
