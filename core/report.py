"""One-page case report for one explained film (HTML and PDF), and small helpers around a decision.

The report shows the answer, the heatmap on the original film, the trust panel of
:mod:`core.trust` and the severity estimate of :mod:`core.severity`. The HTML is self-contained
(images embedded as base64 PNG); the PDF is drawn with fpdf2. Both only ever receive pixel
arrays, numbers and sentences made by ``core``: no file name, no DICOM header is passed in, so no
patient identifier can end up in them. Every text field of the HTML is escaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import html
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from fpdf import FPDF
from PIL import Image

from core import checks, config, operating

if TYPE_CHECKING:
    from core.uncertainty import Spread

DISCLAIMER = "Research use only, not for diagnosis."


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a grey (H, W) array in [0, 255] or an RGB uint8 (H, W, 3) array as PNG bytes."""
    arr = np.asarray(image)
    arr = np.clip(arr, 0, 255).astype(np.uint8) if arr.dtype != np.uint8 else arr
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    """Encode a grey or RGB uint8 picture as JPEG bytes (for display: smaller and faster than PNG)."""
    arr = np.asarray(image)
    arr = np.clip(arr, 0, 255).astype(np.uint8) if arr.dtype != np.uint8 else arr
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def data_uri(image: np.ndarray, quality: int = 90) -> str:
    """A ``data:image/jpeg;base64,...`` URI of a picture (for a plotly image trace)."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(image, quality)).decode("ascii")


def _img_tag(image: np.ndarray, alt: str) -> str:
    b64 = base64.b64encode(png_bytes(image)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def decision(p_covid: float, threshold: float) -> str:
    """The call at an operating point: ``"covid"`` when P(covid) >= threshold, else ``"not covid"``."""
    return "covid" if float(p_covid) >= float(threshold) else "not covid"


def misclassified(predictions: pd.DataFrame, threshold: float, split: str = "test") -> pd.DataFrame:
    """False positives and false negatives for COVID-19 at ``threshold`` among ``split`` rows.

    ``predictions`` is a run's predictions.csv table (columns ``label``, ``split``, ``p_covid``).
    Returns those rows with added ``error`` (``"false positive"``/``"false negative"``) and
    ``confidence`` (how far the model's P(covid) leaned the wrong way: p for a false positive,
    1 - p for a false negative), most confident first.
    """
    df = predictions
    if "split" in df.columns and split:
        df = df[df["split"] == split]
    truth = df["label"].astype(str) == "covid"
    called = df["p_covid"].astype(float) >= float(threshold)
    out = df[truth != called].copy()
    is_fp = out["label"].astype(str) != "covid"
    out["error"] = np.where(is_fp, "false positive", "false negative")
    p = out["p_covid"].astype(float)
    out["confidence"] = np.where(is_fp, p, 1.0 - p)
    return out.sort_values("confidence", ascending=False, kind="stable")


def right_for_wrong_reason(audit_table: pd.DataFrame, threshold: float, method: str | None = None,
                           n: int = 12) -> pd.DataFrame:
    """Correctly classified test images whose heatmap lies least inside the lungs.

    ``audit_table`` is a run's audit.csv (one row per image and method, with ``in_lung_share``
    and ``p_covid_original``, or ``p_covid``). The model was right at ``threshold``, but for
    reasons outside the lung fields. Returns the ``n`` rows with the lowest in-lung share.
    """
    df = audit_table
    if method is not None and "method" in df.columns:
        df = df[df["method"] == method]
    pcol = "p_covid_original" if "p_covid_original" in df.columns else "p_covid"
    truth = df["label"].astype(str) == "covid"
    called = df[pcol].astype(float) >= float(threshold)
    right = df[truth == called]
    return right.sort_values("in_lung_share", kind="stable").head(n)


def _call(p_covid: float, threshold: float | None, warnings: Sequence[str]) -> str:
    if threshold is None:
        return "no operating point (the run has no metrics.json)"
    if checks.verdict(warnings).withheld:
        return f"withheld: the image failed a plausibility check (P(covid) {p_covid:.3f})"
    return f"{decision(p_covid, threshold)} (P(covid) {p_covid:.3f} vs. threshold {threshold:.3f})"


def _p_covid(probs: Mapping[str, float]) -> float:
    return float(probs.get("covid", probs.get(config.TASKS["binary"][config.COVID_INDEX], np.nan)))


def _severity_lines(severity: Mapping | None, note: str) -> list[str]:
    if not severity:
        return [note] if note else []
    lines = []
    for name, label in (("geographic", "geographic extent"), ("opacity", "opacity")):
        e = severity.get(name)
        if e:
            lines.append(f"{label}: {e['value']:.1f} of {e['range'][1]:.0f} (80 % interval {e['low']:.1f}-"
                         f"{e['high']:.1f}; cross-validated mean error {e['cv_mae']:.1f})")
    return lines + ([note] if note else [])


MARK_HTML = {"green": "#1a7f37", "amber": "#b26b00", "red": "#c00"}
MARK_RGB = {"green": (26, 127, 55), "amber": (178, 107, 0), "red": (200, 0, 0)}
_CAVEAT = ("The heatmap shows which pixels moved the model's output, not where disease is. Models trained on public "
           "COVID-19 collections often learn the image source rather than the disease; see the model card. ")


def _facts(probs: Mapping[str, float], threshold: float | None, warnings: Sequence[str], when: _dt.datetime | None,
           run_id: str, case_id: str, method: str, point: operating.Point | None = None) -> list[tuple[str, str]]:
    """The header lines both reports start with: case, model run, date (UTC), decision, method."""
    when = when or _dt.datetime.now(_dt.UTC)
    call = _call(_p_covid(probs), threshold, warnings)
    if point is not None and not checks.verdict(warnings).withheld:  # the chosen point decided (core.operating)
        call = operating.decide(_p_covid(probs), point).sentence
    facts = [("case", case_id), ("model run", run_id), ("date (UTC)", when.strftime("%Y-%m-%d %H:%M")),
             ("decision at the operating point", call), ("explanation method", method)]
    if point is not None:
        facts.insert(4, ("operating point", f"{point.title}: {point.meaning}"))
    return facts


_HTML_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>COVID-19 CXR case report</title>
<style>
body { font-family: sans-serif; max-width: 820px; margin: 1.5em auto; color: #222; }
.disclaimer { border: 2px solid #b00; color: #b00; padding: .5em; font-weight: bold; }
figure { display: inline-block; margin: .5em; vertical-align: top; } img { width: 200px; }
figure.film img { width: 560px; }
table { border-collapse: collapse; } td { border: 1px solid #ccc; padding: .2em .6em; }
.warn { background: #fff3cd; padding: .3em 1em; }
</style></head><body>
<h1>Chest X-ray case report</h1>
"""


def case_report_html(image: np.ndarray, overlay: np.ndarray | None, probs: Mapping[str, float], threshold: float | None,
                     *, run_id: str, method: str = "gradcam", in_lung_share: float | None = None, warnings: Sequence[str] = (),
                     case_id: str = "uploaded image", when: _dt.datetime | None = None, trust: Sequence[Mapping] = (),
                     severity: Mapping | None = None, severity_note: str = "",
                     operating_point: operating.Point | None = None,
                     neighbours: pd.DataFrame | None = None,
                     uncertainty: Spread | None = None) -> str:
    """A one-page HTML case report.

    ``image`` is the grey input as the model saw it, ``overlay`` the RGB heatmap overlay on the
    original film (or None), ``probs`` maps class name -> probability (COVID-19 as ``"covid"``),
    ``threshold`` the run's operating point on P(covid) (None when the run has no metrics),
    ``run_id`` names the model, ``in_lung_share`` the share of heat inside the lung mask,
    ``warnings`` come from :func:`core.checks.image_warnings`, ``trust`` are the rows of
    :func:`core.trust.panel` and ``severity`` the estimate of :func:`core.severity.estimate`
    (with ``severity_note`` saying what it was trained on, or why there is none);
    ``operating_point`` (:mod:`core.operating`) decides instead of ``threshold`` when given, and is named;
    ``uncertainty`` the film's range of P(covid) (:mod:`core.uncertainty`, via ``core.case``), read at
    the point that decides. ``case_id`` is
    a label chosen by the caller; never pass a file name or anything read from a DICOM header.
    """
    e = html.escape
    facts = _facts(probs, threshold, warnings, when, run_id, case_id, method, operating_point)
    facts += uncertainty_facts(uncertainty, threshold, warnings, operating_point)
    if in_lung_share is not None:
        facts.append(("heat inside the lungs", f"{100 * float(in_lung_share):.0f} % of the heat inside the lungs"))
    head = "\n".join(f"<tr><td>{e(k)}</td><td>{f'<b>{e(v)}</b>' if k.startswith('decision') else e(v)}</td></tr>"
                     for k, v in facts)
    rows = "".join(f"<tr><td>{e(str(k))}</td><td>{float(v):.3f}</td></tr>" for k, v in probs.items())
    warn_html = "".join(f"<li>{e(w)}</li>" for w in warnings)
    sev = "".join(f"<li>{e(line)}</li>" for line in _severity_lines(severity, severity_note))
    return f"""{_HTML_HEAD}<p class="disclaimer">{e(DISCLAIMER)}</p>
<table>
{head}
</table>
{f'<div class="warn"><p>Warnings:</p><ul>{warn_html}</ul></div>' if warnings else ""}
<h2>Class probabilities</h2>
<table>{rows}</table>
{f"<h2>How severe it looks</h2><ul>{sev}</ul>" if sev else ""}
<div>{_html_figures(image, overlay, method)}</div>
{f"<h2>How far to trust this map</h2><table>{_html_trust(trust)}</table>" if trust else ""}
{_html_neighbours(neighbours)}
<p><small>The heatmap shows which pixels moved the model's output, not where disease is. Models
trained on public COVID-19 collections often learn the image source rather than the disease;
see the model card. {e(DISCLAIMER)}</small></p>
</body></html>
"""


def _html_figures(image: np.ndarray, overlay: np.ndarray | None, method: str) -> str:
    figs = [f"<figure>{_img_tag(image, 'input image')}<figcaption>input (as the model saw it)</figcaption></figure>"]
    if overlay is not None:
        figs.append(f"<figure class='film'>{_img_tag(overlay, 'heatmap overlay')}<figcaption>"
                    f"{html.escape(method)} heatmap on the original film ({overlay.shape[1]}x{overlay.shape[0]} px)"
                    "</figcaption></figure>")
    return "".join(figs)


def _html_trust(trust: Sequence[Mapping]) -> str:
    e = html.escape
    return "".join(
        f"<tr><td style='color:{MARK_HTML.get(r['mark'], '#000')}'>&#9679; {e(r['mark'])}</td>"
        f"<td><b>{e(str(r['title']))}</b>: {e(str(r['sentence']))}</td></tr>" for r in trust)


def _latin1(text: str) -> str:
    """fpdf2's core fonts are Latin-1: replace what they cannot draw."""
    text = str(text).replace("\u2265", ">=").replace("\u2264", "<=").replace("\u2013", "-").replace("\u2014", "-")
    return text.encode("latin-1", "replace").decode("latin-1")


def case_report_pdf(image: np.ndarray, overlay: np.ndarray | None, probs: Mapping[str, float], threshold: float | None,
                    *, run_id: str, method: str = "gradcam", in_lung_share: float | None = None, warnings: Sequence[str] = (),
                    case_id: str = "uploaded image", when: _dt.datetime | None = None, trust: Sequence[Mapping] = (),
                    severity: Mapping | None = None, severity_note: str = "",
                    operating_point: operating.Point | None = None,
                    neighbours: pd.DataFrame | None = None,
                    uncertainty: Spread | None = None) -> bytes:
    """The same report as :func:`case_report_html`, as a PDF (A4, fpdf2); same arguments."""
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(True, margin=12)
    pdf.set_creator("covid-cxr")  # no author or subject: nothing about the patient
    pdf.set_compression(False)  # page text stays readable in the file (the privacy tests search it)
    pdf.add_page()
    para = functools.partial(_para, pdf)
    para("Chest X-ray case report", 16, "B")
    para(DISCLAIMER, 10, "B", (176, 0, 0))
    pdf.ln(1)
    facts = _facts(probs, threshold, warnings, when, run_id, case_id, method, operating_point)
    facts += uncertainty_facts(uncertainty, threshold, warnings, operating_point)
    facts.append(("class probabilities", ", ".join(f"{k} {float(v):.3f}" for k, v in probs.items())))
    if in_lung_share is not None:
        facts.append(("heat inside the lungs", f"{100 * float(in_lung_share):.0f} %"))
    for k, v in facts:
        para(f"{k}: {v}", 9, "B" if k.startswith("decision") else "")
    for w in warnings:
        para(f"Warning: {w}", 9, "", (150, 90, 0))
    sev = _severity_lines(severity, severity_note)
    if sev:
        pdf.ln(1)
        para("How severe it looks", 11, "B")
        for line in sev:
            para(line)
    pdf.ln(1)
    if overlay is not None:
        _pdf_figures(pdf, image, overlay, method)
    if trust:
        para("How far to trust this map", 11, "B")
        for r in trust:
            para(f"[{r['mark']}] {r['title']}: {r['sentence']}", 8, "", MARK_RGB.get(r["mark"], (0, 0, 0)))
    _pdf_neighbours(pdf, neighbours)
    pdf.ln(1)
    para(_CAVEAT + DISCLAIMER, 7)
    return bytes(pdf.output())


def _para(pdf: FPDF, text: str, size: float = 9, style: str = "", colour: tuple = (0, 0, 0)) -> None:
    """One paragraph across the page's width, in Helvetica."""
    pdf.set_font("Helvetica", style, size)
    pdf.set_text_color(*colour)
    pdf.multi_cell(pdf.w - pdf.l_margin - pdf.r_margin, size * 0.5, _latin1(text), new_x="LMARGIN", new_y="NEXT")


def _pdf_figures(pdf: FPDF, image: np.ndarray, overlay: np.ndarray, method: str) -> None:
    """The overlay on the film (95 mm) with its caption, and the model's input (30 mm) beside it."""
    top = pdf.get_y()
    side = 95.0
    h, w = overlay.shape[:2]
    iw, ih = (side, side * h / w) if w >= h else (side * w / h, side)
    pdf.image(Image.fromarray(np.asarray(overlay, np.uint8)), x=pdf.l_margin, y=top, w=iw, h=ih)
    pdf.set_xy(pdf.l_margin, top + ih + 1)
    _para(pdf, f"{method} heatmap on the original film ({w}x{h} px)", 7)
    small = 30.0
    pdf.image(Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8)), x=pdf.l_margin + side + 4,
              y=top, w=small, h=small)
    pdf.set_xy(pdf.l_margin + side + 4, top + small + 1)
    pdf.set_font("Helvetica", "", 7)
    pdf.multi_cell(small + 20, 3.5, "input (as the model saw it)")
    pdf.set_y(top + ih + 6)


# --------------------------------------------------------------------------- nearest films (core.neighbours)
def _neighbour_lines(neighbours: pd.DataFrame | None) -> list[str]:
    """One line per nearest development film (core.neighbours.nearest), then its sentence; no file names
    (the report names no file)."""
    if neighbours is None or not len(neighbours):
        return []
    lines = [f"{i}. {r.label}, {r.source}, distance {float(r.distance):.3f}"
             for i, r in enumerate(neighbours.itertuples(), 1)]
    return lines + ([neighbours.attrs["sentence"]] if neighbours.attrs.get("sentence") else [])


def _html_neighbours(neighbours: pd.DataFrame | None) -> str:
    if neighbours is None or not len(neighbours):
        return ""
    e = html.escape
    rows = "".join(f"<tr><td>{i}</td><td>{e(str(r.label))}</td><td>{e(str(r.source))}</td>"
                   f"<td>{float(r.distance):.3f}</td></tr>" for i, r in enumerate(neighbours.itertuples(), 1))
    note = neighbours.attrs.get("sentence")
    return ("<h2>The development films it most resembles, to the model</h2><table><tr><th>#</th><th>label</th>"
            f"<th>collection</th><th>distance</th></tr>{rows}</table>" + (f"<p>{e(note)}</p>" if note else ""))


def _pdf_neighbours(pdf: FPDF, neighbours: pd.DataFrame | None) -> None:
    lines = _neighbour_lines(neighbours)
    if lines:
        _para(pdf, "The development films it most resembles, to the model", 11, "B")
        for line in lines:
            _para(pdf, line, 8)


def uncertainty_facts(spread: Spread | None, threshold: float | None, warnings: Sequence[str] = (),
                      point: operating.Point | None = None) -> list[tuple[str, str]]:
    """The report's lines on the film's range of P(covid) (:func:`core.uncertainty.facts`), read at the
    operating point that decides (``point``: its threshold, and its recalibration of P); none when withheld."""
    if spread is None or checks.verdict(warnings).withheld:
        return []
    from core import uncertainty  # lazy: core.report stays free of TensorFlow (seconds to import)

    return uncertainty.facts(*uncertainty.at_decision(spread, point, threshold))
