"""The benchmark's data: a labelled volume split halfway along y into a training half (the pool of tiles) and a test
region; for every seed the pool and the test slices are the same for all strategies."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml_backend.benchmarks.protocol import Protocol
from ml_backend.data.context import context_batch, read_context
from ml_backend.data.stacks import read_labelled_stack
from ml_backend.data.synthetic import generate_em_like
from ml_backend.data.volume import Difficulty, generate_volume
from ml_backend.imaging import normalize

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Dataset:
    """A seed's pool of tiles (with positions and ground truth) and its test slices."""

    pool_images: np.ndarray  # (N, tile, tile) float32 normalised; (N, C, tile, tile) with 2.5D context
    pool_masks: np.ndarray  # (N, tile, tile) int64 {0, 1}
    pool_positions: np.ndarray  # (N, 3) z, y, x in the training half
    test_images: list[np.ndarray]  # (h, W) float32 slices of the test region; (C, h, W) with 2.5D context
    test_masks: list[np.ndarray]  # (h, W) uint8


def default_vnc_dir() -> Path:
    return Path(os.environ.get("VNC_DATA_DIR", REPO.parent / "shared" / "data" / "vnc"))


def load_volume(p: Protocol) -> tuple[np.ndarray, np.ndarray]:
    """(Z, H, W) normalised float32 raw and (Z, H, W) uint8 {0, 1} masks."""
    if p.data == "volume":
        vol = generate_volume(
            (p.volume_n, p.volume_size, p.volume_size),
            setting=p.volume_setting,
            seed=p.volume_seed,
            difficulty=Difficulty(contrast=p.volume_contrast, look_alikes=p.volume_look_alikes, noise=p.volume_noise),
        )
        raw, masks = vol.image, vol.mask
    elif p.data == "synthetic":
        raw, masks = generate_em_like(p.synthetic_n, size=p.synthetic_size, seed=12345)
    else:
        raw, masks = read_labelled_stack(p.images, p.masks)
    masks = (np.asarray(masks) > 0).astype(np.uint8)
    if p.downsample > 1:  # block means: image binning, and a pixel is foreground when most of its block is
        from skimage.transform import downscale_local_mean

        f = (1, p.downsample, p.downsample)
        raw = downscale_local_mean(np.asarray(raw, dtype=np.float32), f)
        masks = (downscale_local_mean(masks.astype(np.float32), f) >= 0.5).astype(np.uint8)
    raw = np.stack([normalize(np.asarray(s)) for s in raw]).astype(np.float32)
    if raw.shape != masks.shape or raw.ndim != 3:
        raise ValueError(f"raw {raw.shape} and masks {masks.shape} must be equal (Z, H, W) volumes")
    return raw, masks


def pool_positions(shape: tuple[int, int, int], tile: int, pool_size: int, seed: int) -> np.ndarray:
    """Tile corners in the training half (y < H/2): a random subset of the non-overlapping grid when it is large
    enough, else random (overlapping) positions as in the papers' pool of 2000 samples."""
    z, h, w = shape
    half = h // 2
    if half < tile or w < tile:
        raise ValueError(f"volume {shape}: the training half {half}x{w} is smaller than one {tile}x{tile} tile")
    rng = np.random.default_rng([seed, 1])
    grid = np.array(
        [(k, y, x) for k in range(z) for y in range(0, half - tile + 1, tile) for x in range(0, w - tile + 1, tile)]
    )
    if pool_size <= len(grid):
        return grid[np.sort(rng.permutation(len(grid))[:pool_size])]
    ks = rng.integers(0, z, pool_size)
    ys = rng.integers(0, half - tile + 1, pool_size)
    xs = rng.integers(0, w - tile + 1, pool_size)
    return np.stack([ks, ys, xs], axis=1)


def build_dataset(raw: np.ndarray, masks: np.ndarray, p: Protocol, seed: int) -> Dataset:
    """The seed's pool and test slices; with ``p.context_offsets`` other than [0] every pool tile and test slice is
    (C, ...) with the same window on slices z + offset of the volume (``data.context``: edges clamped)."""
    pos = pool_positions(raw.shape, p.tile, p.pool_size, seed)
    t = p.tile
    msks = np.stack([masks[k, y : y + t, x : x + t] for k, y, x in pos]).astype(np.int64)
    half = raw.shape[1] // 2
    zs = range(0, raw.shape[0], max(1, p.test_every))
    offsets = tuple(int(o) for o in (p.context_offsets or [0]))
    if offsets == (0,):  # plain 2-D: exactly the published protocol's arrays
        imgs = np.stack([raw[k, y : y + t, x : x + t] for k, y, x in pos])
        return Dataset(imgs, msks, pos, [raw[k, half:] for k in zs], [masks[k, half:] for k in zs])

    imgs = context_batch(raw, pos, t, offsets).astype(np.float32)
    h, w = raw.shape[1:]
    tests = [read_context(raw, k, half, 0, (h - half, w), offsets).image for k in zs]
    return Dataset(imgs, msks, pos, tests, [masks[k, half:] for k in zs])


_VOLUMES: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # one volume per process and data source


def dataset_for(p: Protocol, seed: int) -> Dataset:
    """The seed's dataset; the volume is read (and binned) once per process."""
    key = (p.data, p.images, p.masks, p.synthetic_n, p.synthetic_size, p.downsample)
    if p.data == "volume":
        key += (p.volume_setting, p.volume_n, p.volume_size, p.volume_seed, p.volume_contrast, p.volume_look_alikes,
                p.volume_noise)  # fmt: skip
    if key not in _VOLUMES:
        _VOLUMES.clear()
        _VOLUMES[key] = load_volume(p)
    return build_dataset(*_VOLUMES[key], p, seed)
