"""COVID-19 chest X-ray classifier dashboard: the entry point.

    streamlit run dashboard/app.py [-- --data DIR --runs DIR]

Pages live in ``dashboard/views/`` (not ``pages/``: a ``pages/`` folder beside the entry point
switches Streamlit to its legacy multipage mode when a sub-page URL is opened directly).
The sidebar picks the model run (the shipped model by default, or any run under the runs folder);
every page reads that choice through :mod:`dashboard.state`. Pages only lay out what ``core``
computes. Research use only, not for diagnosis.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run dashboard/app.py` puts dashboard/ on sys.path, not the repository root.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from core import runs  # noqa: E402
from dashboard import components, state  # noqa: E402

st.set_page_config(page_title="COVID-19 CXR explainer", page_icon=":material/pulmonology:", layout="wide")

PAGES = [
    st.Page("views/explain.py", title="Explain an X-ray", icon=":material/search:", default=True),
    st.Page("views/errors.py", title="Misclassified cases", icon=":material/report:"),
    st.Page("views/training.py", title="Training", icon=":material/monitoring:"),
    st.Page("views/evaluation.py", title="Evaluation", icon=":material/analytics:"),
    st.Page("views/data.py", title="Data", icon=":material/database:"),
    st.Page("views/shortcuts.py", title="Shortcut audit", icon=":material/policy:"),
    st.Page("views/about.py", title="About", icon=":material/info:"),
]

nav = st.navigation(PAGES)



def broken_runs(choices: list[str]) -> dict[str, str]:
    """The run folders of the list that cannot be opened, with the one sentence why: they stay in
    the list (named, with a note) so that picking one explains itself, and never break the others."""
    out = {}
    for c in choices:
        try:
            state.run_handle(c)
        except runs.RunError as exc:
            out[c] = state.error_sentence(exc)
    return out


with st.sidebar:
    choices = state.run_choices(str(state.runs_root()))
    if choices:
        if st.session_state.get("run") not in choices:
            st.session_state["run"] = choices[0]
        broken = broken_runs(choices)
        st.selectbox("Model run", choices, key="run",
                     format_func=lambda c: state.run_label(c) + (" (cannot be opened)" if c in broken else ""),
                     help="The shipped model, or any run folder under the runs directory.")
        if broken:
            st.caption(components.plain(f"{len(broken)} run folder(s) cannot be opened: "
                                        + " ".join(broken.values())))
    else:
        st.warning(state.NO_RUN)
    if choices and st.session_state.get("run") not in broken:
        components.operating_sidebar(st.session_state.get("run"))
    root = state.data_root()
    st.caption(f"Data: {components.plain(root)}" + ("" if state.has_data(root) else " (no images found)"))
    st.caption("Research use only, not for diagnosis.")

try:
    nav.run()
except (ValueError, KeyError, OSError) as exc:
    # Last resort for malformed run files or data (RunError and ImageError are ValueErrors):
    # one sentence instead of a stack trace, and the session keeps working.
    st.error(f"This page could not be shown: {components.plain(state.error_sentence(exc))}")
