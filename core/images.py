"""The one image-decoding path: bytes, path or DICOM -> float32 grey array.

Training, the CLIs and the dashboard all call :func:`load`, so an image is seen the same way
everywhere. The result is a float32 array of shape (size, size) with values in [0, 255]
("raw pixels"); every other preprocessing step lives inside the saved model.

Bad input raises :class:`ImageError`, which names the file and the reason. Batches use
:func:`load_many`, which skips bad files, reports them and keeps the rest.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

# Refuse images larger than this before their pixels are allocated (decompression bombs).
MAX_PIXELS = 60_000_000
# Refuse files larger than this (bytes) before reading them.
MAX_BYTES = 64 * 1024 * 1024
# A chest X-ray smaller than this on its shorter side carries no usable detail.
MIN_SIDE = 32

DICOM_SUFFIXES = {".dcm", ".dicom"}

Image.MAX_IMAGE_PIXELS = None  # we enforce MAX_PIXELS ourselves, with a clearer message


class ImageError(ValueError):
    """An input that cannot be used as a chest X-ray image.

    ``name`` is the file (or upload) name and ``reason`` says why, in words a user can act on.
    """

    def __init__(self, name: str, reason: str):
        self.name = str(name)
        self.reason = reason
        super().__init__(f"{self.name}: {reason}")


Source = str | os.PathLike | bytes | bytearray | memoryview


def read_bytes(src: Source, name: str | None = None) -> tuple[bytes, str]:
    """Return ``(data, name)`` for a path or bytes, refusing missing, empty or huge files."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        name = name or "<upload>"
    else:
        path = Path(src)
        name = name or str(path)
        try:
            nbytes = path.stat().st_size
        except FileNotFoundError:
            raise ImageError(name, "file not found") from None
        except OSError as exc:
            raise ImageError(name, f"cannot read file ({exc.strerror or exc})") from None
        if nbytes > MAX_BYTES:
            raise ImageError(name, f"file is {nbytes / 2**20:.0f} MiB, over the {MAX_BYTES // 2**20} MiB limit")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(name, f"cannot read file ({exc.strerror or exc})") from None
    if len(data) == 0:
        raise ImageError(name, "file is empty")
    if len(data) > MAX_BYTES:
        raise ImageError(name, f"file is {len(data) / 2**20:.0f} MiB, over the {MAX_BYTES // 2**20} MiB limit")
    return data, name


def is_dicom(data: bytes, name: str = "") -> bool:
    """DICOM files carry 'DICM' at byte 128; some old ones only have the suffix."""
    return data[128:132] == b"DICM" or Path(name).suffix.lower() in DICOM_SUFFIXES


def _check_size(name: str, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(
            name, f"image is {width}x{height} pixels, over the limit of {MAX_PIXELS / 1e6:.0f} megapixels"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(name, f"image is only {width}x{height} pixels; at least {MIN_SIDE} per side is needed")


def _stretch(arr: np.ndarray) -> np.ndarray:
    """Min-max stretch to float32 [0, 255]; high-bit-depth X-rays rarely use their full range."""
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)


def _decode_pil(data: bytes, name: str) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(name, "not an image (unrecognised file format)") from None
    except Exception as exc:  # PIL raises many types on garbage headers
        raise ImageError(name, f"not a readable image ({exc})") from None
    if img.format not in {"PNG", "JPEG", "MPO", "BMP", "TIFF", "GIF", "WEBP"}:
        raise ImageError(name, f"unsupported image format {img.format}")
    _check_size(name, *img.size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = ImageOps.exif_transpose(img)  # phone photos and some scanners rotate by EXIF
            img.load()
    except Exception as exc:
        raise ImageError(name, f"image data is truncated or corrupt ({exc})") from None
    mode = img.mode
    if mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        return _stretch(np.asarray(img))
    if mode == "F":
        return _stretch(np.asarray(img))
    if mode in {"RGBA", "LA", "PA"} or (mode == "P" and "transparency" in img.info):
        # Composite transparency onto black, as a viewer would show an X-ray.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("L"), dtype=np.float32)


def _decode_dicom(data: bytes, name: str) -> np.ndarray:
    # lazy: pydicom costs ~0.3 s and only DICOM files need it; every CLI imports this module
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise ImageError(name, f"not a readable DICOM file ({exc})") from None
    if "PixelData" not in ds:
        raise ImageError(name, "DICOM file has no pixel data")
    try:
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    except Exception:
        raise ImageError(name, "DICOM file has invalid Rows/Columns") from None
    _check_size(name, cols, rows)
    # Corrupt headers make pydicom raise almost anything (found by tests/test_fuzz.py): one error type.
    try:
        arr = ds.pixel_array
        if arr.ndim >= 3 and ds.get("SamplesPerPixel", 1) == 1:
            arr = arr[0]  # multi-frame: the first frame
        if arr.ndim >= 4:
            arr = arr[0]  # multi-frame colour: the first frame
    except Exception as exc:
        raise ImageError(name, f"cannot decode DICOM pixel data ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from None
    if arr.ndim == 3 and arr.shape[-1] == 3:  # colour DICOM (secondary capture): to grey
        return cv2.cvtColor(arr.astype(np.uint8), cv2.COLOR_RGB2GRAY).astype(np.float32)
    if arr.ndim != 2:
        raise ImageError(name, f"DICOM pixel data has unsupported shape {arr.shape}")
    try:
        arr = apply_modality_lut(arr, ds)  # rescale slope/intercept
        arr = apply_voi_lut(arr, ds)  # window centre/width or VOI LUT when present
        photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    except Exception as exc:
        raise ImageError(name, f"DICOM rescale or window values are invalid ({type(exc).__name__})") from None
    arr = _stretch(arr)
    if photometric == "MONOCHROME1":
        arr = 255.0 - arr  # MONOCHROME1 stores bone dark: invert so that bone is bright
    return arr


def decode(src: Source, name: str | None = None) -> np.ndarray:
    """Decode a file path or bytes to a float32 grey array in [0, 255] at native size."""
    data, name = read_bytes(src, name)
    arr = _decode_dicom(data, name) if is_dicom(data, name) else _decode_pil(data, name)
    if not np.isfinite(arr).all():
        raise ImageError(name, "image contains invalid (non-finite) values")
    return np.ascontiguousarray(arr, dtype=np.float32)


def resize(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize a grey array to size x size (area interpolation when shrinking)."""
    h, w = arr.shape[:2]
    interp = cv2.INTER_AREA if size < max(h, w) else cv2.INTER_LINEAR
    return cv2.resize(arr, (size, size), interpolation=interp).astype(np.float32)


def load(src: Source, size: int | None = None, name: str | None = None) -> np.ndarray:
    """Decode ``src`` (path or bytes; PNG, JPEG or DICOM) to float32 grey in [0, 255].

    With ``size`` the image is resized to ``size x size``. Raises :class:`ImageError` for any
    input that is not a usable image.
    """
    arr = decode(src, name)
    return resize(arr, size) if size else arr


def load_many(
    paths: Iterable[Source], size: int, progress: bool = False
) -> tuple[np.ndarray, list[int], list[ImageError]]:
    """Load a batch; bad files are skipped and reported.

    Returns ``(images, kept, errors)``: an array (n_ok, size, size), the indices of the inputs
    that loaded, and one :class:`ImageError` per input that did not.
    """
    paths = list(paths)
    out, kept, errors = [], [], []
    iterator = paths
    if progress:
        iterator = tqdm(paths, desc="decoding", unit="img")
    for i, p in enumerate(iterator):
        try:
            out.append(load(p, size))
            kept.append(i)
        except ImageError as err:
            errors.append(err)
    images = np.stack(out) if out else np.zeros((0, size, size), np.float32)
    return images, kept, errors
