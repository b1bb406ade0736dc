"""Data augmentation for few-label EM training, vectorised over the batch in torch.

EM has no preferred orientation, so flips and 90-degree rotations are free extra labels (8 dihedral variants);
intensity jitter (contrast, brightness, noise) covers section-to-section staining and detector differences; a cheap
elastic warp (coarse random displacement upsampled, one ``grid_sample``) mimics section deformation. Image and mask
always get the same geometric transform; the mask is resampled with nearest neighbour so class indices and
``IGNORE`` survive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ml_backend.training.metrics import IGNORE


@dataclass
class AugmentConfig:
    """Probabilities and strengths; defaults are mild because labels are few and must not be distorted away."""

    flip: bool = True
    rot90: bool = True
    contrast: float = 0.15  # multiplicative jitter: factor in [1 - c, 1 + c]
    brightness: float = 0.1  # additive jitter in [-b, b] (images are normalised to ~[0, 1])
    noise: float = 0.03  # max std of additive Gaussian noise
    elastic_prob: float = 0.0  # fraction of samples warped
    elastic_alpha: float = 4.0  # max displacement in pixels
    elastic_grid: int = 4  # control points per side of the coarse displacement field


def sample_crops(
    images: list[np.ndarray],
    masks: list[np.ndarray],
    indices: np.ndarray,
    crop: int,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``crop`` x ``crop`` windows of the tiles ``indices`` -> (N,C,crop,crop) float32, (N,crop,crop) int64.

    Tiles are (H, W) (C = 1) or (C, H, W) 2.5D context tiles (every channel gets the same window). Tiles smaller
    than the crop are padded (image with 0, mask with IGNORE so the padding never counts as a label).
    """
    channels = 1 if len(indices) == 0 or np.ndim(images[indices[0]]) == 2 else int(np.shape(images[indices[0]])[0])
    out_img = np.zeros((len(indices), channels, crop, crop), dtype=np.float32)
    out_mask = np.full((len(indices), crop, crop), IGNORE, dtype=np.int64)
    for j, i in enumerate(indices):
        img, msk = images[i], masks[i]
        img = img[None] if img.ndim == 2 else img
        if img.shape[0] != channels:
            raise ValueError(f"tile {i} has {img.shape[0]} channels, tile {indices[0]} has {channels}")
        h, w = img.shape[-2:]
        y0 = int(rng.integers(0, h - crop + 1)) if h > crop else 0
        x0 = int(rng.integers(0, w - crop + 1)) if w > crop else 0
        ch, cw = min(crop, h), min(crop, w)
        out_img[j, :, :ch, :cw] = img[:, y0 : y0 + ch, x0 : x0 + cw]
        out_mask[j, :ch, :cw] = msk[y0 : y0 + ch, x0 : x0 + cw]
    return torch.from_numpy(out_img), torch.from_numpy(out_mask)


def _select(flag: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample choice: a where flag else b (flag shape (N,))."""
    shape = (-1,) + (1,) * (a.ndim - 1)
    return torch.where(flag.view(shape), a, b)


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    generator: torch.Generator,
    config: AugmentConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch: images (N,C,H,W) float, masks (N,H,W) int64 -> same shapes, same device.

    Every channel of a sample (2.5D context: the neighbouring slices) gets the sample's geometric transform and
    intensity jitter, so the slices stay aligned with each other and with the mask.

    Random draws come from ``generator`` (a CPU generator, for reproducibility independent of the device).
    """
    cfg = config or AugmentConfig()
    if images.ndim != 4 or masks.ndim != 3 or images.shape[0] != masks.shape[0] or images.shape[2:] != masks.shape[1:]:
        raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} do not match")
    n, _, h, w = images.shape
    dev = images.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator).to(dev)

    m = masks.unsqueeze(1)
    if cfg.flip:
        f = rand(n) < 0.5
        images, m = _select(f, images.flip(-1), images), _select(f, m.flip(-1), m)
        f = rand(n) < 0.5
        images, m = _select(f, images.flip(-2), images), _select(f, m.flip(-2), m)
    if cfg.rot90 and h == w:
        f = rand(n) < 0.5  # with the two flips this reaches all 8 dihedral transforms
        images = _select(f, images.rot90(1, dims=(-2, -1)), images)
        m = _select(f, m.rot90(1, dims=(-2, -1)), m)
    if cfg.elastic_prob > 0 and cfg.elastic_alpha > 0:
        images, m = _elastic(images, m, rand(n) < cfg.elastic_prob, generator, cfg)
    if cfg.contrast > 0 or cfg.brightness > 0:
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        c = 1.0 + (rand(n, 1, 1, 1) * 2 - 1) * cfg.contrast
        b = (rand(n, 1, 1, 1) * 2 - 1) * cfg.brightness
        images = (images - mean) * c + mean + b
    if cfg.noise > 0:
        sigma = rand(n, 1, 1, 1) * cfg.noise
        images = images + torch.randn(images.shape, generator=generator).to(dev) * sigma
    return images.contiguous(), m.squeeze(1).contiguous()


def _elastic(
    images: torch.Tensor, m: torch.Tensor, flag: torch.Tensor, generator: torch.Generator, cfg: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    n, _, h, w = images.shape
    dev = images.device
    coarse = (torch.rand((n, 2, cfg.elastic_grid, cfg.elastic_grid), generator=generator) * 2 - 1).to(dev)
    scale = torch.tensor([2.0 * cfg.elastic_alpha / w, 2.0 * cfg.elastic_alpha / h], device=dev).view(1, 2, 1, 1)
    disp = F.interpolate(coarse * scale, size=(h, w), mode="bicubic", align_corners=True)
    ys = torch.linspace(-1, 1, h, device=dev)
    xs = torch.linspace(-1, 1, w, device=dev)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack((gx, gy), dim=-1).unsqueeze(0) + disp.permute(0, 2, 3, 1)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    warped_m = F.grid_sample(m.float(), grid, mode="nearest", padding_mode="reflection", align_corners=True).long()
    return _select(flag, warped, images), _select(flag, warped_m, m)
