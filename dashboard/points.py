"""The dashboard's operating point and the site-calibration table: cached calls into ``core.operating``
and the run's ``site_calibration.json`` (kept apart from :mod:`dashboard.state`, which they build on).

The sidebar stores the choice in the session (:data:`OPERATING_KEY`, and for a site profile a path
or an upload); :func:`operating_point` turns it into a :class:`core.operating.Point` for the Explain
page and the case report.
"""

from __future__ import annotations

import json
from pathlib import Path

import streamlit as st

from core import operating
from dashboard import state

OPERATING_KEY = "operating_point"  # "run", "rule-out", "balanced" or "site" (core.operating)
SITE_PATH_KEY = "site_profile_path"  # a SITE.json path typed in the sidebar
SITE_UPLOAD_KEY = "site_profile_upload"  # or an uploaded SITE.json


@st.cache_data(max_entries=16, show_spinner=False)
def _points(run: str, pred_stamp: tuple | None, metrics_stamp: tuple | None) -> dict:
    return operating.operating_points(state.run_handle(run))


def operating_points(run: Path) -> dict:
    """The run's named operating points (:func:`core.operating.operating_points`), re-read when its
    predictions.csv or metrics.json changes."""
    return _points(str(run), state.stamp(Path(run) / "predictions.csv"), state.stamp(Path(run) / "metrics.json"))


def operating_point(run: Path) -> tuple[operating.Point | None, str | None]:
    """The operating point chosen in the sidebar for ``run``, and why another was used instead (a
    site profile that cannot be used, or a point the run lacks): then the run's own decides."""
    choice = st.session_state.get(OPERATING_KEY, "run")
    points = operating_points(run)
    if choice == "site":
        up = st.session_state.get(SITE_UPLOAD_KEY)
        path = (st.session_state.get(SITE_PATH_KEY) or "").strip()
        if up is None and not path:
            return points.get("run"), "No site profile given: the run's own operating point decides."
        try:
            if up is not None:
                return operating.choose(state.run_handle(run), up.name, up.getvalue()), None
            return operating.choose(state.run_handle(run), path), None
        except operating.SiteError as exc:
            return points.get("run"), f"{exc} The run's own operating point decides."
    if choice not in points:
        return points.get("run"), f"This run has no {operating.TITLES.get(choice, choice)} operating point."
    return points[choice], None


SITE_TABLE = "site_calibration.json"  # the measured site-calibration table of a run (tests/benchmarks/bench_site.py)


@st.cache_data(max_entries=8, show_spinner=False)
def _site_table(run: str, file_stamp: tuple | None) -> dict | None:
    path = Path(run) / SITE_TABLE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def site_calibration(run: Path) -> dict | None:
    """The run's site_calibration.json (how a site's own operating point did on held-out
    collections), or None without one."""
    return _site_table(str(run), state.stamp(Path(run) / SITE_TABLE))
