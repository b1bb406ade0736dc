"""Tiled inference: exactness for local models, no seams, odd sizes, probabilities, bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from ml_backend.inference import predict_batch, predict_tiled
from ml_backend.inference.tiling import tile_starts, tile_window
from ml_backend.model import UNet


class PixelModel(nn.Module):
    """Receptive field 1: logits (x, -x). Tiled and untiled outputs must agree exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, -x], dim=1) * self.scale


class CountingModel(nn.Module):
    """Wraps a model and records the batch size of every forward call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[int, ...]] = []
        self.train(inner.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return self.inner(x)


def _smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    img = gaussian_filter(np.random.default_rng(seed).random((h, w)), 3)
    return ((img - img.min()) / (img.max() - img.min())).astype(np.float32)


def _full(model: nn.Module, img: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(img)[None, None]), 1)[0].numpy()


@pytest.fixture
def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(width=4, depth=2).eval()


def test_tile_starts_cover_and_overlap():
    for size, tile, ov in [(1000, 256, 32), (256, 256, 32), (257, 256, 32), (10, 256, 32), (500, 100, 0)]:
        starts = tile_starts(size, min(tile, size), ov)
        t = min(tile, size)
        assert starts[0] == 0 and starts[-1] + t == size
        assert all(b - a <= t - ov for a, b in zip(starts, starts[1:], strict=False)), "gap or too little overlap"


def test_window_is_positive_and_ramps_only_inside():
    w = tile_window(64, 16, ramp_start=True, ramp_end=False)
    assert (w > 0).all() and w[0] < 0.01 and (w[16:] == 1).all()
    # Raised-cosine ramps of neighbouring tiles sum to one over an exact overlap.
    np.testing.assert_allclose(w[:16] + w[:16][::-1], 1.0, atol=1e-12)


def test_pixelwise_model_is_exact():
    img = np.random.default_rng(1).random((123, 250), dtype=np.float32)
    model = PixelModel()
    tiled = predict_tiled(model, img, tile=48, overlap=12, batch_size=5)
    np.testing.assert_allclose(tiled, _full(model, img), atol=1e-6)


def test_local_model_matches_full_forward():
    """A model whose receptive field (5 px) fits in the overlap gives the untiled prediction."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 3, 3, padding=1)).eval()
    img = np.random.default_rng(0).random((150, 201), dtype=np.float32)
    tiled = predict_tiled(model, img, tile=64, overlap=16, batch_size=3)
    full = _full(model, img)
    # Only the tiny (<0.1%) weight of a tile's outermost 2 px differs from the exact answer.
    np.testing.assert_allclose(tiled, full, atol=2e-3)
    assert np.abs(tiled - full).mean() < 1e-4


def _seam_ratio(pred: np.ndarray, ref: np.ndarray, size: int, tile: int, overlap: int) -> float:
    """Largest row-to-row jump of (pred - ref) at tile edges, relative to the typical jump."""
    starts = tile_starts(size, tile, overlap)
    edges = sorted({s for s in starts if s > 0} | {s + tile for s in starts if s + tile < size})
    jump = np.abs(np.diff(pred[1] - ref[1], axis=0)).mean(axis=1)
    return float(jump[[e - 1 for e in edges]].max() / np.median(jump))


def test_unet_no_seams(tiny_unet):
    """GroupNorm makes a U-Net tile depend on the whole tile, so tiles differ; blending must hide the borders."""
    img = _smooth_image(300, 300)
    full = _full(tiny_unet, img)
    blended = predict_tiled(tiny_unet, img, tile=96, overlap=32)
    hard = predict_tiled(tiny_unet, img, tile=96, overlap=0)
    assert _seam_ratio(hard, full, 300, 96, 0) > 2.5, "metric must detect the seams of unblended tiles"
    assert _seam_ratio(blended, full, 300, 96, 32) < 1.6
    assert _seam_ratio(blended.transpose(0, 2, 1), full.transpose(0, 2, 1), 300, 96, 32) < 1.6


@pytest.mark.parametrize("hw", [(1, 1), (1, 300), (37, 5), (64, 64), (65, 129), (100, 250)])
def test_sizes(tiny_unet, hw):
    img = np.random.default_rng(0).random(hw, dtype=np.float32)
    probs = predict_tiled(tiny_unet, img, tile=64, overlap=16, batch_size=2)
    assert probs.shape == (2, *hw) and probs.dtype == np.float32
    assert np.isfinite(probs).all() and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_image_smaller_than_tile_is_one_forward_pass(tiny_unet):
    img = _smooth_image(50, 70)
    counted = CountingModel(tiny_unet)
    probs = predict_tiled(counted, img, tile=256, overlap=32)
    assert counted.calls == [(1, 1, 50, 70)]
    np.testing.assert_allclose(probs, _full(tiny_unet, img), atol=1e-6)


def test_restores_train_mode_and_validates(tiny_unet):
    tiny_unet.train()
    predict_tiled(tiny_unet, np.zeros((20, 20), np.float32), tile=16, overlap=4)
    assert tiny_unet.training
    with pytest.raises(ValueError, match="overlap"):
        predict_tiled(tiny_unet, np.zeros((20, 20), np.float32), tile=16, overlap=16)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        predict_tiled(tiny_unet, np.zeros((2, 20, 20), np.float32))
    with pytest.raises(ValueError, match="empty"):
        predict_tiled(tiny_unet, np.zeros((0, 20), np.float32))


def test_constant_model_gives_its_softmax_everywhere():
    """Blending weights are normalised: a position-independent model yields its own softmax at every pixel."""
    model = nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    probs = predict_tiled(model, np.random.default_rng(0).random((130, 170), dtype=np.float32), tile=40, overlap=10)
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0).numpy()
    np.testing.assert_allclose(probs, np.broadcast_to(expected[:, None, None], probs.shape), atol=1e-6)


def test_huge_image_bounded_memory():
    """3000x2000: tiles are streamed in batches; host memory stays near the size of the output alone.

    The model is a single convolution: what is measured (host buffers, tiles in flight) does not depend on it.
    """
    h, w, batch = 3000, 2000, 4
    img = np.random.default_rng(0).random((h, w), dtype=np.float32)
    counted = CountingModel(nn.Conv2d(1, 2, 3, padding=1).eval())
    tracemalloc.start()
    try:
        probs = predict_tiled(counted, img, tile=256, overlap=32, batch_size=batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    n_tiles = len(tile_starts(h, 256, 32)) * len(tile_starts(w, 256, 32))
    assert sum(c[0] for c in counted.calls) == n_tiles
    assert max(c[0] for c in counted.calls) <= batch, "more tiles in flight than one batch"
    out_bytes = probs.nbytes  # 2 x 3000 x 2000 float32 = 48 MB
    # Output + a few tiles (one batch: ~1 MB, its weighted probabilities: ~2 MB, windows, normalisation chunk);
    # an (H, W) weight map alone would add 24 MB and a list of all tiles far more.
    assert peak < out_bytes + 12e6, f"peak {peak / 1e6:.1f} MB for a {out_bytes / 1e6:.0f} MB output"
    np.testing.assert_allclose(probs[:, ::97, ::89].sum(0), 1.0, atol=1e-5)


def test_predict_batch(tiny_unet):
    imgs = np.random.default_rng(0).random((3, 32, 40), dtype=np.float32)
    counted = CountingModel(tiny_unet)
    probs = predict_batch(counted, imgs)
    assert probs.shape == (3, 2, 32, 40) and probs.dtype == np.float32
    assert counted.calls == [(3, 1, 32, 40)]
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs[1], _full(tiny_unet, imgs[1]), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        predict_batch(tiny_unet, imgs[0])
