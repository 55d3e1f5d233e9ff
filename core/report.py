"""One-page HTML case report for one explained image, and small helpers around a decision.

The report is a self-contained HTML file (images embedded as base64 PNG) that a browser can
print to PDF. It only ever receives pixel arrays and numbers: no file name, no DICOM header is
passed in, so no patient identifier can end up in it. Every text field is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from core import config

DISCLAIMER = "Research use only, not for diagnosis."


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a grey (H, W) array in [0, 255] or an RGB uint8 (H, W, 3) array as PNG bytes."""
    arr = np.asarray(image)
    arr = np.clip(arr, 0, 255).astype(np.uint8) if arr.dtype != np.uint8 else arr
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


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


def case_report_html(
    image: np.ndarray,
    overlay: np.ndarray | None,
    probs: Mapping[str, float],
    threshold: float | None,
    *,
    run_id: str,
    method: str = "gradcam",
    in_lung_share: float | None = None,
    warnings: Sequence[str] = (),
    case_id: str = "uploaded image",
    when: _dt.datetime | None = None,
) -> str:
    """A one-page HTML case report.

    ``image`` is the grey input as the model saw it, ``overlay`` the RGB heatmap overlay (or
    None), ``probs`` maps class name -> probability (COVID-19 as ``"covid"``), ``threshold`` the
    run's operating point on P(covid) (None when the run has no metrics), ``run_id`` names the
    model, ``in_lung_share`` is the share of heat inside the lung mask, ``warnings`` come from
    :func:`core.checks.image_warnings`. ``case_id`` is a label chosen by the caller; never pass
    a file name or anything read from a DICOM header.
    """
    when = when or _dt.datetime.now(_dt.UTC)
    e = html.escape
    p_covid = float(probs.get("covid", probs.get(config.TASKS["binary"][config.COVID_INDEX], np.nan)))
    if threshold is None:
        call = "no operating point (the run has no metrics.json)"
    elif warnings:
        call = f"withheld: the image failed a plausibility check (P(covid) {p_covid:.3f})"
    else:
        call = f"{decision(p_covid, threshold)} (P(covid) {p_covid:.3f} vs. threshold {threshold:.3f})"
    rows = "".join(f"<tr><td>{e(str(k))}</td><td>{float(v):.3f}</td></tr>" for k, v in probs.items())
    lung = "n/a" if in_lung_share is None else f"{100 * float(in_lung_share):.0f} % of the heat inside the lungs"
    warn_html = "".join(f"<li>{e(w)}</li>" for w in warnings)
    figs = [f"<figure>{_img_tag(image, 'input image')}<figcaption>input (as the model saw it)</figcaption></figure>"]
    if overlay is not None:
        figs.append(
            f"<figure>{_img_tag(overlay, 'heatmap overlay')}<figcaption>{e(method)} heatmap</figcaption></figure>"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>COVID-19 CXR case report</title>
<style>
body {{ font-family: sans-serif; max-width: 800px; margin: 1.5em auto; color: #222; }}
.disclaimer {{ border: 2px solid #b00; color: #b00; padding: .5em; font-weight: bold; }}
figure {{ display: inline-block; margin: .5em; }} img {{ width: 340px; }}
table {{ border-collapse: collapse; }} td {{ border: 1px solid #ccc; padding: .2em .6em; }}
.warn {{ background: #fff3cd; padding: .3em 1em; }}
</style></head><body>
<h1>Chest X-ray case report</h1>
<p class="disclaimer">{e(DISCLAIMER)}</p>
<table>
<tr><td>case</td><td>{e(case_id)}</td></tr>
<tr><td>model run</td><td>{e(run_id)}</td></tr>
<tr><td>date (UTC)</td><td>{e(when.strftime("%Y-%m-%d %H:%M"))}</td></tr>
<tr><td>decision at the operating point</td><td><b>{e(call)}</b></td></tr>
<tr><td>explanation method</td><td>{e(method)}</td></tr>
<tr><td>heat inside the lungs</td><td>{e(lung)}</td></tr>
</table>
{f'<div class="warn"><p>Warnings:</p><ul>{warn_html}</ul></div>' if warnings else ""}
<h2>Class probabilities</h2>
<table>{rows}</table>
<div>{"".join(figs)}</div>
<p><small>The heatmap shows which pixels moved the model's output, not where disease is. Models
trained on public COVID-19 collections often learn the image source rather than the disease;
see the model card. {e(DISCLAIMER)}</small></p>
</body></html>
"""
