"""Decode image bytes (TIFF, PNG, JPEG, ...) and normalise intensities for the model.

EM data arrives as 8-bit or 16-bit greyscale (sometimes saved as RGB), as TIFF or PNG/JPEG. ``decode_image`` keeps
the raw values (no silent down-conversion of 16-bit data); ``normalize`` maps each image to ~[0, 1] with robust
percentiles so that contrast differences between sections or microscopes do not shift the model's input range.
Every decoding failure is an ``ImageDecodeError`` with a message a user can act on.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

__all__ = ["ImageDecodeError", "decode_image", "load_image", "normalize", "to_greyscale"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Luminance weights of ITU-R BT.601, the same as Pillow's RGB -> L conversion.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Percentiles are estimated on at most this many pixels: exact enough, and no full-size copy for huge sections.
_PERCENTILE_SAMPLES = 4_000_000


class ImageDecodeError(ValueError):
    """Image bytes that cannot be decoded (corrupt, empty, unsupported layout, or larger than allowed)."""


def _check_size(height: int, width: int, max_pixels: int | None) -> None:
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"image has no pixels ({height}x{width})")
    if max_pixels is not None and height * width > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {height * width:,} pixels, more than the allowed {max_pixels:,} "
            "(raise MAX_IMAGE_PIXELS or tile the image first)"
        )


def _describe(data: bytes) -> str:
    return f"{len(data)} bytes starting with {data[:8]!r}"


def _decode_tiff(data: bytes, max_pixels: int | None) -> np.ndarray:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        if not tif.pages:
            raise ImageDecodeError(f"cannot decode TIFF ({_describe(data)}): it has no readable image pages")
        page = tif.pages[0]
        shape = page.shape
        # Check the declared size before decompressing: a tiny file can declare a gigantic image.
        spatial = shape[1:3] if len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4) else shape[:2]
        if len(shape) < 2:
            raise ImageDecodeError(f"TIFF page has unsupported shape {shape}")
        _check_size(int(spatial[0]), int(spatial[1]), max_pixels)
        arr = page.asarray()
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):  # planar RGB(A)
        arr = np.moveaxis(arr, 0, -1)
    return arr


_PIL_CONVERT = {
    "1": "L",
    "P": "RGBA",
    "PA": "RGBA",
    "LA": "L",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "LAB": "RGB",
    "HSV": "RGB",
}


def _decode_pillow(data: bytes, max_pixels: int | None) -> np.ndarray:
    with warnings.catch_warnings():
        # Our own max_pixels check replaces Pillow's decompression-bomb warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            _check_size(im.height, im.width, max_pixels)
            im.load()
            mode = im.mode
            if mode in _PIL_CONVERT:
                im = im.convert(_PIL_CONVERT[mode])  # palette/binary/other colour spaces -> plain L/RGB(A)
            arr = np.asarray(im)
    if mode == "I" or arr.dtype == np.int32:
        # 32-bit integer mode: usually 16-bit data widened by the decoder; keep it as uint16 when it fits.
        arr = arr.astype(np.uint16) if arr.min() >= 0 and arr.max() <= 65535 else arr.astype(np.float32)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr


def decode_image(data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
    """Raw pixel array: (H, W) uint8/uint16/float32 or (H, W, 3|4); TIFF via tifffile (first page), else Pillow."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"expected image bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageDecodeError("image data is empty (0 bytes)")
    is_tiff = data[:4] in _TIFF_MAGIC
    try:
        arr = _decode_tiff(data, max_pixels) if is_tiff else _decode_pillow(data, max_pixels)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large to decode safely: {exc}") from exc
    except Exception as exc:  # decoders raise many types (OSError, ValueError, struct.error, ...) for bad input
        kind = "TIFF" if is_tiff else "image"
        raise ImageDecodeError(f"cannot decode {kind} ({_describe(data)}): {exc}") from exc
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (2, 3, 4))):
        raise ImageDecodeError(f"unsupported image layout {arr.shape} (expected (H, W) or (H, W, 3|4))")
    if arr.ndim == 3 and arr.shape[-1] == 2:  # greyscale + alpha
        arr = arr[..., 0]
    _check_size(arr.shape[0], arr.shape[1], max_pixels)
    return arr


def to_greyscale(arr: np.ndarray) -> np.ndarray:
    """float32 (H, W); RGB(A) -> BT.601 luminance (alpha ignored). Values keep their range (0..255, 0..65535)."""
    a = np.asarray(arr)
    if a.ndim == 2:
        return a.astype(np.float32)  # always a new array: callers may normalise it in place
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        return np.tensordot(a[..., :3].astype(np.float32, copy=False), _LUMA, axes=([-1], [0]))
    if a.ndim == 3 and a.shape[-1] in (1, 2):
        return a[..., 0].astype(np.float32)
    raise ImageDecodeError(f"cannot convert array of shape {a.shape} to greyscale")


def normalize(arr: np.ndarray) -> np.ndarray:
    """float32 (H, W) robustly scaled to [0, 1]: 1st percentile -> 0, 99th -> 1, clipped; constant image -> zeros."""
    a = np.asarray(arr)
    out = to_greyscale(a) if a.ndim != 2 else np.array(a, dtype=np.float32, copy=True)
    return _normalize_inplace(out)


def _normalize_inplace(out: np.ndarray) -> np.ndarray:
    """``normalize`` on a float32 array we own (no second full-size copy for huge sections)."""
    finite = np.isfinite(out)
    all_finite = bool(finite.all())
    if not all_finite:
        if not finite.any():
            return np.zeros_like(out)
        out[~finite] = np.nan
    step = max(1, int(np.ceil(np.sqrt(out.size / _PERCENTILE_SAMPLES))))
    sample = out[::step, ::step]
    lo, hi = (np.percentile(sample, [1, 99]) if all_finite else np.nanpercentile(sample, [1, 99])).tolist()
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        # Sparse structure on a flat background (e.g. a few bright dots) collapses the percentiles: fall back to the
        # full range so the structure is not lost; a truly constant image carries no signal.
        lo, hi = float(np.nanmin(out)), float(np.nanmax(out))
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            return np.zeros_like(out)
    out -= lo
    out *= 1.0 / (hi - lo)
    np.clip(out, 0.0, 1.0, out=out)
    if not all_finite:
        np.nan_to_num(out, copy=False, nan=0.0)
    return out


def load_image(source: bytes | str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Normalised float32 (H, W) image from bytes or a file path (decode + greyscale + normalize)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise ImageDecodeError(f"image file not found: {path}") from exc
        except IsADirectoryError as exc:
            raise ImageDecodeError(f"image path is a directory, not a file: {path}") from exc
        try:
            return _normalize_inplace(to_greyscale(decode_image(data, max_pixels=max_pixels)))
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"{path}: {exc}") from exc
    return _normalize_inplace(to_greyscale(decode_image(source, max_pixels=max_pixels)))
