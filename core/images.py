"""The one image-decoding path: bytes, path or DICOM -> float32 grey array.

Training, the CLIs and the dashboard all call :func:`load`, so an image is seen the same way
everywhere. The result is a float32 array of shape (size, size) with values in [0, 255]
("raw pixels"); every other preprocessing step lives inside the saved model.

Bad input raises :class:`ImageError`, which names the file and the reason. Batches use
:func:`load_many`, which skips bad files, reports them and keeps the rest.

Hostile files are refused before they cost memory: paths are read only when they are regular
files and never past MAX_BYTES; image sizes are checked before pixels are allocated; a deflated
DICOM is inflated with a cap; NaN or infinite pixels and DICOM rescale/window values are refused
rather than stretched into a black film. Paths named by run files go through
:mod:`core.safepath` first (inside the data root only).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
import zlib
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
# Elements per block of the float64 stretch (32 MiB of float64 at a time).
_STRETCH_BLOCK = 4_000_000
# Bytes inflated per step of a deflated DICOM.
_INFLATE_STEP = 2**20

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


def _too_big(name: str, nbytes: int) -> ImageError:
    return ImageError(name, f"file is {nbytes / 2**20:.0f} MiB, over the {MAX_BYTES // 2**20} MiB limit")


def _read_path(path: Path, name: str) -> bytes:
    """At most MAX_BYTES + 1 bytes of a regular file.

    Devices, FIFOs, sockets and folders are refused before they are read: ``/dev/zero`` reports a
    size of 0 and never ends, and a FIFO blocks its reader. The file is opened non-blocking and
    checked again on the open descriptor, so a file swapped in between cannot slip through.
    """
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)) if regular else -1
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ImageError(name, f"cannot read file ({getattr(exc, 'strerror', None) or exc})") from None
    if fd < 0:
        raise ImageError(name, "not a regular file")
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(name, "not a regular file")
        if st.st_size > MAX_BYTES:
            raise _too_big(name, st.st_size)
        try:
            data = fh.read(st.st_size + 1)
            if len(data) > st.st_size:  # grew since fstat: read on, but never past the cap
                data += fh.read(MAX_BYTES + 1 - len(data))
        except OSError as exc:
            raise ImageError(name, f"cannot read file ({exc.strerror or exc})") from None
    return data


def read_bytes(src: Source, name: str | None = None) -> tuple[bytes, str]:
    """Return ``(data, name)`` for a path or bytes, refusing missing, empty, huge or non-regular files.

    A path is read only when it is a regular file, and never more than MAX_BYTES + 1 bytes of it.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        name = name or "<upload>"
    else:
        path = Path(src)
        name = name or str(path)
        data = _read_path(path, name)
    if len(data) == 0:
        raise ImageError(name, "file is empty")
    if len(data) > MAX_BYTES:
        raise _too_big(name, len(data))
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


def _stretch(arr: np.ndarray, name: str = "") -> np.ndarray:
    """Min-max stretch to float32 [0, 255]; high-bit-depth X-rays rarely use their full range.

    One NaN would make min and max NaN and the whole film black, so non-finite pixels are refused
    here, before anything is scored. The stretch runs in float64 (in row blocks, to keep memory
    flat), so finite values near the float32 limits (+-3e38) neither overflow nor warn.
    """
    arr = np.asarray(arr)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ImageError(name, "image contains invalid pixel values (NaN or infinity)")
    lo, hi = float(arr.min()), float(arr.max())
    if not np.isfinite(hi - lo):  # only float64 values beyond +-9e307 (a DICOM rescale) get here
        raise ImageError(name, "image pixel values are out of range")
    out = np.zeros(arr.shape, np.float32)
    if hi > lo:
        scale = 255.0 / (hi - lo)
        step = max(1, _STRETCH_BLOCK // max(1, arr[0].size))
        for i in range(0, arr.shape[0], step):
            out[i:i + step] = (arr[i:i + step].astype(np.float64) - lo) * scale
    return out


def reduction(width: int, height: int, need: int | None, steps=(8, 4, 2)) -> int:
    """The largest factor in ``steps`` (JPEG's DCT scalings) that keeps the shorter side >= ``need``; 1 if none."""
    if not need:
        return 1
    return next((k for k in steps if min(width, height) // k >= need), 1)


def _decode_pil(data: bytes, name: str, need: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """``(pixels, native (height, width))``; a large JPEG decoded at a reduced scale when ``need`` allows."""
    img = _open_pil(data, name)
    native_w, native_h = img.size
    k = reduction(*img.size, need)
    if k > 1 and img.format == "JPEG" and img.mode in {"L", "RGB", "YCbCr"}:
        # DCT-domain reduction by 1/2, 1/4 or 1/8 inside libjpeg: cheaper than decoding every pixel
        img.draft("L", (-(-native_w // k), -(-native_h // k)))
    stored = img.size
    arr = _plain_png(data, img)
    if arr is None:
        arr = _pil_pixels(img, name)
    if (arr.shape[1], arr.shape[0]) != stored:  # EXIF rotation by 90 degrees swapped the axes
        native_w, native_h = native_h, native_w
    return arr, (native_h, native_w)


def _plain_png(data: bytes, img) -> np.ndarray | None:
    """An 8-bit grey PNG without EXIF decoded by OpenCV (same pixels, about twice as fast as PIL's
    zlib path); None for any other file, or when OpenCV fails (PIL then decodes it and names the error)."""
    if img.format != "PNG" or img.mode != "L" or {"exif", "transparency", "icc_profile"} & img.info.keys():
        return None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint8 or arr.shape != (img.size[1], img.size[0]):
        return None
    return arr.astype(np.float32)


def _open_pil(data: bytes, name: str):
    """The PIL image of ``data`` (header read, pixels not yet), or ImageError; size checked."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(name, "not an image (unrecognised file format)") from None
    except Exception as exc:  # PIL raises many types on garbage headers
        raise ImageError(name, f"not a readable image ({exc})") from None
    if img.format not in {"PNG", "JPEG", "MPO", "BMP", "TIFF", "GIF", "WEBP"}:
        raise ImageError(name, f"unsupported image format {img.format}")
    _check_size(name, *img.size)
    return img


def _pil_pixels(img, name: str) -> np.ndarray:
    """Grey float32 pixels of an opened PIL image (EXIF rotation, 16-bit stretch, alpha on black)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = ImageOps.exif_transpose(img)  # phone photos and some scanners rotate by EXIF
            img.load()
    except Exception as exc:
        raise ImageError(name, f"image data is truncated or corrupt ({exc})") from None
    mode = img.mode
    if mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        return _stretch(np.asarray(img), name)
    if mode == "F":
        return _stretch(np.asarray(img), name)
    if mode in {"RGBA", "LA", "PA"} or (mode == "P" and "transparency" in img.info):
        # Composite transparency onto black, as a viewer would show an X-ray.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("L"), dtype=np.float32)


def _inflate_dicom(data: bytes, name: str) -> bytes:
    """A deflated DICOM (transfer syntax 1.2.840.10008.1.2.1.99) inflated with a cap, as explicit VR
    little endian; any other file unchanged.

    pydicom inflates the whole dataset at once, so a 2 MB file whose body inflates to gigabytes
    would fill memory before any size check. Here the body may inflate to at most MAX_BYTES, the
    same limit an uncompressed file has.
    """
    # lazy: pydicom costs ~0.3 s and only DICOM files need it; every CLI imports this module
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    fp = io.BytesIO(data)
    try:
        read_preamble(fp, force=True)
        # pydicom has no public reader of the file meta from bytes; dcmread uses this same one.
        meta = _read_file_meta_info(fp)
    except Exception as exc:
        raise ImageError(name, f"not a readable DICOM file ({str(exc)[:120]})") from None
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return data
    body = _capped_inflate(data[fp.tell():], name)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)
    return out.getvalue() + body


def _capped_inflate(raw: bytes, name: str) -> bytes:
    """Raw deflate data inflated 1 MiB at a time; refused as soon as it passes MAX_BYTES."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    chunks, total, tail = [], 0, raw
    try:
        while True:
            piece = inflater.decompress(tail, _INFLATE_STEP)
            stalled = not piece and len(inflater.unconsumed_tail) == len(tail)
            tail = inflater.unconsumed_tail
            total += len(piece)
            if total > MAX_BYTES:
                raise ImageError(name, f"deflated DICOM data inflates to over {MAX_BYTES // 2**20} MiB, "
                                       "past the limit; refused unread")
            chunks.append(piece)
            if stalled or inflater.eof:
                break
    except zlib.error:
        raise ImageError(name, "deflated DICOM data is corrupt") from None
    return b"".join(chunks)


def _finite_dicom_numbers(ds, name: str) -> None:
    """Refuse NaN or infinite rescale and window values: they turn every pixel into NaN."""
    for key in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if key not in ds:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns on odd DS strings such as "NaN"
                value = ds[key].value
                values = np.asarray(list(value) if ds[key].VM > 1 else [value], dtype=np.float64)
        except Exception:
            raise ImageError(name, f"DICOM {key} is not a number") from None
        if not np.isfinite(values).all():
            raise ImageError(name, f"DICOM {key} is not a finite number")


def _pixel_error(exc: Exception, ds) -> str:
    """One complete sentence for pydicom's decode errors; for a missing decoder, what to install."""
    text = str(exc)
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    syntax = getattr(syntax, "name", None) or str(syntax or "an unknown transfer syntax")
    if "missing dependencies" in text:
        # pydicom lists one "<plugin> - requires <a> and <b>" line per decoder it knows of.
        needs = [ln.split("requires", 1)[1].strip().replace("numpy and ", "").replace("gdcm", "python-gdcm")
                 for ln in text.splitlines()[1:] if "requires" in ln]
        hint = f"install one of: {'; '.join(needs)}" if needs else "no decoder for it is installed"
        return f"DICOM pixel data is compressed as {syntax}, which needs a decoder that is not installed ({hint})"
    if "is not supported" in text:
        return f"DICOM pixel data is compressed as {syntax}, which this tool does not support"
    first = text.splitlines()[0][:200] if text else type(exc).__name__
    return f"cannot decode DICOM pixel data ({first})"


def _dicom_pixels(ds, name: str) -> np.ndarray:
    """The first frame's pixels (grey 2-D or RGB 3-D), decoding one frame only."""
    # lazy: see _inflate_dicom
    from pydicom.pixels import pixel_array

    # Corrupt headers make pydicom raise almost anything (found by tests/test_fuzz.py): one error type.
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        arr = pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
        if arr.ndim >= 3 and ds.get("SamplesPerPixel", 1) == 1:
            arr = arr[0]  # multi-frame: the first frame
        if arr.ndim >= 4:
            arr = arr[0]  # multi-frame colour: the first frame
    except Exception as exc:
        raise ImageError(name, _pixel_error(exc, ds)) from None
    return arr


def _decode_dicom(data: bytes, name: str) -> np.ndarray:
    # lazy: see _inflate_dicom
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    data = _inflate_dicom(data, name)
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
    arr = _dicom_pixels(ds, name)
    if arr.ndim == 3 and arr.shape[-1] == 3:  # colour DICOM (secondary capture): to grey
        return cv2.cvtColor(arr.astype(np.uint8), cv2.COLOR_RGB2GRAY).astype(np.float32)
    if arr.ndim != 2:
        raise ImageError(name, f"DICOM pixel data has unsupported shape {arr.shape}")
    _finite_dicom_numbers(ds, name)
    try:
        arr = apply_modality_lut(arr, ds)  # rescale slope/intercept
        arr = apply_voi_lut(arr, ds)  # window centre/width or VOI LUT when present
        photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    except Exception as exc:
        raise ImageError(name, f"DICOM rescale or window values are invalid ({type(exc).__name__})") from None
    arr = _stretch(arr, name)
    if photometric == "MONOCHROME1":
        arr = 255.0 - arr  # MONOCHROME1 stores bone dark: invert so that bone is bright
    return arr


def decode_sized(src: Source, name: str | None = None, need: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """``(pixels, (height, width))``: :func:`decode`'s float32 grey array and the film's native size.

    With ``need`` (pixels), a film whose shorter side is at least twice ``need`` comes back smaller
    by 2, 4 or 8, its shorter side still >= ``need``: a JPEG is decoded at that scale by libjpeg
    (DCT-domain, most of the decoding work skipped); PNG, DICOM and the rest are decoded in full and
    reduced once by area averaging. The native size stays known for what needs it (overlays, checks).
    """
    data, name = read_bytes(src, name)
    native = None
    if is_dicom(data, name):
        arr = _decode_dicom(data, name)
    else:
        arr, native = _decode_pil(data, name, need)
    if not np.isfinite(arr).all():
        raise ImageError(name, "image contains invalid (non-finite) values")
    native = native or (int(arr.shape[0]), int(arr.shape[1]))
    return shrink(arr, need), native


def shrink(arr: np.ndarray, need: int | None) -> np.ndarray:
    """A decoded film reduced as :func:`decode_sized` reduces what was not reduced while decoding (PNG,
    DICOM...): by the :func:`reduction` factor, once, by an exact k x k box average; float32."""
    k = reduction(arr.shape[1], arr.shape[0], need)
    if k > 1:
        arr = cv2.resize(arr, (arr.shape[1] // k, arr.shape[0] // k), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(arr, dtype=np.float32)


def is_jpeg(data: bytes) -> bool:
    """JPEG's start-of-image marker: the one format :func:`decode_sized` may reduce inside the decoder."""
    return data[:3] == b"\xff\xd8\xff"


def at_need(data: bytes, native: np.ndarray, need: int | None, name: str | None = None) -> np.ndarray:
    """The film exactly as ``decode(data, name, need)`` reads it, for a caller that already holds its
    native decode ``native``: a JPEG reduced inside its decoder is decoded again at the reduced scale;
    any other film is ``native`` reduced by :func:`shrink`, not decoded twice."""
    if reduction(native.shape[1], native.shape[0], need) > 1 and is_jpeg(data):
        return decode(data, name, need)
    return shrink(native, need)


def decode(src: Source, name: str | None = None, need: int | None = None) -> np.ndarray:
    """Decode a file path or bytes to a float32 grey array in [0, 255] at native size (with ``need``:
    possibly reduced by 2, 4 or 8 to a shorter side >= ``need``; see :func:`decode_sized`)."""
    return decode_sized(src, name, need)[0]


def resize(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize a grey array to size x size (area interpolation when shrinking)."""
    h, w = arr.shape[:2]
    interp = cv2.INTER_AREA if size < max(h, w) else cv2.INTER_LINEAR
    return cv2.resize(arr, (size, size), interpolation=interp).astype(np.float32)


def load(src: Source, size: int | None = None, name: str | None = None, need: int | None = None) -> np.ndarray:
    """Decode ``src`` (path or bytes; PNG, JPEG or DICOM) to float32 grey in [0, 255].

    With ``size`` the image is resized to ``size x size``; ``need``: see :func:`decode_sized`. Raises
    :class:`ImageError` for any input that is not a usable image.
    """
    arr = decode(src, name, need)
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
