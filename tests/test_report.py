"""core.report: the one-page HTML case report, decisions, and the error tables."""

from __future__ import annotations

import base64
import datetime as dt
import io
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core import images, report


def _img(size=64):
    yy, xx = np.mgrid[0:size, 0:size]
    return ((xx + yy) * 255.0 / (2 * size)).astype(np.float32)


def _pngs(html: str) -> list[np.ndarray]:
    out = []
    for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html):
        out.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))))
    return out


def test_report_has_images_numbers_and_disclaimer():
    img = _img()
    over = np.dstack([img, img * 0, 255 - img]).astype(np.uint8)
    when = dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.UTC)
    html = report.case_report_html(img, over, {"covid": 0.8123, "other": 0.1877}, 0.42, run_id="run-A",
                                   method="gradcam", in_lung_share=0.731, when=when)
    assert html.startswith("<!DOCTYPE html>")
    assert "Research use only, not for diagnosis." in html
    assert "0.812" in html and "threshold 0.420" in html and "<b>covid (P(covid)" in html
    assert "73 % of the heat inside the lungs" in html
    assert "run-A" in html and "2026-01-02 03:04" in html
    pics = _pngs(html)
    assert len(pics) == 2
    assert pics[0].shape == (64, 64) and np.abs(pics[0].astype(float) - np.round(img)).max() <= 1
    assert pics[1].shape == (64, 64, 3) and np.array_equal(pics[1], over)


def test_report_withholds_decision_on_warnings_and_escapes_text():
    img = _img()
    html = report.case_report_html(img, None, {"covid": 0.9}, 0.5, run_id="<script>alert(1)</script>",
                                   warnings=["lateral <view>"], case_id="a&b")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "withheld" in html and "lateral &lt;view&gt;" in html and "a&amp;b" in html
    assert "<b>covid" not in html
    assert len(_pngs(html)) == 1


def test_report_without_operating_point():
    html = report.case_report_html(_img(), None, {"covid": 0.3}, None, run_id="r")
    assert "no operating point" in html


def _dicom_with_patient(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName = "Doe^Johnathan"
    ds.PatientID = "PID-918273"
    ds.PatientBirthDate = "19450101"
    ds.InstitutionName = "Secret Hospital"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = 64, 64
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def test_report_never_carries_dicom_patient_tags(tmp_path):
    data = _dicom_with_patient(tmp_path)
    img = images.load(data, 64, name="Doe_Johnathan.dcm")
    html = report.case_report_html(img, None, {"covid": 0.4, "other": 0.6}, 0.5, run_id="r")
    for secret in ("Doe", "Johnathan", "PID-918273", "19450101", "Secret Hospital"):
        assert secret not in html
    assert "uploaded image" in html


def test_decision():
    assert report.decision(0.5, 0.5) == "covid"
    assert report.decision(0.49, 0.5) == "not covid"


def test_misclassified_and_wrong_reason_tables():
    pred = pd.DataFrame({
        "path": list("abcdef"), "source": ["s"] * 6, "split": ["test"] * 5 + ["val"],
        "label": ["covid", "covid", "normal", "pneumonia", "normal", "normal"],
        "p_covid": [0.9, 0.2, 0.7, 0.95, 0.1, 0.99],
    })
    wrong = report.misclassified(pred, 0.5)
    assert list(wrong["path"]) == ["d", "b", "c"]  # val row f is ignored; most confident first
    assert list(wrong["error"]) == ["false positive", "false negative", "false positive"]
    assert wrong["confidence"].tolist() == pytest.approx([0.95, 0.8, 0.7])
    audit = pred.assign(method="gradcam", in_lung_share=[0.1, 0.5, 0.9, 0.2, 0.05, 0.3]).rename(
        columns={"p_covid": "p_covid_original"})
    right = report.right_for_wrong_reason(audit, 0.5, "gradcam", n=2)
    assert list(right["path"]) == ["e", "a"]  # right at 0.5, lowest in-lung share first


TRUST = [{"key": "lungs", "title": "Heat on the lungs", "mark": "red", "sentence": "The map avoids the lungs."},
         {"key": "sanity", "title": "Randomisation check", "mark": "green", "sentence": "Grad-CAM passed."}]
SEVERITY = {"geographic": {"value": 4.2, "low": 2.1, "high": 6.0, "cv_mae": 1.4, "range": [0.0, 8.0]},
            "opacity": {"value": 2.5, "low": 1.2, "high": 3.9, "cv_mae": 1.0, "range": [0.0, 6.0]}}


def test_report_carries_film_overlay_trust_panel_and_severity():
    img = _img()
    film = np.dstack([_img(300)] * 3).astype(np.uint8)[:200]  # a 300x200 'original film' overlay
    kw = dict(run_id="run-A", trust=TRUST, severity=SEVERITY, severity_note="It was trained on about a hundred films.")
    html = report.case_report_html(img, film, {"covid": 0.8, "other": 0.2}, 0.5, **kw)
    assert "How far to trust this map" in html and "The map avoids the lungs." in html and "#c00" in html
    assert "geographic extent: 4.2 of 8 (80 % interval 2.1-6.0" in html and "about a hundred" in html
    pics = _pngs(html)
    assert pics[1].shape == (200, 300, 3) and "300x200 px" in html
    pdf = report.case_report_pdf(img, film, {"covid": 0.8, "other": 0.2}, 0.5, **kw)
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    for text in (b"How far to trust this map", b"[red] Heat on the lungs", b"geographic extent: 4.2 of 8",
                 b"Research use only, not for diagnosis.", b"run-A"):
        assert text in pdf, text
    assert pdf.count(b"/Subtype /Image") == 2


def test_pdf_withholds_and_never_carries_dicom_tags(tmp_path):
    data = _dicom_with_patient(tmp_path)
    img = images.load(data, 64, name="Doe_Johnathan.dcm")
    pdf = report.case_report_pdf(img, None, {"covid": 0.9, "other": 0.1}, 0.5, run_id="r", warnings=["lateral"])
    assert b"withheld" in pdf and b"Warning: lateral" in pdf
    for secret in (b"Doe", b"Johnathan", b"PID-918273", b"19450101", b"Secret Hospital"):
        assert secret not in pdf
