"""Generated EM-like tiles with ground-truth mitochondria masks, for tests and the quick start.

The real datasets may not ship with the repository, so tests and the demo need data with the same kind of
difficulty: dark membranes everywhere (which a naive intensity threshold confuses with mitochondria), small dark
round vesicles (distractors), and the targets, mitochondria: dark elongated bodies with a darker double membrane
and striped inner cristae. Everything is vectorised numpy/scipy per image; image ``i`` depends only on
(``seed``, ``i``), so a larger ``n`` extends a smaller one.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

__all__ = ["generate_em_like"]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field with correlation length ~``sigma`` px."""
    if sigma <= 3:
        field = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    else:
        # Large kernels are slow: smooth a coarse grid and interpolate up (same look, ~50x cheaper).
        step = sigma / 2
        coarse = (int(np.ceil(shape[0] / step)) + 3, int(np.ceil(shape[1] / step)) + 3)
        small = ndi.gaussian_filter(rng.standard_normal(coarse), 2.0)
        field = ndi.zoom(small, step, order=1, grid_mode=False)[: shape[0], : shape[1]]
    field = field - field.mean()
    return field / (field.std() + 1e-12)


def _cells(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi cells on a smoothly warped grid (wavy membranes); returns (cell id, distance to membrane in px)."""
    # Jittered grid: seeds never nearly coincide (coincident seeds give wide smeared "membranes").
    spacing = rng.uniform(30, 42)
    grid = np.arange(-spacing, size + spacing, spacing)
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    seeds = np.stack([gy.ravel(), gx.ravel()], axis=1) + rng.uniform(-0.3, 0.3, (gy.size, 2)) * spacing
    warp = 5.0
    wy = yy + warp * _smooth_noise(rng, (size, size), 12)
    wx = xx + warp * _smooth_noise(rng, (size, size), 12)
    pts = np.stack([wy.ravel(), wx.ravel()], axis=1)
    dist, idx = cKDTree(seeds).query(pts, k=2)
    label = idx[:, 0].reshape(size, size)
    # Half the difference of the two nearest-seed distances approximates the distance to the Voronoi edge.
    edge = ((dist[:, 1] - dist[:, 0]) / 2).reshape(size, size)
    return label, edge


def _mitochondria(
    rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray, edge: np.ndarray, target: float
) -> tuple[np.ndarray, np.ndarray]:
    """Place elongated ellipses until ``target`` foreground fraction; returns (mask, intensity offset image)."""
    mask = np.zeros((size, size), dtype=bool)
    offset = np.zeros((size, size), dtype=np.float32)
    for _ in range(200):  # bounded: stops early once the target fraction is reached
        if mask.mean() >= target:
            break
        a = rng.uniform(9, 26) * min(1.0, size / 128)  # semi-major axis (px); smaller bodies on tiny tiles
        b = a / rng.uniform(1.6, 3.2)  # semi-minor axis: elongated
        cy, cx = rng.uniform(0, size, 2)
        if edge[int(cy), int(cx)] < b * 0.6:  # mitochondria sit inside cells, not on membranes
            continue
        theta = rng.uniform(0, np.pi)
        r = int(np.ceil(a)) + 2
        y0, y1 = max(0, int(cy) - r), min(size, int(cy) + r + 1)
        x0, x1 = max(0, int(cx) - r), min(size, int(cx) + r + 1)
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)  # along the long axis
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        bend = rng.uniform(-0.4, 0.4) * (u / a) ** 2 * b  # slightly curved bodies
        wobble = 0.08 * _smooth_noise(rng, u.shape, 3.0)  # irregular outline, not a perfect ellipse
        rho = np.sqrt((u / a) ** 2 + ((v - bend) / b) ** 2) + wobble
        inside = rho <= 1.0
        if (mask[y0:y1, x0:x1] & inside).any():
            continue  # no overlapping bodies
        period = rng.uniform(3.5, 6.0)
        phase = rng.uniform(0, 2 * np.pi) + 1.5 * _smooth_noise(rng, u.shape, 2.5)  # wavy, uneven cristae
        cristae = 0.5 + 0.5 * np.cos(2 * np.pi * u / period + phase)
        membrane_width = 1.5 / b
        body = np.where(rho > 1 - membrane_width, -95.0, -55.0 - 30.0 * cristae)  # dark rim, striped interior
        offset[y0:y1, x0:x1] = np.where(inside, body, offset[y0:y1, x0:x1])
        mask[y0:y1, x0:x1] |= inside
    return mask, offset


def _one(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    label, edge = _cells(rng, size, yy, xx)
    # Cytoplasm: per-cell brightness, low-frequency shading and fine granular texture.
    cell_level = rng.normal(175, 10, label.max() + 1)[label]
    img = cell_level + 8 * _smooth_noise(rng, (size, size), 40) + 6 * _smooth_noise(rng, (size, size), 1.2)
    # Membranes: dark lines ~2-3 px wide with a soft profile.
    thickness = rng.uniform(1.0, 1.6)
    img -= 90 * np.exp(-((edge / thickness) ** 2))
    # Vesicles: small dark round blobs (distractors, not foreground).
    n_ves = rng.poisson(size * size / 2500)
    ves = np.zeros((size, size))
    if n_ves:
        vy, vx = rng.integers(0, size, (2, n_ves))
        ves[vy, vx] = 1.0
        ves = ndi.gaussian_filter(ves, rng.uniform(1.5, 2.5))
        ves /= ves.max() + 1e-12
    img -= 60 * ves
    mask, offset = _mitochondria(rng, size, yy, xx, edge, target=rng.uniform(0.05, 0.10))
    img += offset
    # Imaging: slight blur (section thickness / optics), shot-like and read noise.
    img = ndi.gaussian_filter(img, 0.8)
    img += rng.normal(0, 1, img.shape) * (4 + 0.04 * np.clip(img, 0, None))
    return np.clip(img, 0, 255).astype(np.uint8), mask.astype(np.uint8)


def generate_em_like(n: int, size: int = 256, seed: int = 0, *, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` EM-like uint8 images (n, size, size) and {0,1} uint8 mitochondria masks.

    Returns images ``start .. start + n - 1`` of the sequence defined by ``seed`` (for chunked generation).
    """
    if n < 0 or size < 8:
        raise ValueError(f"need n >= 0 and size >= 8, got n={n}, size={size}")
    images = np.empty((n, size, size), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, start + i])
        images[i], masks[i] = _one(rng, size)
    return images, masks
