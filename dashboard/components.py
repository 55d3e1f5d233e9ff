"""Pieces shared by several pages: the explanation controls and one explained case.

Layout only: probabilities, heatmaps, lung masks, warnings and the report all come from ``core``
through :mod:`dashboard.state`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from core import checks, report
from dashboard import state

OUTSIDE_LUNGS = 0.5  # warn when less than this share of a map's heat lies inside the lungs
SLOW = {"scorecam", "smoothgrad"}


def controls(run: Path, key: str) -> dict:
    """Method, opacity, colormap, class and layer widgets; returns the choices."""
    from core import explain

    classes = state.run_classes(run)
    methods = list(explain.METHODS)
    c1, c2, c3, c4, c5 = st.columns([3, 1.2, 1.2, 1.2, 1.6])
    chosen = c1.multiselect(
        "Explanation methods", methods, default=["gradcam"], key=f"{key}_methods",
        format_func=lambda m: explain.TITLES.get(m, m) + (" (slow)" if m in SLOW else ""),
        help="Grad-CAM is fast; Score-CAM and SmoothGrad run the model many times and take seconds.",
    )
    alpha = c2.slider("Opacity", 0.0, 1.0, 0.4, 0.05, key=f"{key}_alpha")
    cmaps = explain.colormaps()
    cmap = c3.selectbox("Colormap", cmaps, index=cmaps.index("jet") if "jet" in cmaps else 0, key=f"{key}_cmap")
    class_index = c4.selectbox("Class", range(len(classes)), format_func=lambda i: classes[i],
                               key=f"{key}_class", help="Which class's score the maps explain.")
    layers = state.conv_layers(str(run))
    layer = c5.selectbox("Layer", layers, key=f"{key}_layer",
                         help="Convolution layer for the CAM methods (default: the last one).")
    return {"methods": chosen, "alpha": alpha, "colormap": cmap, "class_index": int(class_index), "layer": layer}


def show_probabilities(run: Path, probs: np.ndarray, warnings: list[str]) -> str:
    """P(covid), every class of a multiclass run, and the decision at the operating point.

    With warnings, no decision is shown (only the raw output, folded away). Returns the text of
    the decision for the report.
    """
    classes = state.run_classes(run)
    thr = state.threshold(run)
    p_covid = float(probs[0])
    for w in warnings:
        st.warning(w)
    if warnings:
        st.info("No answer is given for this image because it failed a plausibility check above.")
        with st.expander("The model's raw output anyway (not meaningful for such an image)"):
            st.write({c: round(float(p), 4) for c, p in zip(classes, probs, strict=False)})
        return "withheld"
    cols = st.columns(len(classes) + 1)
    cols[0].metric("P(covid)", f"{p_covid:.3f}")
    for col, c, p in zip(cols[1:], classes[1:], probs[1:], strict=False):
        col.metric(f"P({c})", f"{float(p):.3f}")
    if thr is None:
        st.info("This run has no metrics.json, so it has no operating point: run `python -m core.evaluate --run RUN`.")
        return "no operating point"
    call = report.decision(p_covid, thr)
    colour = "red" if call == "covid" else "green"
    with st.container(border=True):
        st.markdown(f"Decision at the run's operating point (P(covid) ≥ {thr:.3f}, chosen on validation data): "
                    f"**:{colour}[{call}]**")
    return call


def show_case(run: Path, image: np.ndarray, *, native: np.ndarray | None = None, data: bytes | None = None,
              case_id: str = "uploaded image", key: str = "case") -> None:
    """Probabilities, decision, heatmaps with in-lung share, and downloads for one image.

    ``image`` is the raw grey array at the model's size, ``native`` the same image at its own
    size (for the checks), ``data`` the original bytes (for the colour check).
    """
    # The page is laid out top to bottom (answer, controls, maps), but filled in the order that
    # shows the maps soonest: a placeholder for the answer, then the maps, then the answer, then
    # the lung shares (the lung net is the slowest step).
    head = st.container()
    opts = controls(run, key)
    if not opts["methods"]:
        st.info("Pick at least one explanation method.")
        return
    classes = state.run_classes(run)
    from core import explain

    # At least 4 columns so that one or two maps stay a readable size on a wide screen.
    cols = st.columns(max(len(opts["methods"]) + 1, 4))
    cols[0].image(image.astype(np.uint8), caption="input (as the model sees it)", clamp=True, width="stretch")
    maps = []
    for col, method in zip(cols[1:], opts["methods"], strict=False):
        title = explain.TITLES.get(method, method)
        with col, st.spinner(f"{title}..."):
            hmap = state.heatmap(str(run), image, method, opts["class_index"], opts["layer"])
            over = explain.overlay(image, hmap, opts["alpha"], opts["colormap"])
            st.image(over, caption=f"{title} for {classes[opts['class_index']]}", width="stretch",
                     alt=f"heatmap overlay {method}")
            maps.append((method, title, hmap, over, st.empty()))
    warnings = checks.image_warnings(native if native is not None else image, data)
    probs = state.probabilities(str(run), image)
    with head:
        show_probabilities(run, probs, warnings)
    mask = state.lung_mask(image)
    first = None
    for method, title, hmap, over, slot in maps:
        tr = state.trust(hmap, mask) or {}
        share, area = tr.get("in_lung_share"), tr.get("lung_area_share")
        with slot.container():
            if share is None:
                st.caption("In-lung share unavailable (no lung model).")
                where = None
            else:
                where = f"{100 * share:.0f} % of the heat lies in the lungs, which cover {100 * area:.0f} % of the image."
            if share is not None and share < OUTSIDE_LUNGS:
                st.warning(f"{title}: most of the heat lies outside the lungs. {where} The model may be "
                           "looking at labels, markers, borders or body shape rather than the lungs.")
            elif where:
                st.caption(where)
        if first is None:
            first = (method, over, share)
    method, over, share = first
    probs_d = {c: float(p) for c, p in zip(classes, probs, strict=False)}
    html = report.case_report_html(
        image, over, probs_d, state.threshold(run), run_id=state.run_label(str(run)), method=method,
        in_lung_share=share, warnings=warnings, case_id=case_id,
    )
    d1, d2 = st.columns(2)
    d1.download_button("Download overlay (PNG)", report.png_bytes(over), file_name=f"overlay-{method}.png",
                       mime="image/png", key=f"{key}_dl_png", on_click="ignore")
    d2.download_button("Download case report (HTML)", html, file_name="case-report.html", mime="text/html",
                       key=f"{key}_dl_html", on_click="ignore")
    st.caption("Heatmaps show which pixels moved the model's score, not where disease is. "
               "Research use only, not for diagnosis.")
