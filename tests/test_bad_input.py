"""Bad input, table-driven, through the one decoding path the app and the CLIs use.

Every case is built in the test (no fixture files): broken files must raise one clear
:class:`core.images.ImageError` naming the file and the reason; odd-but-valid files (16-bit,
RGBA, palette, CMYK, DICOM MONOCHROME1) must decode. The same inputs then go through the
prediction / explanation CLIs (one-line message, no traceback, non-zero exit or skip-and-report)
and through the dashboard's Explain page (a message, and the session keeps working). Nothing
may be written to disk while bad input is handled.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from robust_util import (
    PATIENT,
    WRITE_WATCH,
    brightness_run,
    cmyk_jpeg_bytes,
    colour_photo_bytes,
    dicom_bytes,
    env_without_secrets,
    jpeg_bytes,
    jpeg_header_bomb,
    monochrome1_arr,
    palette_bytes,
    png16_bytes,
    png_bytes,
    png_header_bomb,
    png_zero_bomb,
    rgba_bytes,
    tree_listing,
    xray_like,
)

from core import config, images
from core.images import ImageError

REPO = config.REPO_ROOT
PY = sys.executable


# --------------------------------------------------------------------------------------------
# The table: (case id, filename, bytes builder, expected: "ok" or a reason substring)
# --------------------------------------------------------------------------------------------
BAD = [
    ("empty", "empty.png", lambda: b"", "empty"),
    ("truncated_jpeg", "cut.jpg", lambda: jpeg_bytes()[: len(jpeg_bytes()) // 3], "truncated"),
    ("text_as_png", "notes.png", lambda: b"patient notes, definitely not an image\n" * 20, "not an image"),
    ("html", "page.png", lambda: b"<!DOCTYPE html><html><body><img src=x.png></body></html>\n" * 10, "not an image"),
    ("one_pixel", "dot.png", lambda: png_bytes(np.zeros((1, 1), np.uint8)), "1x1"),
    ("tiny_strip", "strip.png", lambda: png_bytes(np.zeros((8, 400), np.uint8)), "400x8"),
    ("huge_png_header", "huge.png", png_header_bomb, "20000x20000"),
    ("huge_jpeg_header", "huge.jpg", jpeg_header_bomb, "20000x20000"),
    ("huge_dicom_header", "huge.dcm", lambda: dicom_bytes(rows_cols=(20000, 20000)), "20000x20000"),
    ("dicom_no_pixels", "nopix.dcm", lambda: dicom_bytes(patient=PATIENT), "no pixel data"),
    ("dicom_garbage", "junk.dcm", lambda: b"\x00" * 128 + b"DICM" + b"\xff" * 300, "DICOM"),
]

GOOD = [
    ("png8", "a.png", png_bytes),
    ("jpeg", "a.jpg", jpeg_bytes),
    ("png16", "a16.png", png16_bytes),
    ("rgba", "rgba.png", rgba_bytes),
    ("palette", "pal.png", palette_bytes),
    ("cmyk_jpeg", "cmyk.jpg", cmyk_jpeg_bytes),
    ("dicom_mono2", "a.dcm", lambda: dicom_bytes(xray_like().astype(np.uint16) * 16)),
    ("dicom_mono1", "m1.dcm", lambda: dicom_bytes(monochrome1_arr(), "MONOCHROME1")),
]


@pytest.fixture
def no_writes():
    """Fail if any Python-level open() for writing happens inside the block (audit hook)."""
    return WRITE_WATCH


@pytest.mark.parametrize("case,fname,build,reason", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("via", ["bytes", "path"])
def test_bad_input_raises_one_clear_error(case, fname, build, reason, via, tmp_path, no_writes):
    data = build()
    src = data
    if via == "path":
        src = tmp_path / fname
        src.write_bytes(data)
    with no_writes, pytest.raises(ImageError) as info:
        images.load(src, 224, name=fname if via == "bytes" else None)
    err = info.value
    assert err.name.endswith(fname), err.name
    assert reason.lower() in err.reason.lower(), err.reason
    msg = str(err)
    assert fname in msg and "\n" not in msg and len(msg) < 300, msg
    assert not no_writes.writes, no_writes.writes


@pytest.mark.parametrize("case,fname,build", GOOD, ids=[g[0] for g in GOOD])
def test_valid_variants_decode(case, fname, build, no_writes):
    with no_writes:
        arr = images.load(build(), 224, name=fname)
    assert not no_writes.writes, no_writes.writes
    assert arr.shape == (224, 224) and arr.dtype == np.float32
    assert np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 255
    # Each is the same chest-like picture: it must look like it (not blank, not inverted).
    ref = images.load(png_bytes(), 224)
    if case != "dicom_mono1":
        r = np.corrcoef(arr.ravel(), ref.ravel())[0, 1]
        assert r > 0.9, f"{case}: correlation with the 8-bit original {r:.3f}"
    assert arr.std() > 10, f"{case}: image came out flat"


def test_16bit_png_uses_full_range():
    arr = images.load(png16_bytes())
    assert arr.min() == 0 and arr.max() == 255  # stretched, not divided by 65535 or clipped


def test_dicom_monochrome1_is_inverted_bone_bright():
    arr = images.load(dicom_bytes(monochrome1_arr(), "MONOCHROME1"))
    band = arr[100:140].mean()
    lungs = np.concatenate([arr[60:95, 60:95].ravel(), arr[160:190, 60:95].ravel()]).mean()
    assert band > 200 and band > lungs + 50, (band, lungs)
    # Same picture as MONOCHROME2 storage of the same display values.
    grey = xray_like().astype(np.float32)
    grey[100:140, :] = 250
    mono2 = images.load(dicom_bytes((grey * 16).astype(np.uint16)))
    assert np.corrcoef(arr.ravel(), mono2.ravel())[0, 1] > 0.99


def test_rgba_transparency_is_composited_not_garbage():
    arr = images.load(rgba_bytes())
    assert arr[:10, :10].max() == 0  # transparent -> black, as a viewer shows it
    assert arr[50:, 50:].std() > 10


def test_over_size_limit_refused_before_reading(tmp_path, no_writes):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:  # sparse: no disk used, no bytes read if refused by size
        f.truncate(images.MAX_BYTES + 1)
    with no_writes, pytest.raises(ImageError, match="over the .* limit"):
        images.load(big, 224)
    with pytest.raises(ImageError, match="over the .* limit") as info:
        images.load(b"\x89PNG" + bytes(images.MAX_BYTES), 224, name="upload.png")
    assert info.value.name == "upload.png"


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        images.load(tmp_path / "nope.png", 224)


_PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys, time
    from core import images
    data = open(sys.argv[1], "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    try:
        images.load(data, 224, name=sys.argv[1])
        outcome = "decoded"
    except images.ImageError as e:
        outcome = "refused: " + e.reason
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(outcome); print((after - before) / 1024); print(dt)
    """
)


@pytest.mark.parametrize(
    "builder",
    [png_zero_bomb, png_header_bomb, jpeg_header_bomb, lambda: dicom_bytes(rows_cols=(20000, 20000))],
    ids=["png_bomb", "png_header", "jpeg_header", "dicom_header"],
)
def test_huge_image_refused_before_pixels_are_allocated(builder, tmp_path):
    """20000x20000 (400 MB of 8-bit pixels): refused with a small, measured peak memory.

    For scale: with the pixel limit lifted, decoding ``png_zero_bomb`` (a valid 400 KB PNG) raised
    the peak RSS by 2.6 GB and took 16 s here; refused, it stays under 20 MiB and 1 s.
    """
    f = tmp_path / "huge.png"
    f.write_bytes(builder())
    out = subprocess.run(
        [PY, "-c", _PEAK_SCRIPT, str(f)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    outcome, peak_mib, secs = out.stdout.strip().splitlines()[-3:]
    assert outcome.startswith("refused") and "20000x20000" in outcome, outcome
    assert float(peak_mib) < 20, f"peak RSS grew by {peak_mib} MiB while refusing"
    assert float(secs) < 1.0, f"refusing took {secs} s"


def test_load_many_skips_and_reports(tmp_path):
    paths = []
    for _case, fname, build, _ in BAD[:4]:
        (tmp_path / fname).write_bytes(build())
        paths.append(tmp_path / fname)
    (tmp_path / "good.png").write_bytes(png_bytes())
    paths.insert(2, tmp_path / "good.png")
    imgs, kept, errors = images.load_many(paths, 64)
    assert imgs.shape == (1, 64, 64) and kept == [2]
    assert len(errors) == 4 and all(isinstance(e, ImageError) for e in errors)
    assert {Path(e.name).name for e in errors} == {b[1] for b in BAD[:4]}



# --------------------------------------------------------------------------------------------
# Decodable but not a frontal chest X-ray: core.checks must warn (the app shows the warning)
# --------------------------------------------------------------------------------------------
def test_colour_photo_gets_a_warning(no_writes):
    from core import checks

    data = colour_photo_bytes()
    with no_writes:
        arr = images.load(data, name="holiday.jpg")  # decodes: it *is* an image
        warns = checks.image_warnings(arr, data)
    assert not no_writes.writes
    assert any("photograph" in w or "not a chest X-ray" in w for w in warns), warns
    # A chest-like grey image of the same kind gets no colour warning.
    grey = png_bytes()
    assert not any("photograph" in w for w in checks.image_warnings(images.load(grey), grey))


def _lateral_files(root: Path) -> list[Path]:
    import pandas as pd

    meta = pd.read_csv(root / "ieee8023" / "metadata.csv")
    names = meta.loc[(meta["view"] == "L") & (meta["modality"] == "X-ray"), "filename"].unique()
    return [p for p in (root / "ieee8023" / "images" / n for n in names) if p.is_file()]


def test_lateral_views_get_a_warning(cxr_root):
    """Real lateral films of ieee8023: most are flagged (the heuristic's recall is reported)."""
    from core import checks

    files = _lateral_files(cxr_root)
    assert len(files) >= 30
    flagged = [
        any("frontal" in w for w in checks.image_warnings(images.load(f), f.read_bytes())) for f in files
    ]
    recall = sum(flagged) / len(files)
    print(f"lateral films flagged: {sum(flagged)}/{len(files)} = {recall:.2f}")
    assert recall >= 0.6, recall


def test_write_watch_sees_writes(tmp_path, no_writes):
    """Self-test of the guard the other tests rely on."""
    with no_writes:
        (tmp_path / "x.txt").write_text("x")
    assert any(w.endswith("x.txt") for w in no_writes.writes)


# --------------------------------------------------------------------------------------------
# The same inputs through the CLIs: one line per bad file, no traceback, nothing written
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The shipped model when present, else a tiny known-answer run written by the test."""
    if (config.DEFAULT_RUN / "model.keras").is_file():
        return config.DEFAULT_RUN.resolve()
    return brightness_run(tmp_path_factory.mktemp("runs")).resolve()


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    home, tmpd = cwd / "home", cwd / "tmpdir"
    home.mkdir(exist_ok=True)
    tmpd.mkdir(exist_ok=True)
    env = env_without_secrets(HOME=home, TMPDIR=tmpd, MPLCONFIGDIR=home, PYTHONPATH=REPO)
    return subprocess.run([PY, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def _assert_clean_stderr(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [ln for ln in stderr.splitlines() if ln.startswith(("skipped", "error"))]


@pytest.mark.slow
def test_predict_cli_skips_and_reports_each_bad_file(tmp_path, cli_run):
    work = tmp_path / "work"
    inputs = work / "inputs"
    inputs.mkdir(parents=True)
    for _case, fname, build, _ in BAD:
        (inputs / fname).write_bytes(build())
    (inputs / "good.png").write_bytes(png_bytes())
    (inputs / "good16.png").write_bytes(png16_bytes())
    (inputs / "mono1.dcm").write_bytes(dicom_bytes(monochrome1_arr(), "MONOCHROME1"))
    before = tree_listing(work)
    out = _cli(["core.predict", str(inputs), "--run", str(cli_run), "--json"], work)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = _assert_clean_stderr(out.stderr)
    doc = json.loads(out.stdout)  # ONE JSON object on stdout
    assert doc["n"] == 3, doc
    assert {Path(e["path"]).name for e in doc["errors"]} == {b[1] for b in BAD}
    skipped = [ln for ln in lines if ln.startswith("skipped")]
    assert len(skipped) == len(BAD), out.stderr
    for ln in skipped:
        assert len(ln) < 300, ln
    # Keras's own ~/.keras/keras.json aside, and matplotlib's font cache (Keras imports matplotlib when it is
    # installed, as Quantus, the tests' reference metrics, needs): library caches in $HOME / $MPLCONFIGDIR
    new = {k: v for k, v in tree_listing(work).items()
           if not k.endswith("/.keras/keras.json") and not Path(k).name.startswith("fontlist-")}
    assert new == before, "the CLI wrote files while predicting"

    # A single bad file: non-zero exit and one line that names it.
    single = _cli(["core.predict", str(inputs / "notes.png"), "--run", str(cli_run)], work)
    assert single.returncode != 0
    lines = _assert_clean_stderr(single.stderr)
    assert any("notes.png" in ln and "not an image" in ln for ln in lines), single.stderr


@pytest.mark.slow
def test_explain_cli_refuses_bad_file_in_one_line(tmp_path, cli_run):
    work = tmp_path / "work"
    work.mkdir()
    (work / "cut.jpg").write_bytes(BAD[1][2]())
    out = _cli(["core.explain", str(work / "cut.jpg"), "--run", str(cli_run), "--out", str(work / "o.png")], work)
    assert out.returncode != 0
    lines = _assert_clean_stderr(out.stderr)
    assert len(lines) == 1 and "cut.jpg" in lines[0] and "truncated" in lines[0], out.stderr
    assert not (work / "o.png").exists()
    assert not any((work / "tmpdir").iterdir())


# --------------------------------------------------------------------------------------------
# The same inputs through the dashboard's Explain page (AppTest): a message, the session lives on
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dashboard_explain_page_bad_uploads(cli_run, monkeypatch, tmp_path, cxr_root):
    from streamlit.testing.v1 import AppTest

    if cli_run != config.DEFAULT_RUN.resolve():
        monkeypatch.setenv("CXR_RUNS_DIR", str(cli_run.parent))
    fresh_tmp = tmp_path / "tmp"
    fresh_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(fresh_tmp))
    monkeypatch.setattr(__import__("tempfile"), "tempdir", str(fresh_tmp))
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=180)
    at.session_state["run"] = str(cli_run)
    at.run()
    assert not at.exception, [e.value for e in at.exception]

    def upload(name, data, mime="image/png"):
        at.file_uploader(key="explain_upload").set_value((name, data, mime))
        at.run()
        assert not at.exception, (name, [e.value for e in at.exception])
        return at

    good = (cxr_root / "nih" / "No_findings").glob("*.png").__next__()
    upload(good.name, good.read_bytes())  # warm-up: model loaded, caches filled
    assert any(m.label == "P(covid)" for m in at.metric)
    # TensorFlow's autograph writes generated *code* to TMPDIR on the first traced call (warm-up);
    # from here on, nothing at all may be written.
    tmp_before = sorted(fresh_tmp.iterdir())
    with WRITE_WATCH:
        for _case, fname, build, reason in BAD:
            upload(fname, build())
            errors = [e.value for e in at.error]
            assert len(errors) == 1, (fname, errors)
            assert reason.lower() in errors[0].lower() and "\n" not in errors[0], (fname, errors)
            assert not at.metric, f"{fname}: a result was shown for a bad file"
        # Over the upload size limit (Streamlit's own limit aside, the decoder refuses it).
        upload("big.png", b"\x89PNG" + bytes(images.MAX_BYTES))
        assert len(at.error) == 1 and "limit" in at.error[0].value
        # The session keeps working: a good upload after the bad ones gives a result.
        upload(good.name, good.read_bytes())
        assert not at.error and any(m.label == "P(covid)" for m in at.metric)
        # Valid odd formats give a result (or a plausibility warning), never an error.
        for _case, fname, build in GOOD:
            upload(fname, build(), "application/dicom" if fname.endswith(".dcm") else "image/png")
            assert not at.error, (fname, [e.value for e in at.error])
            assert at.metric or at.warning, fname
        # Decodable but not a frontal chest X-ray: a warning instead of a confident answer.
        upload("holiday.jpg", colour_photo_bytes(), "image/jpeg")
        assert any("photograph" in w.value for w in at.warning), [w.value for w in at.warning]
        assert not any(m.label == "P(covid)" for m in at.metric), "a photo got a confident answer"
        lateral = next(f for f in _lateral_files(cxr_root)
                       if any("frontal" in w for w in __import__("core.checks").checks.image_warnings(
                           images.load(f), f.read_bytes())))
        upload(lateral.name, lateral.read_bytes(), "image/jpeg")
        assert any("frontal" in w.value for w in at.warning), [w.value for w in at.warning]
        assert not any(m.label == "P(covid)" for m in at.metric), "a lateral view got a confident answer"
    assert not WRITE_WATCH.writes, WRITE_WATCH.writes
    assert sorted(fresh_tmp.iterdir()) == tmp_before
