"""Builders shared by the robustness tests (bad input, privacy, load, faults).

Small, deterministic inputs made in the test (never copies of the real data), a guard that
catches any file opened for writing, and a tiny Keras run folder with a known answer.
"""

from __future__ import annotations

import io
import json
import os
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


# --------------------------------------------------------------------------------------------
# Builders (small, deterministic)
# --------------------------------------------------------------------------------------------
def xray_like(size: int = 256, seed: int = 0) -> np.ndarray:
    """A grey uint8 image with a chest-like layout: dark lungs, bright mediastinum and border."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 200 - 120 * (np.exp(-(((xx - 0.3) / 0.13) ** 2 + ((yy - 0.5) / 0.25) ** 2))
                       + np.exp(-(((xx - 0.7) / 0.13) ** 2 + ((yy - 0.5) / 0.25) ** 2)))
    img = img + rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def pil_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bytes(arr: np.ndarray | None = None) -> bytes:
    return pil_bytes(Image.fromarray(xray_like() if arr is None else arr), "PNG")


def jpeg_bytes(arr: np.ndarray | None = None) -> bytes:
    return pil_bytes(Image.fromarray(xray_like() if arr is None else arr), "JPEG", quality=90)


def png16_bytes() -> bytes:
    # 12-bit detector values in a 16-bit PNG, as many X-ray exports are: must be stretched, not clipped.
    arr = (xray_like().astype(np.uint16) * 16 + 300).astype(np.uint16)
    ok, enc = __import__("cv2").imencode(".png", arr)
    assert ok
    return enc.tobytes()


def rgba_bytes() -> bytes:
    grey = xray_like()
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    rgba[:10, :10, 3] = 0  # a transparent corner
    return pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG")


def palette_bytes() -> bytes:
    return pil_bytes(Image.fromarray(xray_like()).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")


def cmyk_jpeg_bytes() -> bytes:
    return pil_bytes(Image.fromarray(xray_like()).convert("CMYK"), "JPEG", quality=90)


def chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_header_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny PNG whose header claims width x height 8-bit grey pixels (a few bytes of data)."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    idat = zlib.compress(b"\x00" * (width + 1))  # one row only
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_zero_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A *valid* PNG of width x height black pixels, ~400 KB compressed (a decompression bomb)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    parts = [comp.compress(row * 500) for _ in range(height // 500)]
    parts.append(comp.flush())
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def jpeg_header_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A small valid JPEG whose SOF marker is patched to claim width x height."""
    data = bytearray(jpeg_bytes())
    i = 2
    while i < len(data):
        marker = data[i + 1]
        seglen = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 7] = height.to_bytes(2, "big")
            data[i + 7 : i + 9] = width.to_bytes(2, "big")
            return bytes(data)
        i += 2 + seglen
    raise AssertionError("no SOF marker found")


PATIENT = {
    "PatientName": "Doe^Jane^Quincy",
    "PatientID": "MRN-77341902",
    "PatientBirthDate": "19510317",
}


def dicom_bytes(
    arr: np.ndarray | None = None,
    photometric: str = "MONOCHROME2",
    patient: dict | None = None,
    rows_cols: tuple[int, int] | None = None,
) -> bytes:
    """A DICOM file (Explicit VR Little Endian, 16-bit grey) built with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    for k, v in (patient or {}).items():
        setattr(ds, k, v)
    if arr is not None or rows_cols is not None:
        if arr is None:
            rows, cols = rows_cols
            pixels = np.zeros((64, 64), np.uint16).tobytes()  # far fewer bytes than claimed
        else:
            rows, cols = arr.shape
            pixels = arr.astype(np.uint16).tobytes()
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def monochrome1_arr() -> np.ndarray:
    """12-bit values where bone (a bright band in MONOCHROME2 terms) is stored *low*."""
    grey = xray_like().astype(np.float32)
    grey[100:140, :] = 250  # a bright 'bone' band in display terms
    return (4095 - grey * 16).astype(np.uint16)  # MONOCHROME1: high value = dark



# --------------------------------------------------------------------------------------------
# Write guard: sys.addaudithook sees every Python-level open(); one hook, switched on and off
# --------------------------------------------------------------------------------------------
class WriteWatch:
    """sys.addaudithook cannot be removed, so one hook is installed and switched on and off."""

    def __init__(self):
        self.active = False
        self.writes: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if not self.active or event != "open":
            return
        path, mode, flags = (list(args) + [None, None, None])[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        if writing and path is not None and not str(path).startswith("/dev/"):
            self.writes.append(str(path))

    def __enter__(self):
        self.writes = []
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False
        return False


WRITE_WATCH = WriteWatch()


def colour_photo_bytes(size: int = 320, seed: int = 1) -> bytes:
    """A colourful synthetic 'photograph': smooth blobs of many saturated hues, as JPEG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    hue = (xx * 0.8 + 0.3 * np.sin(6 * yy) + rng.normal(0, 0.02, xx.shape)) % 1.0
    sat = 0.6 + 0.4 * np.cos(3 * xx * yy) ** 2
    val = 0.5 + 0.4 * np.sin(4 * xx + 2 * yy) ** 2
    hsv = np.dstack([hue, sat, val]) * 255
    rgb = Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
    return pil_bytes(rgb, "JPEG", quality=90)


# --------------------------------------------------------------------------------------------
# A tiny run folder with a known answer: P(covid) = sigmoid(2 * GAIN * (mean/255 - MID))
# --------------------------------------------------------------------------------------------
GAIN, MID = 12.0, 0.5


def brightness_model(size: int = 64):
    """A real Keras model (contract layer names) whose P(covid) depends only on mean brightness."""
    import keras
    from keras import layers

    raw = keras.Input((size, size, 1), name="image")
    x = layers.Rescaling(1 / 255.0, name="rescale")(raw)
    conv = layers.Conv2D(1, 1, name="last_conv")
    x = conv(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    dense = layers.Dense(2, name="logits")
    x = dense(x)
    out = layers.Activation("softmax", name="probs")(x)
    model = keras.Model(raw, out, name="brightness")
    conv.set_weights([np.ones((1, 1, 1, 1), np.float32), np.zeros(1, np.float32)])
    dense.set_weights([np.array([[GAIN, -GAIN]], np.float32), np.array([-GAIN * MID, GAIN * MID], np.float32)])
    return model


def expected_p_covid(image: np.ndarray) -> float:
    """The brightness model's answer for a raw grey image at its input size."""
    z = 2 * GAIN * (float(np.mean(image)) / 255.0 - MID)
    return float(1 / (1 + np.exp(-z)))


def brightness_run(runs_root: Path, name: str = "20260101-000000-brightness", size: int = 64) -> Path:
    """A complete, hash-checked run folder holding :func:`brightness_model`."""
    from core import runs

    run = Path(runs_root) / name
    run.mkdir(parents=True, exist_ok=True)
    runs.atomic_save_model(brightness_model(size), run / "model.keras")
    cfg = {"task": "binary", "classes": ["covid", "other"], "preset": "brightness", "size": size, "seed": 0,
           "epochs": 0, "model_sha256": runs.sha256(run / "model.keras")}
    runs.write_json(run / "config.json", cfg)
    runs.write_json(run / "env.json", {"python": sys.version.split()[0]})
    runs.write_json(run / "metrics.json", {"threshold": {"value": 0.5, "ci_low": 0.5, "ci_high": 0.5}})
    return run


def env_without_secrets(**extra) -> dict:
    """The current environment plus ``extra`` (for CLI subprocesses)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def tree_listing(*roots: Path) -> dict[str, tuple[int, int]]:
    """{path: (size, mtime_ns)} of every file under ``roots`` (for before/after comparisons)."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in {".venv", ".git", "__pycache__", ".pytest_cache",
                                                            ".ruff_cache", ".hypothesis"}]
            for f in filenames:
                p = os.path.join(dirpath, f)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                out[p] = (st.st_size, st.st_mtime_ns)
    return out


def json_or_none(text: str):
    """Parse ``text`` as JSON, or None."""
    try:
        return json.loads(text)
    except ValueError:
        return None
