"""Pieces shared by several pages: the explanation controls and one explained case.

Layout only: probabilities, heatmaps, lung masks, warnings and the report all come from ``core``
through :mod:`dashboard.state`.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from core import (
    calibrate,
    checks,
    explain,
    images,
    inputs,
    operating,
    report,
    runs,
    severity,
    trust,
    uncertainty,
    work,
)
from core import case as ccase
from core.explain import registry
from core.explain.registry import SLOW  # the methods that take seconds
from dashboard import points, state

MARK_COLOUR = {"green": "green", "amber": "orange", "red": "red"}
TRUST_TITLE = "How far to trust this map"
FIG_HEIGHT = 620  # pixels of one overlay figure
QUEUED = ("Queued: the server is busy with other people's films ({ahead} waiting before yours; it analyses "
          "{slots} at a time). Yours starts as soon as a place is free.")
WAITED = "This film waited {s:.1f} s in line: the server was busy with other people's films."
# Markdown's (and Streamlit's: ``:blue[..]``, ``:emoji:``, ``$math$``) punctuation, escaped by plain()
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+!|<>~$:&])")
_LIST_START = re.compile(r"^(\s*\d*)([-.)])")  # "- x" or "1. x" at the start would make a list


def plain(value) -> str:
    """``value`` as text that Streamlit's Markdown (captions, st.markdown, alerts) shows literally.

    Text from data tables and run files (a ``source``, a path, a label, an error naming a file)
    may hold ``![x](http://host/x.png)`` or ``[link](...)``: rendered as Markdown, the browser
    would fetch the image or show a link. Every Markdown character is backslash-escaped and line
    breaks become spaces, so the text reads as written and nothing is fetched or linked.
    """
    text = _MARKDOWN.sub(r"\\\1", " ".join(str(value).splitlines()))
    return _LIST_START.sub(r"\1\\\2", text, count=1)


def usable_methods(run: Path) -> tuple[list[str], str | None]:
    """The explanation methods that apply to the run's model (registry order), and one caption
    naming the others and why (None when every method applies): a black box (a SavedModel
    signature) has no reachable convolution layer, and may have no gradients."""
    why = explain.applicable(state.model(run))
    usable = [m for m in explain.METHODS if why.get(m) is None]
    left: dict[str, list[str]] = {}
    for method, reason in why.items():
        if reason:
            left.setdefault(reason, []).append(explain.TITLES.get(method, method))
    caption = " ".join(f"Not available for this model: {', '.join(titles)} ({reason})." for reason, titles in left.items())
    return usable, caption or None


def controls(run: Path, key: str) -> dict:
    """Method, class and layer widgets (they change the maps); returns the choices. Only the methods
    that apply to the run's model are offered; a caption names the others and why."""
    classes = state.run_classes(run)
    methods, caption = usable_methods(run)
    c1, c4, c5 = st.columns([3, 1.2, 1.6])
    chosen = c1.multiselect(
        "Explanation methods", methods, default=["gradcam"] if "gradcam" in methods else methods[:1],
        key=f"{key}_methods",
        format_func=lambda m: explain.TITLES.get(m, m) + (" (slow)" if m in SLOW else ""),
        help="Grad-CAM is fast; Score-CAM, SmoothGrad, occlusion and RISE run the model many times and take "
             "seconds.",
    )
    if caption:
        c1.caption(caption)
    class_index = c4.selectbox("Class", range(len(classes)), format_func=lambda i: classes[i],
                               key=f"{key}_class", help="Which class's score the maps explain.")
    cams = any(registry.get(m).kind == "cam" for m in methods)
    layers = state.conv_layers(str(run)) if cams else []
    layer = c5.selectbox("Layer", layers, key=f"{key}_layer",
                         help="Convolution layer for the CAM methods (default: the last one).") if layers else None
    return {"methods": chosen, "class_index": int(class_index), "layer": layer}


def view_controls(key: str) -> dict:
    """View, opacity, colormap, lung outline and wipe position: they only redraw, never rerun the model."""
    c1, c2, c3, c4, c5 = st.columns([2.2, 1.2, 1.2, 1.1, 1.3])
    view = c1.radio("View", list(explain.VIEWS), horizontal=True, key=f"{key}_view",
                    help="Overlay; the film and the overlay side by side (zoom one, both follow); or a wipe "
                         "that shows the overlay left of the slider and the bare film right of it.")
    alpha = c2.slider("Opacity", 0.0, 1.0, 0.4, 0.05, key=f"{key}_alpha")
    cmaps = explain.colormaps()
    cmap = c3.selectbox("Colormap", cmaps, index=cmaps.index("jet") if "jet" in cmaps else 0, key=f"{key}_cmap")
    outline = c4.toggle("Lung outline", value=False, key=f"{key}_outline",
                        help="Draw the outline of the lungs found by the lung segmentation.")
    position = 0.5
    if view == "wipe":
        position = c5.slider("Wipe", 0.0, 1.0, 0.5, 0.01, key=f"{key}_wipe",
                             help="Where the overlay gives way to the bare film.")
    return {"view": view, "alpha": alpha, "colormap": cmap, "outline": outline, "position": position}


def show_probabilities(run: Path, probs: np.ndarray, warnings: list[str], chosen: tuple | None = None) -> str:
    """P(covid), every class of a multiclass run, and the decision at the operating point
    (``chosen``: :func:`dashboard.points.operating_point`'s answer, when the caller already has it).

    When the warnings withhold the answer (:func:`core.checks.verdict`, the rule core.predict and
    core.explain follow too), no decision is shown (only the raw output, folded away). Returns the
    text of the decision for the report.
    """
    classes = state.run_classes(run)
    point, why = chosen or points.operating_point(run)  # the sidebar's choice (core.operating)
    thr = point.threshold if point is not None else None
    p_covid = float(probs[state.run_handle(run).positive_index])
    for w in warnings:
        st.warning(w)
    if checks.verdict(warnings).withheld:
        st.info(checks.WITHHELD[:-1] + " above.")
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
    decided = operating.decide(p_covid, point)
    colour = "red" if decided.call == "covid" else "green"
    with st.container(border=True):
        named = "run's" if point.name == "run" else f"**{plain(point.title)}**"
        st.markdown(f"Decision at the {named} operating point: **:{colour}[{decided.call}]**")
        st.caption(plain(decided.sentence) + ". " + plain(point.meaning[0].upper() + point.meaning[1:]) + ".")
        if why:
            st.warning(plain(why))
    operating_meanings()
    return decided.call


def operating_meanings() -> None:
    """One sentence on what each operating point means (the sidebar chooses one)."""
    with st.expander("What the operating points mean"):
        for name in (*operating.NAMED, "site"):
            st.markdown(f"**{operating.TITLES[name].capitalize()}**: {operating.MEANING[name]}.")


def operating_sidebar(run: Path | None) -> None:
    """The sidebar's operating point: the run's own, rule-out, balanced, or a site profile (a path
    to a SITE.json written by core.calibrate, or an upload); a refused profile is named there."""
    st.selectbox("Operating point", [*operating.NAMED, "site"], key=points.OPERATING_KEY,
                 format_func=lambda k: operating.TITLES[k].capitalize(),
                 help="Which threshold turns P(covid) into a call on the Explain page and in the case report.")
    if st.session_state.get(points.OPERATING_KEY) == "site":
        st.text_input("Site profile (path to SITE.json)", key=points.SITE_PATH_KEY,
                      help="Written by `python -m core.calibrate` on the site's own labelled films.")
        st.file_uploader("or upload SITE.json", type=["json"], key=points.SITE_UPLOAD_KEY)
    if run is not None:
        point, why = points.operating_point(run)
        if why:
            st.caption(plain(why))
        elif point is not None:
            st.caption(f"Threshold {point.threshold:.3f} on P(covid)" + (" (recalibrated)" if point.recalibration else ""))


def severity_for(run: Path, entry: ccase.Case, call: str) -> tuple[dict | None, str]:
    """The severity estimate of an analysed film (:func:`dashboard.state.case`) the classifier
    calls COVID-19, or None and why not."""
    if call != "covid":
        return None, "Severity is estimated only for films the classifier calls COVID-19."
    record = state.severity_record()
    if record is None:
        return None, "No severity model is installed (`python -m core.severity train`)."
    why = severity.usable(record, state.model_sha256(run))
    if why:
        return None, f"No severity estimate: {why}."
    return state.severity(run, entry), severity.TRAINED_ON.format(
        n=record["cv"]["n_images"], p=record["cv"]["n_patients"])


def show_severity(est: dict | None, note: str) -> None:
    """Geographic extent and opacity with their uncertainty, or the reason there is none."""
    if est is None:
        st.caption(note)
        return
    with st.container(border=True):
        st.markdown("**How severe it looks** (expert-score estimate)")
        c1, c2 = st.columns(2)
        for col, name, label in ((c1, "geographic", "Geographic extent"), (c2, "opacity", "Opacity")):
            e = est[name]
            col.metric(f"{label} (0-{e['range'][1]:.0f})", f"{e['value']:.1f}",
                       help=f"80 % interval {e['low']:.1f}-{e['high']:.1f}; cross-validated mean error ±{e['cv_mae']:.1f}")
            col.caption(f"80 % interval {e['low']:.1f}-{e['high']:.1f} (typical error ±{e['cv_mae']:.1f})")
        st.caption(note + " An estimate of how experts would score the film, not a measurement.")


def trust_panel(rows: list[dict]) -> None:
    """The trust rows computed by core.trust: one sentence and a coloured mark each."""
    worst = trust.overall(rows)
    st.markdown(f"**{TRUST_TITLE}** :{MARK_COLOUR[worst]}[●]")
    for r in rows:
        st.markdown(f":{MARK_COLOUR[r['mark']]}[●] **{r['title']}:** {r['sentence']}")
    st.caption("Marks: green = nothing found against it, orange = cannot be judged or uninformative, "
               "red = a reason to distrust it. Cut-offs: `core/trust.py` THRESHOLDS.")


def figure(pics: list[np.ndarray], titles: list[str], height: int | None = None):
    """A plotly figure of one or two pictures side by side with linked zoom (one zoom box moves both)."""
    n = len(pics)
    height = height or (FIG_HEIGHT if n == 1 else int(FIG_HEIGHT * 0.62))
    traces, layout, notes = [], {}, []
    for i, pic in enumerate(pics):
        ax = "" if i == 0 else str(i + 1)
        traces.append(go.Image(source=report.data_uri(pic), xaxis=f"x{ax}", yaxis=f"y{ax}", hoverinfo="skip"))
        linked = {"matches": "x"} if i else {}
        layout[f"xaxis{ax}"] = {"domain": [i / n + 0.005 * (i > 0), (i + 1) / n - 0.005 * (i < n - 1)],
                                "visible": False, "constrain": "domain", **linked}
        layout[f"yaxis{ax}"] = {"visible": False, "scaleanchor": f"x{ax}", "constrain": "domain",
                                "constraintoward": "top",
                                **({"matches": "y"} if i else {})}
        notes.append({"text": titles[i], "xref": "paper", "yref": "paper", "x": (i + 0.5) / n, "y": 1.0,
                      "yanchor": "bottom", "showarrow": False})
    return go.Figure(traces, {**layout, "annotations": notes, "height": height, "dragmode": "zoom",
                              "margin": {"l": 0, "r": 0, "t": 28, "b": 0},
                              "paper_bgcolor": "rgba(0,0,0,0)", "plot_bgcolor": "rgba(0,0,0,0)"})


def show_case(run: Path, data: bytes, name: str, *, colour_check: bool = True, case_id: str = "uploaded image",
              key: str = "case") -> None:
    """Answer, severity, heatmaps on the original film with a trust panel each, and downloads.

    ``data`` are the film's bytes and ``name`` its file name; ``colour_check`` for uploads (the
    colour check needs the original bytes). The film is analysed once per session
    (:func:`dashboard.state.case`: decode, checks, network input, lung mask, probabilities,
    features and the maps, in one model slot; "queued" is shown while it waits for one); reruns
    for the controls only look it up, and view changes (opacity, colormap, outline, view, wipe)
    rerun only a fragment that redraws.
    """
    notice, head, ctrl = st.empty(), st.container(), st.empty()
    with ctrl.container():
        opts = controls(run, key)
    if not opts["methods"]:
        st.info("Pick at least one explanation method.")
        return
    ci, layer = opts["class_index"], opts["layer"]

    def queued(ahead: int) -> None:
        notice.info(QUEUED.format(ahead=ahead, slots=work.slots()), icon=":material/hourglass_top:")

    try:
        with st.spinner("Score-CAM, SmoothGrad, occlusion and RISE take seconds...") if SLOW & set(opts["methods"]) else nullcontext():
            entry, waited = state.case(run, data, name, colour_check=colour_check,
                                       maps=[(m, ci, layer) for m in opts["methods"]], on_wait=queued)
    except images.ImageError as exc:
        notice.empty()
        ctrl.empty()
        st.error(plain(state.error_sentence(exc)))
        return
    if waited is not None:
        notice.caption(WAITED.format(s=waited))
    classes = state.run_classes(run)
    maps = [{"method": method, "title": explain.TITLES.get(method, method),
             "heat": entry.maps[(method, ci, layer)]["heat"],
             "rows": ccase.trust_rows(state.run_handle(run), entry, method, ci, layer, model=state.model(run),
                                      audit_summary=state.audit_summary(run), reference=state.ood_reference(run))}
            for method in opts["methods"]]
    with head:
        chosen = points.operating_point(run)  # resolved once: a site profile is a file to read and check
        call, est, note = _answer(run, entry, chosen)
    probs_d = {c: float(p) for c, p in zip(classes, entry.probs, strict=False)}
    case = {"run": run, "x": entry.x, "film": entry.shown, "box": entry.box, "mask": entry.lungs, "maps": maps,
            "probs": probs_d, "warnings": entry.warnings, "severity": est, "severity_note": note,
            "case_id": case_id, "class_name": classes[ci], "threshold": state.threshold(run),
            "operating_point": chosen[0],
            "run_label": state.run_label(str(run)), "spread": entry.spread}
    _views(case, key)
    case["neighbours"] = show_neighbours(run, entry, call, name)
    downloads(case, key)
    with st.expander("What the network sees"):
        st.image(entry.x.astype(np.uint8), caption="input (as the model sees it)", clamp=True, width=256)
    st.caption("Heatmaps show which pixels moved the model's score, not where disease is. "
               "Research use only, not for diagnosis.")


def _answer(run: Path, entry: ccase.Case, chosen: tuple) -> tuple:
    """The answer block: P(covid) and the decision, the fallback warning, and unless withheld the film's
    range of P(covid) and the severity estimate; returns (call, severity estimate, its note)."""
    call = show_probabilities(run, entry.probs, entry.warnings, chosen)
    if entry.fell_back:
        st.warning(inputs.FALLBACK_WARNING)
    if checks.verdict(entry.warnings).withheld:
        return call, None, ""
    show_uncertainty(entry.spread, chosen[0], state.threshold(run))
    est, note = severity_for(run, entry, call)
    show_severity(est, note)
    return call, est, note


@st.fragment
def _views(case: dict, key: str) -> None:
    """The redraw-only part of a case: view controls, one figure and trust panel per map."""
    v = view_controls(key)
    outline = case["mask"] if v["outline"] else None
    for m in case["maps"]:
        lung = trust.row(m["rows"], "lungs")
        if lung is not None and lung["mark"] == "red":
            st.warning(f"{m['title']}: {lung['sentence']}")
        pics = explain.film_views(case["film"], m["heat"], v["view"], v["alpha"], v["colormap"], outline,
                                  case["box"], v["position"])
        titles = {"overlay": [m["title"]], "side by side": ["film", m["title"]],
                  "wipe": [f"{m['title']} | film"]}[v["view"]]
        left, right = st.columns([3, 2])
        with left:
            st.plotly_chart(figure(pics, titles), key=f"{key}_fig_{m['method']}",
                            config={"displaylogo": False, "scrollZoom": True})
            st.caption(f"{m['title']} for {plain(case['class_name'])} on the film at "
                       f"{case['film'].shape[1]}x{case['film'].shape[0]} px (drag to zoom, double-click to reset)")
        with right:
            trust_panel(m["rows"])
    case["view"] = v  # read by the downloads at click time (they live outside this fragment)


def downloads(case: dict, key: str) -> None:
    """Overlay PNG and case report (HTML, PDF) of the first map with the view settings in force
    when clicked; generated on click (deferred), so redraws stay cheap."""
    def first_overlay():
        v = case["view"]
        m = case["maps"][0]
        outline = case["mask"] if v["outline"] else None
        return m, explain.film_views(case["film"], m["heat"], "overlay", v["alpha"], v["colormap"], outline,
                                     case["box"])[0]

    def report_args(m):
        return dict(probs=case["probs"], threshold=case["threshold"], run_id=case["run_label"], method=m["method"],
                    trust=m["rows"], severity=case["severity"], severity_note=case["severity_note"],
                    warnings=case["warnings"], case_id=case["case_id"], operating_point=case.get("operating_point"),
                    neighbours=case.get("neighbours"), uncertainty=case.get("spread"))

    def png():
        return report.png_bytes(first_overlay()[1])

    def html():
        m, over = first_overlay()
        return report.case_report_html(case["x"], over, **report_args(m))

    def pdf():
        m, over = first_overlay()
        return report.case_report_pdf(case["x"], over, **report_args(m))

    method = case["maps"][0]["method"]
    d1, d2, d3 = st.columns(3)
    d1.download_button("Download overlay (PNG)", png, file_name=f"overlay-{method}.png", mime="image/png",
                       key=f"{key}_dl_png", on_click="ignore")
    d2.download_button("Download case report (HTML)", html, file_name="case-report.html", mime="text/html",
                       key=f"{key}_dl_html", on_click="ignore")
    d3.download_button("Download case report (PDF)", pdf, file_name="case-report.pdf", mime="application/pdf",
                       key=f"{key}_dl_pdf", on_click="ignore")


def site_calibration_table(run: Path) -> None:
    """The measured table of a site's own operating point on held-out collections (core.calibrate),
    beside the leave-one-source-out table; nothing when the run has none."""
    try:
        doc = points.site_calibration(run)
        table = calibrate.site_table(doc) if doc else None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a corrupt file spoils only this table
        st.warning(f"This run's {points.SITE_TABLE} cannot be read ({plain(type(exc).__name__)}: {plain(exc)}).")
        return
    if table is None:
        return
    st.markdown("**With a site's own operating point** (`python -m core.calibrate` on k of the held-out "
                "collection's films, scored on the rest)")
    st.dataframe(table, hide_index=True, key="eval_site_calibration")
    st.caption(plain(f"{doc.get('draws')} random patient-grouped draws per row; {doc.get('models')}. A source "
                     "without COVID-19 films can only set a specificity target (its sensitivity is on the fold "
                     "run's internal COVID-19 test films); a COVID-19-only source only a sensitivity target."))


NEIGHBOUR_THUMB = 160  # px of a nearest film's thumbnail


def show_neighbours(run: Path, entry: ccase.Case, call: str, name: str):
    """The development films the case most resembles, to the model (core.neighbours), with their
    thumbnails (through the one image path), label, collection and distance; returns the table for
    the case report, None when the run has no neighbour index or its model no reachable features."""
    try:
        table = ccase.neighbours(state.run_handle(run), entry, call=call, exclude=(name,))
    except runs.RunError as exc:
        st.caption(plain(state.error_sentence(exc)))
        return None
    if table is None or table.empty:
        return None
    st.subheader("The development films it most resembles, to the model")
    if table.attrs.get("sentence"):
        st.warning(plain(table.attrs["sentence"]))
    root = state.data_root()
    for col, r in zip(st.columns(len(table)), table.itertuples(), strict=True):
        text = plain(f"{r.label} · {r.source} · distance {r.distance:.3f}")
        try:
            thumb = state.dataset_image(str(root), r.path, NEIGHBOUR_THUMB) if state.has_data(root) else None
        except images.ImageError:
            thumb = None
        if thumb is not None:
            col.image(thumb.astype(np.uint8), caption=text)
        else:
            col.caption(plain(r.path) + " · " + text)
    st.caption("Nearest in the model's penultimate features (cosine distance of standardised features: 0 = the "
               "same direction). Films alike to the model are not alike in disease; similar films from one "
               "collection suggest the model keys on how a collection's films look.")
    return table


MAP_COLOURS = {"collection": "source", "label": "label", "outcome": "outcome", "split": "split"}


def show_feature_map(run: Path, info: dict | None) -> None:
    """The map of the model's features (core.feature_map, computed by core.audit): one point per film,
    coloured by collection, label or outcome; hovering shows its path and P(COVID-19), selecting one
    opens it on the Explain page."""
    if not info or info.get("reason"):
        st.info(plain((info or {}).get("reason") or "This run's audit has no map of the model's features: run "
                                                  "`python -m core.feature_map --run RUN --data DIR`."))
        return
    try:
        table = state.feature_map_table(run)
    except runs.RunError as exc:
        st.error(plain(state.error_sentence(exc)))
        return
    if table is None or table.empty:
        st.info(f"The run has no {info.get('file', 'feature_map.csv')}: run `python -m core.feature_map --run RUN`.")
        return
    by = st.radio("Colour by", list(MAP_COLOURS), horizontal=True, key="sc_map_by")
    fig = px.scatter(table.fillna({"outcome": ""}), x="x", y="y", color=table[MAP_COLOURS[by]].astype(str),
                     custom_data=["path"], hover_name="path", height=560,
                     hover_data={"p": ":.3f", "label": True, "source": True, "split": True, "x": False, "y": False})
    fig.update_traces(marker={"size": 6, "opacity": 0.75})
    fig.update_layout(xaxis={"visible": False}, yaxis={"visible": False}, legend_title_text=by,
                      margin={"l": 0, "r": 0, "t": 10, "b": 0})
    event = st.plotly_chart(fig, key="sc_map", on_select="rerun", selection_mode=("points", "box"))
    points = (event or {}).get("selection", {}).get("points") or []
    picked = next((p.get("customdata") for p in points if p.get("customdata")), None)
    if picked:  # the Explain page reads this key first and opens the film (views/explain.py)
        st.session_state["explain_open"] = picked[0] if isinstance(picked, list) else picked
        st.switch_page("views/explain.py")
    st.caption(plain(f"{len(table)} films, {info.get('method', 'tsne')} of the model's penultimate features; "
                     f"trustworthiness {info.get('trustworthiness', float('nan')):.2f} at k={info.get('trust_k', 10)} "
                     "(1 = each film's nearest films in the map are its nearest to the model). p is P(COVID-19). "
                     "Islands of one collection mean the features encode where a film came from. Click a point "
                     "(or box-select: the first film selected) to open it on the Explain page."))


def show_uncertainty(spread, point: operating.Point | None, threshold: float | None) -> None:
    """The film's range of P(covid) (core.uncertainty via core.case) and its sentence, read at the operating
    point that decides (else at ``threshold``); a warning when it crosses that point's threshold."""
    if spread is None:
        return
    spread, threshold = uncertainty.at_decision(spread, point, threshold)
    text = uncertainty.sentence(spread, threshold)
    if uncertainty.crosses(spread, threshold):
        st.warning(text, icon=":material/help:")
    else:
        st.caption(text)
