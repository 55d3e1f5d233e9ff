"""Privacy: DICOM patient tags never leave the decoder; uploads stay in memory.

A DICOM file is built in the test with PatientName / PatientID / PatientBirthDate (and a few
other identifying tags). It goes through the decoder, the CLIs, the training cache, the case
report and the dashboard; the tag values must never appear in captured logs, warnings,
stdout/stderr, anything written to disk, the report HTML or the page. An upload is decoded from
bytes in memory: nothing under the repository or the temp folder is created or changed.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from robust_util import (
    WRITE_WATCH,
    brightness_run,
    dicom_bytes,
    env_without_secrets,
    json_or_none,
    png_bytes,
    tree_listing,
    xray_like,
)

from core import config, images

REPO = config.REPO_ROOT
PY = sys.executable

PHI = {
    "PatientName": "Doe^Jane^Quincy",
    "PatientID": "MRN-77341902",
    "PatientBirthDate": "19510317",
    "OtherPatientIDs": "SSN-555-31-4242",
    "InstitutionName": "Zyxwvut Memorial Hospital",
    "ReferringPhysicianName": "Quackenbush^Hortensia",
    "AccessionNumber": "ACC99183377",
}
# Substrings that must never appear anywhere (name parts, ids, the date in common spellings).
SECRETS = ["Doe^Jane", "Quincy", "77341902", "19510317", "1951-03-17", "555-31-4242", "Zyxwvut",
           "Quackenbush", "Hortensia", "99183377"]


def leaks(*texts) -> list[str]:
    """The secrets found in any of ``texts`` (str or bytes)."""
    found = []
    for t in texts:
        if t is None:
            continue
        s = t.decode("latin-1") if isinstance(t, (bytes, bytearray)) else str(t)
        found += [x for x in SECRETS if x.lower() in s.lower()]
    return sorted(set(found))


@functools.cache
def phi_dicom(valid: bool = True, broken: str | None = None) -> bytes:
    """A frontal-looking 16-bit DICOM with identifying tags; ``broken`` makes it undecodable.

    Built quietly (pydicom warns, with the value, when it *writes* an invalid value: that is the
    test's doing, not the app's), and cached so that later captures only see the code under test.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyd = logging.getLogger("pydicom")
        old, pyd.disabled = pyd.disabled, True
        try:
            return _phi_dicom(valid, broken)
        finally:
            pyd.disabled = old


def _phi_dicom(valid: bool, broken: str | None) -> bytes:
    phi = dict(PHI)
    if not valid:  # values that break VR rules: pydicom warns on them, with the value in the text
        phi["PatientBirthDate"] = "1951-03-17"
        phi["PatientID"] = "MRN-77341902" * 8  # longer than LO allows
    arr = (xray_like(seed=5).astype(np.uint16) * 16)
    data = dicom_bytes(arr, patient=phi)
    if broken == "short_pixels":
        data = data[: len(data) - 5000]
    return data


@pytest.fixture
def tmp_dicoms(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "case1.dcm").write_bytes(phi_dicom())
    (folder / "case2.dcm").write_bytes(phi_dicom(valid=False))
    (folder / "case3.dcm").write_bytes(phi_dicom(broken="short_pixels"))
    return folder


def test_builder_really_contains_the_tags():
    """Guard against a vacuous test: the raw file holds every secret."""
    data = phi_dicom()
    assert "Doe^Jane" in data.decode("latin-1") and "77341902" in data.decode("latin-1")


@pytest.mark.parametrize("kind", ["valid", "invalid_vr", "short_pixels"])
def test_decoder_never_logs_or_raises_tag_values(kind, caplog, capfd):
    data = {"valid": phi_dicom, "invalid_vr": lambda: phi_dicom(valid=False),
            "short_pixels": lambda: phi_dicom(broken="short_pixels")}[kind]()
    caplog.set_level(logging.DEBUG)  # every logger, pydicom's included
    logging.getLogger("pydicom").setLevel(logging.DEBUG)
    caplog.clear()
    capfd.readouterr()
    err = None
    with warnings.catch_warnings(record=True) as caught, WRITE_WATCH:
        warnings.simplefilter("always")
        try:
            arr = images.load(data, 224, name="upload.dcm")
            assert arr.shape == (224, 224)
        except images.ImageError as exc:
            err = exc
    assert not WRITE_WATCH.writes, WRITE_WATCH.writes
    if kind == "short_pixels":
        assert err is not None
    else:
        assert err is None, err
    out, errout = capfd.readouterr()
    assert not leaks(caplog.text, out, errout, *(str(w.message) for w in caught), err and str(err)), (
        caplog.text, [str(w.message) for w in caught], err)


def _run_cli(args, tmp_path, **env):
    home = tmp_path / "home"
    tmpd = tmp_path / "tmpdir"
    home.mkdir(exist_ok=True)
    tmpd.mkdir(exist_ok=True)
    out = subprocess.run([PY, "-m", *args], cwd=tmp_path, capture_output=True, timeout=240,
                         env=env_without_secrets(HOME=home, TMPDIR=tmpd, MPLCONFIGDIR=home, **env))
    return out


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A run folder for the CLIs: the shipped model when present, else a known-answer run."""
    if (config.DEFAULT_RUN / "model.keras").is_file():
        return config.DEFAULT_RUN
    return brightness_run(tmp_path_factory.mktemp("runs"))


@pytest.mark.slow
def test_predict_cli_output_and_csv_have_no_tags(tmp_dicoms, tmp_path, cli_run):
    csv = tmp_path / "pred.csv"
    out = _run_cli(["core.predict", str(tmp_dicoms), "--run", str(cli_run), "--csv", str(csv), "--json"],
                   tmp_path, PYTHONPATH=REPO)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert not leaks(out.stdout, out.stderr, csv.read_bytes()), (out.stdout[-1500:], out.stderr[-1500:])
    assert b"Traceback" not in out.stderr
    doc = json_or_none(out.stdout.decode())
    assert doc is not None and doc["n"] == 2 and len(doc["errors"]) == 1  # the broken one is skipped
    # Nothing else was written: only the CSV we asked for, no temp files left in HOME/TMPDIR.
    assert {p.name for p in tmp_path.iterdir()} <= {"pred.csv", "in", "home", "tmpdir"}
    assert not any((tmp_path / "tmpdir").iterdir()), list((tmp_path / "tmpdir").iterdir())


@pytest.mark.slow
def test_explain_cli_output_and_overlay_have_no_tags(tmp_dicoms, tmp_path, cli_run):
    png = tmp_path / "overlay.png"
    out = _run_cli(["core.explain", str(tmp_dicoms / "case1.dcm"), "--run", str(cli_run), "--out", str(png),
                    "--json"], tmp_path, PYTHONPATH=REPO)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert png.is_file() and not leaks(out.stdout, out.stderr, png.read_bytes())


def test_training_cache_holds_no_tags(tmp_path):
    """core.train caches decoded pixels under <runs>/.cache: pixels only, no header values."""
    from core import train

    root = tmp_path / "data"
    (root / "covid").mkdir(parents=True)
    (root / "covid" / "a.dcm").write_bytes(phi_dicom())
    (root / "covid" / "b.dcm").write_bytes(phi_dicom(valid=False))
    cache = tmp_path / "runs" / ".cache"
    pix, kept, errors = train.decode_images(root, ["covid/a.dcm", "covid/b.dcm"], 64, cache, progress=False)
    assert len(kept) == 2 and not errors
    written = [p for p in cache.rglob("*") if p.is_file()]
    assert written, "expected a pixel cache file"
    for p in written:
        assert not leaks(p.read_bytes()), p


def test_case_report_strips_tags():
    from core import explain, report

    arr = images.load(phi_dicom(), 224, name="upload.dcm")
    heat = np.clip(arr / 255.0, 0, 1).astype(np.float32)
    html = report.case_report_html(arr, explain.overlay(arr, heat), {"covid": 0.7, "other": 0.3}, 0.5,
                                   run_id="shipped model", warnings=["a warning"], case_id="uploaded image")
    assert not leaks(html)
    pdf = report.case_report_pdf(arr, explain.overlay(arr, heat), {"covid": 0.7, "other": 0.3}, 0.5,
                                 run_id="shipped model", warnings=["a warning"], case_id="uploaded image")
    assert pdf.startswith(b"%PDF") and b"a warning" in pdf and not leaks(pdf)
    assert "research" in html.lower() or "not for diagnosis" in html.lower()


# --------------------------------------------------------------------------------------------
# The dashboard: upload a DICOM with tags through AppTest
# --------------------------------------------------------------------------------------------
def _all_text(at) -> str:
    parts = []
    for e in at.main:
        for attr in ("value", "label", "body", "caption", "help"):
            v = getattr(e, attr, None)
            if isinstance(v, (str, int, float)):
                parts.append(str(v))
    for e in at.sidebar:
        parts.append(str(getattr(e, "value", "")))
    return "\n".join(parts)


def test_dashboard_upload_stays_in_memory_and_shows_no_tags(tmp_path, monkeypatch, caplog, capfd, cli_run):
    from streamlit.testing.v1 import AppTest

    if cli_run != config.DEFAULT_RUN:
        monkeypatch.setenv("CXR_RUNS_DIR", str(Path(cli_run).parent))
    fresh_tmp = tmp_path / "tmp"
    fresh_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(fresh_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(fresh_tmp))
    caplog.set_level(logging.DEBUG)
    # Record what the page hands to Streamlit's (in-memory) media store: downloads and images.
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    offered: list[tuple[bytes, str, str | None]] = []
    original = MemoryMediaFileStorage.load_and_get_id

    def recording(self, path_or_data, mimetype, kind, filename=None):
        if isinstance(path_or_data, (bytes, str)) and mimetype in ("text/html", "image/png", "application/pdf"):
            data = path_or_data.encode() if isinstance(path_or_data, str) else path_or_data
            offered.append((data, mimetype, filename))
        return original(self, path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", recording)
    # ... and the downloads it offers to generate on click (deferred callables).
    from streamlit.runtime.media_file_manager import MediaFileManager

    deferred: list = []
    original_deferred = MediaFileManager.add_deferred

    def recording_deferred(self, data_callable, mimetype, coordinates, file_name=None, **kw):
        deferred.append((data_callable, mimetype, file_name))
        return original_deferred(self, data_callable, mimetype, coordinates, file_name, **kw)

    monkeypatch.setattr(MediaFileManager, "add_deferred", recording_deferred)

    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=180)
    at.session_state["run"] = str(Path(cli_run).resolve())
    at.run()
    assert not at.exception
    # Warm the model and caches first with a harmless PNG, then watch the DICOM upload.
    at.file_uploader(key="explain_upload").set_value(("warm.png", png_bytes(), "image/png"))
    at.run()
    before = tree_listing(REPO, fresh_tmp)
    offered.clear()
    deferred.clear()
    with WRITE_WATCH:
        at.file_uploader(key="explain_upload").set_value(("study.dcm", phi_dicom(valid=False), "application/dicom"))
        at.run()
        # Downloads are generated when clicked: run each one as a click would.
        for make, mime, fname in deferred:
            data = make()
            offered.append((data.encode() if isinstance(data, str) else data, mime, fname))
    writes = list(WRITE_WATCH.writes)
    after = tree_listing(REPO, fresh_tmp)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert any(m.label == "P(covid)" for m in at.metric) or at.warning, "no result for the DICOM upload"
    page = _all_text(at)
    out, err = capfd.readouterr()
    assert not leaks(page, caplog.text, out, err)
    # Everything the page offers for download (overlay PNG, case report HTML) was recorded.
    assert any("html" in str(m) for _, m, _ in offered), "no case report was offered"
    assert any("pdf" in str(m) for _, m, _ in offered), "no PDF case report was offered"
    for data, mime, fname in offered:
        assert not leaks(data, fname), (mime, fname)
    assert not writes, f"files opened for writing during an upload: {writes}"
    new = sorted(set(after) - set(before))
    assert not [p for p in new if p.startswith(str(fresh_tmp))], new
    changed_repo = [p for p in new if "/runs/" in p or "/assets/" in p or "/.cache" in p]
    assert not changed_repo, changed_repo
