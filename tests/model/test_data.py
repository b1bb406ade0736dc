"""Generated EM-like data, stack readers (TIFF stacks, slice folders, 8/16-bit, masks) and the real VNC data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage as ndi

from ml_backend.data import Slice, generate_em_like, read_labelled_stack, read_stack
from ml_backend.imaging import ImageDecodeError

REPO = Path(__file__).resolve().parents[2]
VNC = Path(os.environ.get("VNC_DATA_DIR", REPO.parent / "shared" / "data" / "vnc"))


class TestGenerator:
    def test_shapes_dtypes_and_determinism(self):
        imgs, masks = generate_em_like(3, 64, seed=5)
        assert imgs.shape == masks.shape == (3, 64, 64)
        assert imgs.dtype == masks.dtype == np.uint8
        assert set(np.unique(masks)) <= {0, 1}
        again, again_masks = generate_em_like(3, 64, seed=5)
        np.testing.assert_array_equal(imgs, again)
        np.testing.assert_array_equal(masks, again_masks)
        other, _ = generate_em_like(3, 64, seed=6)
        assert not np.array_equal(imgs, other)

    def test_prefix_and_chunking_are_consistent(self):
        imgs, masks = generate_em_like(4, 48, seed=1)
        first, _ = generate_em_like(2, 48, seed=1)
        tail, tail_masks = generate_em_like(2, 48, seed=1, start=2)
        np.testing.assert_array_equal(imgs[:2], first)
        np.testing.assert_array_equal(imgs[2:], tail)
        np.testing.assert_array_equal(masks[2:], tail_masks)

    def test_foreground_fraction_and_appearance(self):
        imgs, masks = generate_em_like(6, 256, seed=0)
        fg = masks.mean(axis=(1, 2))
        assert ((fg > 0.04) & (fg < 0.12)).all(), fg
        # Mitochondria are darker than their surroundings but not separable by intensity alone (membranes and
        # vesicles are dark too): a threshold at the foreground's median intensity leaves many false positives.
        fg_vals, bg_vals = imgs[masks == 1], imgs[masks == 0]
        assert fg_vals.mean() < bg_vals.mean() - 30
        thr = np.median(fg_vals)
        dark_bg = (bg_vals <= thr).sum()
        assert dark_bg > 0.5 * (fg_vals <= thr).sum(), "task is trivially thresholdable"
        # Bodies are elongated and compact, a handful per tile.
        labels, n = ndi.label(masks[0])
        assert 5 <= n <= 60
        ys, xs = np.nonzero(labels == np.bincount(labels.ravel())[1:].argmax() + 1)
        ev = np.linalg.eigvalsh(np.cov(np.stack([ys, xs])))
        assert ev[1] / ev[0] > 1.5, "largest body should be elongated"

    def test_small_tiles_and_bad_args(self):
        imgs, masks = generate_em_like(2, 16, seed=0)
        assert imgs.shape == (2, 16, 16)
        assert generate_em_like(0, 32)[0].shape == (0, 32, 32)
        with pytest.raises(ValueError):
            generate_em_like(1, 4)


def _write_slices(folder: Path, stack: np.ndarray, suffix: str) -> None:
    folder.mkdir(parents=True)
    for i, s in enumerate(stack):
        path = folder / f"{i}{suffix}"  # unpadded names: natural sort must order 2 before 10
        if suffix == ".png":
            Image.fromarray(s).save(path)
        else:
            tifffile.imwrite(path, s)


class TestStacks:
    @pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
    def test_multipage_tiff(self, tmp_path, dtype):
        stack = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, (4, 20, 30), dtype=dtype)
        tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
        slices = read_stack(tmp_path / "s.tif")
        assert [s.index for s in slices] == [0, 1, 2, 3]
        assert all(isinstance(s, Slice) and s.source == str(tmp_path / "s.tif") for s in slices)
        np.testing.assert_array_equal(np.stack([s.image for s in slices]), stack)
        assert slices[0].image.dtype == dtype

    def test_imagej_hyperstack_and_rgb_planes(self, tmp_path):
        stack = np.random.default_rng(0).integers(0, 65535, (2, 3, 16, 16), dtype=np.uint16)
        tifffile.imwrite(tmp_path / "h.tif", stack, imagej=True, metadata={"axes": "TZYX"})
        assert len(read_stack(tmp_path / "h.tif")) == 6
        rgb = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
        tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
        (single,) = read_stack(tmp_path / "rgb.tif")
        assert single.image.shape == (16, 16, 3)
        tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
        (planar,) = read_stack(tmp_path / "planar.tif")
        np.testing.assert_array_equal(planar.image, rgb)

    @pytest.mark.parametrize(("suffix", "dtype"), [(".png", np.uint8), (".png", np.uint16), (".tif", np.uint16)])
    def test_folder_of_slices_natural_order(self, tmp_path, suffix, dtype):
        stack = np.stack([np.full((8, 9), i * 10, dtype=dtype) for i in range(12)])
        _write_slices(tmp_path / "raw", stack, suffix)
        (tmp_path / "raw" / "notes.txt").write_text("not an image")
        slices = read_stack(tmp_path / "raw")
        assert [Path(s.source).name for s in slices][:3] == [f"0{suffix}", f"1{suffix}", f"2{suffix}"]
        assert [int(s.image[0, 0]) for s in slices] == [i * 10 for i in range(12)]
        assert slices[0].image.dtype == dtype

    def test_errors(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            read_stack(tmp_path / "missing.tif")
        (tmp_path / "empty").mkdir()
        with pytest.raises(ValueError, match="no image slices"):
            read_stack(tmp_path / "empty")
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "0.png").write_bytes(b"garbage")
        with pytest.raises(ImageDecodeError, match="0.png"):
            read_stack(tmp_path / "bad")
        (tmp_path / "x.tif").write_bytes(b"II*\x00garbage")
        with pytest.raises(ImageDecodeError, match="x.tif"):
            read_stack(tmp_path / "x.tif")

    def test_labelled_stack_thresholds_antialiased_masks(self, tmp_path):
        raw = np.random.default_rng(0).integers(0, 255, (3, 10, 12), dtype=np.uint8)
        masks = np.zeros((3, 10, 12), np.uint8)
        masks[:, 2:5, 3:7] = 255
        masks[:, 5, 3:7] = 127  # anti-aliased edge below the threshold
        masks[:, 1, 3:7] = 128  # ... and at it
        _write_slices(tmp_path / "raw", raw, ".tif")
        _write_slices(tmp_path / "mask", masks, ".png")
        images, binary = read_labelled_stack(tmp_path / "raw", tmp_path / "mask")
        np.testing.assert_array_equal(images, raw)
        assert binary.dtype == np.uint8 and set(np.unique(binary)) == {0, 1}
        np.testing.assert_array_equal(binary, (masks >= 128).astype(np.uint8))
        assert read_labelled_stack(tmp_path / "raw", tmp_path / "mask", threshold=100)[1][0, 5, 3] == 1

    def test_labelled_stack_mismatch(self, tmp_path):
        raw = np.zeros((3, 10, 12), np.uint8)
        _write_slices(tmp_path / "raw", raw, ".png")
        _write_slices(tmp_path / "few", raw[:2], ".png")
        with pytest.raises(ValueError, match="3 image slices but 2 mask slices"):
            read_labelled_stack(tmp_path / "raw", tmp_path / "few")
        _write_slices(tmp_path / "small", np.zeros((3, 5, 5), np.uint8), ".png")
        with pytest.raises(ValueError, match="must match"):
            read_labelled_stack(tmp_path / "raw", tmp_path / "small")


def test_generate_data_script(tmp_path):
    out = tmp_path / "gen"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate_data.py"), str(out), "-n", "3", "--size", "32", "--quiet"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    images, masks = read_labelled_stack(out / "images", out / "masks")
    expected_images, expected_masks = generate_em_like(3, 32, seed=0)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(masks, expected_masks)


@pytest.mark.skipif(not VNC.is_dir(), reason=f"real VNC data not found at {VNC} (set VNC_DATA_DIR to run this test)")
def test_real_vnc_stack():
    images, masks = read_labelled_stack(VNC / "stack1" / "raw", VNC / "stack1" / "mitochondria")
    assert images.shape == masks.shape == (20, 1024, 1024)
    assert images.dtype == np.uint8
    fg = masks.mean()
    assert 0.03 < fg < 0.10, f"VNC mitochondria fraction {fg:.3f} outside the documented ~5-8%"
    pool = read_stack(VNC / "stack2" / "raw")
    assert len(pool) == 20 and pool[0].image.shape == (1024, 1024)
    assert Path(pool[-1].source).name == "19.tif"
