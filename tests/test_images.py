"""core.images: the one decoding path, table-driven over formats and bad inputs."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from core import images


# ----------------------------------------------------------------------------- builders
def png(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, "PNG", **save) if mode else Image.fromarray(arr).save(buf, "PNG", **save)
    return buf.getvalue()


def gradient(h=64, w=64, hi=255, dtype=np.uint8) -> np.ndarray:
    return np.linspace(0, hi, h * w).reshape(h, w).astype(dtype)


def palette_png() -> bytes:
    im = Image.new("P", (40, 40))
    im.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    im.paste(1, (0, 0, 20, 40))  # left half white, right half black
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def jpeg_with_orientation(orientation: int) -> bytes:
    arr = np.zeros((80, 40), np.uint8)  # tall: 40 wide, 80 high
    arr[:10, :] = 255  # bright band at the top
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds no pixel data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def dicom(
    arr: np.ndarray,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    center: float | None = None,
    width: float | None = None,
    rows: int | None = None,
    cols: int | None = None,
) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("test.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows or arr.shape[0], cols or arr.shape[1]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0
    if center is not None:
        ds.WindowCenter = center
        ds.WindowWidth = width
    ds.PixelData = arr.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------- good inputs
def _check_8bit_grey(x):
    assert np.allclose(x, gradient(), atol=0.5)


def _check_stretched(x):
    assert x.min() == 0 and x.max() == pytest.approx(255)
    assert np.all(np.diff(x.ravel()) >= -1e-3)  # the gradient keeps its order


def _check_rgb(x):
    assert np.allclose(x, 0.299 * 200 + 0.587 * 100 + 0.114 * 50, atol=1.0)


def _check_rgba(x):
    # 50% transparent white over black -> mid grey, as a viewer shows it
    assert np.allclose(x, 128, atol=2)


def _check_palette(x):
    assert np.allclose(x[:, :20], 255) and np.allclose(x[:, 20:], 0)


rgb = np.zeros((40, 40, 3), np.uint8)
rgb[...] = (200, 100, 50)
rgba = np.zeros((40, 40, 4), np.uint8)
rgba[...] = (255, 255, 255, 128)

GOOD = [
    ("png 8-bit grey", png(gradient()), (64, 64), _check_8bit_grey),
    ("png 16-bit grey", png(gradient(hi=4000, dtype=np.uint16)), (64, 64), _check_stretched),
    ("png RGB", png(rgb), (40, 40), _check_rgb),
    ("png RGBA", png(rgba), (40, 40), _check_rgba),
    ("png palette", palette_png(), (40, 40), _check_palette),
]


@pytest.mark.parametrize("name,data,shape,check", GOOD, ids=[g[0] for g in GOOD])
def test_decodes_formats(name, data, shape, check):
    x = images.decode(data, name=name)
    assert x.dtype == np.float32 and x.shape == shape
    assert 0 <= x.min() and x.max() <= 255
    check(x)


@pytest.mark.parametrize("orientation,shape,bright_side", [
    (1, (80, 40), "top"),     # as stored
    (3, (80, 40), "bottom"),  # rotated 180
    (6, (40, 80), "right"),   # rotate 90 CW to display: the top band goes to the right
    (8, (40, 80), "left"),
])
def test_jpeg_exif_orientation(orientation, shape, bright_side):
    x = images.decode(jpeg_with_orientation(orientation))
    assert x.shape == shape
    edge = {"top": x[:5].mean(), "bottom": x[-5:].mean(), "left": x[:, :5].mean(), "right": x[:, -5:].mean()}
    assert max(edge, key=edge.get) == bright_side


def test_dicom_monochrome2_and_monochrome1():
    arr = gradient(hi=1000, dtype=np.uint16)
    m2 = images.decode(dicom(arr), name="a.dcm")
    m1 = images.decode(dicom(arr, photometric="MONOCHROME1"), name="b.dcm")
    assert m2[0, 0] == 0 and m2[-1, -1] == pytest.approx(255)
    assert np.allclose(m1, 255 - m2, atol=1e-3)  # MONOCHROME1 is inverted: bone stays bright


def test_dicom_rescale_slope_intercept():
    arr = gradient(hi=1000, dtype=np.uint16)
    # a negative slope flips the ramp: only visible if the modality LUT is applied
    x = images.decode(dicom(arr, slope=-2.0, intercept=3000.0))
    assert x[0, 0] == pytest.approx(255) and x[-1, -1] == pytest.approx(0)


def test_dicom_window_clips():
    arr = gradient(hi=1000, dtype=np.uint16)
    x = images.decode(dicom(arr, center=500, width=200))
    flat = x.ravel()
    # everything below 400 is black and above 600 is white after windowing
    vals = gradient(hi=1000, dtype=np.uint16).ravel()
    assert np.all(flat[vals < 390] == 0) and np.all(flat[vals > 610] == pytest.approx(255))
    assert 0 < flat[(vals > 450) & (vals < 550)].mean() < 255


def test_load_resizes_and_accepts_paths(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(png(gradient(100, 60)))
    x = images.load(p, size=32)
    assert x.shape == (32, 32) and x.dtype == np.float32
    assert images.load(str(p)).shape == (100, 60)


# ----------------------------------------------------------------------------- bad inputs
BAD = [
    ("empty", b"", "empty"),
    ("truncated png", png(gradient(256, 256) + np.random.default_rng(0).integers(0, 9, (256, 256)).astype(np.uint8))[:300],
     "truncated"),
    ("not an image", b"hello, I am a text file\n" * 10, "not an image"),
    ("tiny", png(gradient(8, 8)), "at least"),
    ("over pixel limit", png_header_only(100_000, 100_000), "megapixels"),
    ("dicom over pixel limit", dicom(gradient(40, 40, dtype=np.uint16), rows=20_000, cols=20_000), "megapixels"),
    ("dicom without pixels", dicom(gradient(40, 40, dtype=np.uint16))[:200], "dicom"),
]


@pytest.mark.parametrize("name,data,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_one_clear_error(name, data, reason):
    with pytest.raises(images.ImageError) as exc:
        images.load(data, size=64, name=f"{name}.bin")
    assert exc.value.name == f"{name}.bin"
    assert reason in exc.value.reason.lower()
    assert str(exc.value).startswith(f"{name}.bin: ")


def test_pixel_limit_is_checked_before_allocating(monkeypatch):
    # a 100000x100000 grey image would need 10 GB; refusing must be instant and allocation-free
    tracemalloc.start()
    with pytest.raises(images.ImageError):
        images.load(png_header_only(100_000, 100_000))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50 * 2**20


def test_missing_and_oversized_files(tmp_path, monkeypatch):
    with pytest.raises(images.ImageError, match="not found"):
        images.load(tmp_path / "nope.png")
    p = tmp_path / "big.png"
    p.write_bytes(png(gradient()))
    monkeypatch.setattr(images, "MAX_BYTES", 100)
    with pytest.raises(images.ImageError, match="limit"):
        images.load(p)


def test_load_many_skips_and_reports_bad_files(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png(gradient()))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    arr, kept, errors = images.load_many([good, bad, tmp_path / "missing.png", good], size=16)
    assert arr.shape == (2, 16, 16) and kept == [0, 3]
    assert [e.name for e in errors] == [str(bad), str(tmp_path / "missing.png")]
    empty, kept, errors = images.load_many([bad], size=16)
    assert empty.shape == (0, 16, 16) and kept == [] and len(errors) == 1


def test_real_images_decode(cxr_root):
    # one file per source of the real data: JPEG (kermany), PNG (nih), mixed ieee8023
    paths = [
        next((cxr_root / "kermany" / "NORMAL").iterdir()),
        next((cxr_root / "nih" / "No_findings").iterdir()),
        *sorted((cxr_root / "ieee8023" / "images").iterdir())[:3],
    ]
    arr, kept, errors = images.load_many(paths, size=224)
    assert not errors and arr.shape == (5, 224, 224)
    assert arr.min() >= 0 and arr.max() <= 255 and arr.std() > 10
