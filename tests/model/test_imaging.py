"""Image decoding (8/16-bit, RGB(A), TIFF/PNG/JPEG), size guard, corrupt input and normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from ml_backend.imaging import ImageDecodeError, decode_image, load_image, normalize, to_greyscale

RNG = np.random.default_rng(0)
GREY8 = RNG.integers(0, 256, (40, 60), dtype=np.uint8)
GREY16 = RNG.integers(0, 65536, (40, 60), dtype=np.uint16)
RGB8 = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)
RGBA8 = RNG.integers(0, 256, (40, 60, 4), dtype=np.uint8)


def pil_bytes(arr: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def tiff_bytes(arr: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("arr", "encode"),
    [
        (GREY8, pil_bytes),
        (GREY16, pil_bytes),
        (RGB8, pil_bytes),
        (RGBA8, pil_bytes),
        (GREY8, tiff_bytes),
        (GREY16, tiff_bytes),
        (RGB8, tiff_bytes),
        (GREY16.astype(np.float32) / 7, tiff_bytes),
    ],
    ids=["png8", "png16", "png-rgb", "png-rgba", "tif8", "tif16", "tif-rgb", "tif-float"],
)
def test_lossless_round_trip(arr, encode):
    out = decode_image(encode(arr))
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_big_endian_16bit_tiff():
    out = decode_image(tiff_bytes(GREY16, byteorder=">"))
    assert out.dtype == np.uint16 and out.dtype.byteorder in ("=", "<", "|")
    np.testing.assert_array_equal(out, GREY16)


def test_planar_rgb_tiff_and_compressed_tiff():
    np.testing.assert_array_equal(
        decode_image(tiff_bytes(np.moveaxis(RGB8, -1, 0), planarconfig="separate", photometric="rgb")), RGB8
    )
    np.testing.assert_array_equal(decode_image(tiff_bytes(GREY16, compression="zlib")), GREY16)


def test_multipage_tiff_gives_first_page():
    stack = np.stack([GREY8, 255 - GREY8])
    np.testing.assert_array_equal(decode_image(tiff_bytes(stack)), GREY8)


def test_jpeg_and_palette_png():
    smooth = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (32, 1))
    out = decode_image(pil_bytes(smooth, "JPEG", quality=95))
    assert out.shape == (32, 64) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - smooth).mean() < 3
    pal = Image.fromarray(RGB8).convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert decode_image(buf.getvalue()).shape[:2] == (40, 60)


@pytest.mark.parametrize("encode", [pil_bytes, tiff_bytes], ids=["png", "tiff"])
def test_max_pixels(encode):
    data = encode(GREY8)
    assert decode_image(data, max_pixels=40 * 60).shape == (40, 60)
    with pytest.raises(ImageDecodeError, match=r"60x40 = 2,400 pixels, more than the allowed 2,399"):
        decode_image(data, max_pixels=40 * 60 - 1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"this is not an image at all", "cannot decode image"),
        (pil_bytes(GREY8)[:60], "cannot decode image"),
        (pil_bytes(GREY8, "JPEG")[:200], "cannot decode image"),
        (tiff_bytes(GREY8)[:100], "cannot decode TIFF"),
        (b"II*\x00" + b"\xff" * 20, "cannot decode TIFF"),
    ],
    ids=["empty", "garbage", "truncated-png", "truncated-jpeg", "truncated-tiff", "bad-tiff-header"],
)
def test_corrupt_bytes(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


def test_not_bytes():
    with pytest.raises(ImageDecodeError, match="expected image bytes"):
        decode_image("image.png")  # type: ignore[arg-type]


def test_to_greyscale():
    g = to_greyscale(RGB8)
    assert g.dtype == np.float32 and g.shape == (40, 60)
    expected = RGB8[..., 0] * 0.299 + RGB8[..., 1] * 0.587 + RGB8[..., 2] * 0.114
    np.testing.assert_allclose(g, expected, rtol=1e-5)
    np.testing.assert_allclose(to_greyscale(RGBA8), to_greyscale(RGBA8[..., :3]))
    rgb16 = np.repeat(GREY16[..., None], 3, axis=-1)
    np.testing.assert_allclose(to_greyscale(rgb16), GREY16, rtol=1e-5)  # 16-bit range kept
    with pytest.raises(ImageDecodeError):
        to_greyscale(np.zeros((2, 3, 4, 5)))


def test_normalize_range_and_percentiles():
    img = np.linspace(0, 1000, 100 * 100, dtype=np.float32).reshape(100, 100)
    out = normalize(img)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    assert abs(float(np.median(out)) - 0.5) < 0.01
    assert (out == 0).mean() == pytest.approx(0.01, abs=0.002)


def test_normalize_is_bit_depth_invariant():
    np.testing.assert_allclose(normalize(GREY8), normalize(GREY8.astype(np.uint16) * 257), atol=1e-6)


def test_normalize_constant_sparse_and_nonfinite():
    np.testing.assert_array_equal(normalize(np.full((10, 10), 7, np.uint16)), 0)
    dots = np.zeros((100, 100), np.uint8)
    dots[5, 5] = dots[50, 60] = 200
    out = normalize(dots)
    assert out[5, 5] == 1 and out.sum() == 2, "sparse structure must survive collapsed percentiles"
    nan = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)
    nan[0, 0], nan[1, 1] = np.nan, np.inf
    out = normalize(nan)
    assert np.isfinite(out).all() and out.max() == 1


def test_normalize_large_image_uses_sample():
    img = np.random.default_rng(1).normal(1000, 100, (2500, 2000)).astype(np.float32)
    out = normalize(img)
    assert out.shape == img.shape
    assert (out == 0).mean() == pytest.approx(0.01, abs=0.003)
    assert (out == 1).mean() == pytest.approx(0.01, abs=0.003)


def test_load_image(tmp_path):
    path = tmp_path / "x.tif"
    path.write_bytes(tiff_bytes(GREY16))
    from_path, from_str, from_bytes = load_image(path), load_image(str(path)), load_image(path.read_bytes())
    np.testing.assert_array_equal(from_path, from_bytes)
    np.testing.assert_array_equal(from_str, from_bytes)
    assert from_path.dtype == np.float32 and from_path.shape == (40, 60)
    with pytest.raises(ImageDecodeError, match="not found"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ImageDecodeError, match="bad.png"):
        load_image(bad)
    with pytest.raises(ImageDecodeError, match="more than the allowed"):
        load_image(path, max_pixels=100)


def test_normalize_does_not_modify_its_input():
    img = np.linspace(0, 5, 100, dtype=np.float32).reshape(10, 10)
    before = img.copy()
    normalize(img)
    to_greyscale(img)[:] = 0
    np.testing.assert_array_equal(img, before)
