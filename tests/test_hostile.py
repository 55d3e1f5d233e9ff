"""Hostile input, table-driven: files an attacker or a careless user would hand the image layer.

Two tables. ``FILES``: bytes decoded by :func:`core.images.load` (the one decoding path of the
CLIs and the dashboard); each row is refused with a reason matching a regex, or decodes. ``PATHS``:
a ``path`` as a run file (predictions.csv, split.csv, audit.csv) names it, opened through
:mod:`core.safepath`; outside the data root every row gets the same sentence, so nothing tells
whether an outside file exists. Every file is made in a few lines here, small: the deflate bomb
is streamed through zlib (a 256 MiB body in ~260 KB), and its refusal is checked to stay far
below the memory it would inflate to. Issue 22's items 1, 2, 3 and 9 each have a row that fails
on the code before the fix.
"""

from __future__ import annotations

import io
import os
import re
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from robust_util import (
    brightness_run,
    cmyk_jpeg_bytes,
    dicom_bytes,
    jpeg_bytes,
    jpeg_header_bomb,
    monochrome1_arr,
    palette_bytes,
    pil_bytes,
    png16_bytes,
    png_bytes,
    png_header_bomb,
    png_zero_bomb,
    rgba_bytes,
    xray_like,
)

from core import images, safepath

OK = "decoded"
MiB = 2**20


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------
def _explicit_le(ds) -> bytes:
    """A dataset's elements as explicit VR little endian bytes (no preamble, no file meta)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def deflated_dicom(zeros: int = 0, arr: np.ndarray | None = None) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM (1.2.840.10008.1.2.1.99) of a chest-like image,
    with a private OB element of ``zeros`` zero bytes; the body is deflated as a stream, so a
    256 MiB element costs ~260 KB of file and a few MiB of memory to build."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    arr = xray_like().astype(np.uint16) * 16 if arr is None else arr
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head, tail = Dataset(), Dataset()
    head.SOPClassUID, head.Modality = meta.MediaStorageSOPClassUID, "DX"
    tail.Rows, tail.Columns, tail.SamplesPerPixel = *arr.shape, 1
    tail.PhotometricInterpretation = "MONOCHROME2"
    tail.BitsAllocated, tail.BitsStored, tail.HighBit, tail.PixelRepresentation = 16, 12, 11, 0
    tail.PixelData = arr.astype(np.uint16).tobytes()
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(_explicit_le(head))]
    if zeros:  # (0009,1010) OB, explicit VR: tag, "OB", 2 reserved bytes, 4-byte length
        parts.append(comp.compress(b"\x09\x00\x10\x10OB\x00\x00" + zeros.to_bytes(4, "little")))
        block = bytes(MiB)
        for _ in range(zeros // MiB):
            parts.append(comp.compress(block))
        parts.append(comp.compress(bytes(zeros % MiB)))
    parts += [comp.compress(_explicit_le(tail)), comp.flush()]
    out = io.BytesIO()
    out.write(bytes(128) + b"DICM")
    write_file_meta_info(out, meta)
    return out.getvalue() + b"".join(parts)


def dicom_with(**values) -> bytes:
    """:func:`robust_util.dicom_bytes` of a chest-like image with extra (string) header values."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(xray_like().astype(np.uint16) * 16)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on "NaN" decimal strings: that is the point
        for key, value in values.items():
            setattr(ds, key, value)
        buf = io.BytesIO()
        ds.save_as(buf)
    return buf.getvalue()


def encapsulated_dicom(syntax: str) -> bytes:
    """A DICOM whose pixel data claims ``syntax`` (a compressed transfer syntax) around junk."""
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((64, 64), np.uint16))))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7junk\xff\xd9"])
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def huge_length_claim() -> bytes:
    """A small uncompressed DICOM with a private element that claims 4 GiB (0xFFFFFFF0) of value."""
    data = dicom_bytes(xray_like().astype(np.uint16) * 16)
    at = data.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data
    return data[:at] + b"\x09\x00\x10\x10OB\x00\x00" + (0xFFFFFFF0).to_bytes(4, "little") + data[at:]


def float_tiff(arr: np.ndarray) -> bytes:
    return pil_bytes(Image.fromarray(arr.astype(np.float32), "F"), "TIFF")


def chest_float(scale: float = 1.0) -> np.ndarray:
    return (xray_like().astype(np.float64) / 127.5 - 1.0) * scale


def with_nan(value: float = np.nan) -> bytes:
    arr = chest_float(1000.0)
    arr[100, 100] = value
    return float_tiff(arr)


# --------------------------------------------------------------------------------------------
# The file table: (case id, builder -> bytes, expected: OK or a regex the reason must match)
# --------------------------------------------------------------------------------------------
FILES = [
    # Issue 22, item 1: a deflated DICOM whose body inflates past the limit is refused unread.
    ("deflate_bomb_256mib", lambda: deflated_dicom(256 * MiB), r"deflated DICOM .*inflates to over 64 MiB"),
    ("deflate_small_ok", lambda: deflated_dicom(4096), OK),
    ("deflate_corrupt", lambda: deflated_dicom()[:-40] + b"\xff" * 40, r"DICOM"),
    ("huge_length_claim", huge_length_claim, r"DICOM"),
    # Item 3: one NaN (or infinity) pixel, or NaN rescale/window values: refused, with that reason.
    ("float_tiff_nan", with_nan, r"NaN or infinity"),
    ("float_tiff_inf", lambda: with_nan(np.inf), r"NaN or infinity"),
    ("float_tiff_near_max", lambda: float_tiff(chest_float(3e38)), OK),
    ("dicom_slope_nan", lambda: dicom_with(RescaleSlope="NaN", RescaleIntercept="0"), r"RescaleSlope is not a finite"),
    ("dicom_intercept_inf", lambda: dicom_with(RescaleSlope="1", RescaleIntercept="inf"), r"RescaleIntercept .*finite"),
    ("dicom_window_nan", lambda: dicom_with(WindowCenter="NaN", WindowWidth="1000"), r"WindowCenter is not a finite"),
    # Item 9: a compressed DICOM without its decoder says what it is and what would decode it.
    ("dicom_jpeg_ls", lambda: encapsulated_dicom("1.2.840.10008.1.2.4.80"),
     r"JPEG-LS .*not installed \(install one of: .*pylibjpeg-libjpeg.*\)$"),
    ("dicom_mpeg2", lambda: encapsulated_dicom("1.2.840.10008.1.2.4.100"), r"MPEG2 .*does not support$"),
    # What held before issue 22 (its "Why"): bombs refused before allocation, odd formats decode.
    ("png_zero_bomb", png_zero_bomb, r"20000x20000 pixels, over the limit"),
    ("png_header_bomb", png_header_bomb, r"20000x20000 pixels, over the limit"),
    ("jpeg_header_bomb", jpeg_header_bomb, r"20000x20000 pixels, over the limit"),
    ("dicom_header_bomb", lambda: dicom_bytes(rows_cols=(20000, 20000)), r"20000x20000 pixels"),
    ("huge_upload", lambda: bytes(images.MAX_BYTES + 1), r"over the 64 MiB limit"),
    ("empty", lambda: b"", r"empty"),
    ("png8", png_bytes, OK),
    ("jpeg", jpeg_bytes, OK),
    ("png16", png16_bytes, OK),
    ("rgba", rgba_bytes, OK),
    ("palette", palette_bytes, OK),
    ("cmyk_jpeg", cmyk_jpeg_bytes, OK),
    ("tiff8", lambda: pil_bytes(Image.fromarray(xray_like()), "TIFF"), OK),
    ("float_tiff", lambda: float_tiff(chest_float(1000.0)), OK),
    ("gif", lambda: pil_bytes(Image.fromarray(xray_like()), "GIF"), OK),
    ("webp", lambda: pil_bytes(Image.fromarray(xray_like()), "WEBP", quality=95), OK),
    ("dicom_mono2", lambda: dicom_bytes(xray_like().astype(np.uint16) * 16), OK),
    ("dicom_mono1", lambda: dicom_bytes(monochrome1_arr(), "MONOCHROME1"), OK),
]


@pytest.mark.parametrize("case,build,expected", FILES, ids=[f[0] for f in FILES])
def test_hostile_file(case, build, expected):
    data = build()
    assert len(data) < 80 * MiB, f"{case}: the test file itself must stay small ({len(data) / MiB:.0f} MiB)"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no overflow / invalid-value spew
        if expected == OK:
            arr = images.load(data, 224, name=f"{case}.bin")
            assert arr.shape == (224, 224) and np.isfinite(arr).all()
            assert arr.min() >= 0 and arr.max() <= 255 and arr.std() > 10, f"{case}: came out flat"
            return
        with pytest.raises(images.ImageError) as info:
            images.load(data, 224, name=f"{case}.bin")
    reason = info.value.reason
    assert re.search(expected, reason), f"{case}: {reason!r} does not match {expected!r}"
    assert "\n" not in str(info.value) and len(str(info.value)) < 300, str(info.value)


def plain_private_element(nbytes: int) -> bytes:
    """An uncompressed DICOM carrying a real private OB element of ``nbytes`` zeros (no length trick)."""
    data = dicom_bytes(xray_like().astype(np.uint16) * 16)
    at = data.index(b"\xe0\x7f\x10\x00")
    return data[:at] + b"\x09\x00\x10\x10OB\x00\x00" + nbytes.to_bytes(4, "little") + bytes(nbytes) + data[at:]


@pytest.mark.parametrize("case,build,expected,limit_mib", [
    # Item 1: the 256 MiB body is refused without inflating it (before: pydicom inflated it all).
    ("deflate_bomb", lambda: deflated_dicom(256 * MiB), "inflates to over", 120),
    # A non-deflated file is bounded by MAX_BYTES already: its biggest private element stays cheap.
    ("plain_60mib_private", lambda: plain_private_element(60 * MiB), OK, 300),
    ("plain_over_max_bytes", lambda: plain_private_element(images.MAX_BYTES), "over the 64 MiB limit", 300),
], ids=["deflate_bomb", "plain_60mib_private", "plain_over_max_bytes"])
def test_big_dicom_elements_in_bounded_memory(case, build, expected, limit_mib):
    data = build()
    tracemalloc.start()
    try:
        if expected == OK:
            assert images.decode(data, name=f"{case}.dcm").shape == (256, 256)
        else:
            with pytest.raises(images.ImageError, match=expected):
                images.decode(data, name=f"{case}.dcm")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit_mib * MiB, f"{case}: peak {peak / MiB:.0f} MiB of Python allocations"


def test_deflated_dicom_decodes_like_the_plain_one():
    arr = xray_like().astype(np.uint16) * 16
    a = images.load(deflated_dicom(0, arr), name="d.dcm")
    b = images.load(dicom_bytes(arr), name="p.dcm")
    np.testing.assert_array_equal(a, b)


def test_near_max_floats_keep_their_picture():
    """Item 3: finite values near +-3e38 are stretched (in float64), not refused nor zeroed."""
    ref = images.load(float_tiff(chest_float(1.0)), name="ref.tif")
    big = images.load(float_tiff(chest_float(3e38)), name="big.tif")
    assert np.corrcoef(ref.ravel(), big.ravel())[0, 1] > 0.999
    assert big.min() == 0 and big.max() == pytest.approx(255, abs=1e-3)


# --------------------------------------------------------------------------------------------
# The path table: a run file's ``path`` column, opened under a data root
# --------------------------------------------------------------------------------------------
@pytest.fixture
def world(tmp_path):
    """A data root with a film, a folder, a FIFO and symlinks; an image and a secret outside it."""
    root, outside = tmp_path / "data", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "a.png").write_bytes(png_bytes())
    (outside / "secret.png").write_bytes(png_bytes())
    (outside / "notes.txt").write_text("password: hunter2\n")
    os.mkfifo(root / "pipe.png")
    (root / "inside_link.png").symlink_to(root / "sub" / "a.png")
    (root / "out_link.png").symlink_to(outside / "secret.png")
    (root / "zero_link.png").symlink_to("/dev/zero")
    (root / "dangling_out.png").symlink_to(outside / "missing.png")
    return root, outside


OUT = re.escape(safepath.OUTSIDE) + "$"
PATHS = [
    # Issue 22, item 2: everything outside the root (after symlinks) gets one sentence.
    ("absolute_outside_image", lambda r, o: str(o / "secret.png"), OUT),
    ("absolute_outside_text", lambda r, o: str(o / "notes.txt"), OUT),
    ("absolute_outside_missing", lambda r, o: str(o / "nothing-here.png"), OUT),
    ("password_file", lambda r, o: "/etc/passwd", OUT),
    ("dotdot_to_passwd", lambda r, o: "../" * 30 + "etc/passwd", OUT),
    ("dotdot_to_outside", lambda r, o: "sub/../../outside/secret.png", OUT),
    ("dev_zero", lambda r, o: "/dev/zero", OUT),
    ("symlink_out", lambda r, o: "out_link.png", OUT),
    ("symlink_to_dev_zero", lambda r, o: "zero_link.png", OUT),
    ("dangling_symlink_out", lambda r, o: "dangling_out.png", OUT),
    ("the_root_itself", lambda r, o: "", OUT),
    ("nul_byte", lambda r, o: "sub/a.png\x00.txt", OUT),
    # Inside the root: only regular files are opened, and a FIFO never blocks.
    ("fifo_inside", lambda r, o: "pipe.png", r"not a regular file"),
    ("folder_inside", lambda r, o: "sub", r"not a regular file"),
    ("missing_inside", lambda r, o: "sub/b.png", r"file not found"),
    ("film", lambda r, o: "sub/a.png", OK),
    ("dotdot_inside", lambda r, o: "sub/../sub/a.png", OK),
    ("symlink_inside", lambda r, o: "inside_link.png", OK),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case,rel_of,expected", PATHS, ids=[p[0] for p in PATHS])
def test_run_file_path(case, rel_of, expected, world):
    root, outside = world
    rel = rel_of(root, outside)
    start = time.monotonic()
    if expected == OK:
        assert safepath.load_film(root, rel, 64).shape == (64, 64)
        assert safepath.read_film(root, rel) == png_bytes()
        return
    for opener in (safepath.read_film, safepath.load_film):
        with pytest.raises(images.ImageError) as info:
            opener(root, rel)
        assert re.search(expected, info.value.reason), f"{case}: {info.value.reason!r}"
        assert info.value.name == rel
    assert time.monotonic() - start < 5, f"{case}: took {time.monotonic() - start:.1f} s (blocked?)"
    if expected == OUT:
        assert safepath.film_stamp(root, rel) is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "folder"])
def test_read_bytes_opens_regular_files_only(target, tmp_path):
    """Item 2 for user-given paths (CLIs): devices, FIFOs and folders are refused, never read."""
    path = {"/dev/zero": Path("/dev/zero"), "fifo": tmp_path / "p.png", "folder": tmp_path}[target]
    if target == "fifo":
        os.mkfifo(path)
    tracemalloc.start()
    try:
        with pytest.raises(images.ImageError, match="not a regular file"):
            images.read_bytes(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB


def test_dashboard_opens_run_file_paths_through_safepath(world):
    """The dashboard's readers of a run file's paths (Explain, Misclassified, Data pages)."""
    from dashboard import state

    root, outside = world
    for rel in (str(outside / "secret.png"), "../outside/secret.png", "out_link.png", "/dev/zero"):
        with pytest.raises(images.ImageError, match=OUT):
            state.dataset_bytes(str(root), rel)
        with pytest.raises(images.ImageError, match=OUT):
            state.dataset_image(str(root), rel, 32)
    assert state.dataset_image(str(root), "sub/a.png", 32).shape == (32, 32)


def test_audit_gallery_refuses_outside_paths(world, tmp_path):
    """core.findings.case_images (the audit cards' films): outside paths get the one sentence."""
    from core import findings

    root, outside = world
    run = brightness_run(tmp_path / "runs")
    got = findings.case_images(run, root, [str(outside / "secret.png"), "../outside/notes.txt", "sub/a.png"])
    assert [g["error"] for g in got[:2]] == [safepath.OUTSIDE, safepath.OUTSIDE]
    assert got[2]["error"] is None and got[2]["overlay"] is not None
