"""Tiled inference for images of any size with seamless blending and bounded memory.

The image is cut into overlapping tiles (row-major; the last tile of a row/column is shifted back so every tile
lies inside the image and all tiles have one size, which lets them batch). Each tile's softmax is weighted by a
window that is 1 in the middle and falls with a raised-cosine ramp over ``overlap`` pixels towards tile edges that
border another tile (not towards the image border), so a pixel's prediction comes mostly from the tile where it
has the most context and tile borders leave no seams.

Memory: tiles are produced lazily and only one batch is in flight. Because every tile's window is the outer
product of a row window and a column window and the tiles form a full grid, the sum of the windows is itself
separable (``Wy[y] * Wx[x]``), so no (H, W) weight map is stored: the only large array is the (C, H, W) output.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ml_backend.config import torch_device

__all__ = ["predict_batch", "predict_tiled", "tile_starts", "tile_window"]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``min(tile, size)`` covering ``[0, size)`` with at least ``overlap`` overlap."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def tile_window(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """1-D blending window: 1 inside, raised-cosine ramp (strictly positive) over ``overlap`` px at ramped ends."""
    w = np.ones(length, dtype=np.float64)
    n = min(overlap, length)
    if n > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)  # in (0, 1): no pixel gets zero total weight
        if ramp_start:
            w[:n] = np.minimum(w[:n], ramp)
        if ramp_end:
            w[length - n :] = np.minimum(w[length - n :], ramp[::-1])
    return w


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Requested device (default: CUDA when available); the model is moved there once, in place.

    On CPU the weights are also switched to channels-last layout (in place, same values): oneDNN convolutions run
    ~1.5x faster that way, and it is a no-op once done.
    """
    target = torch_device("auto") if device is None else torch.device(device)
    param = next(model.parameters(), None)
    if param is not None and param.device != target:
        model.to(target)
    if target.type == "cpu" and any(
        p.ndim == 4 and not p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters()
    ):
        model.to(memory_format=torch.channels_last)
    return target


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _as_image(image: np.ndarray) -> np.ndarray:
    """(C, H, W) float32: an (H, W) image as one channel, a (C, H, W) 2.5D context tile as it is."""
    arr = np.asarray(image)
    if arr.ndim not in (2, 3):
        raise ValueError(f"predict_tiled expects an (H, W) image or a (C, H, W) context tile, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"empty image of shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    return arr[None] if arr.ndim == 2 else arr


def predict_batch(model: nn.Module, images: np.ndarray, device: str | torch.device | None = None) -> np.ndarray:
    """Softmax probabilities (N, classes, H, W) float32 for equal-size tiles (N, H, W) or 2.5D context tiles
    (N, C, H, W) in one forward pass (no tiling)."""
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim not in (3, 4) or arr.size == 0:
        raise ValueError(f"predict_batch expects a non-empty (N, H, W) or (N, C, H, W) array, got shape {arr.shape}")
    dev = _resolve_device(model, device)
    with _eval_mode(model), torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(arr))
        x = (x.unsqueeze(1) if x.ndim == 3 else x).to(dev)
        return torch.softmax(model(x).float(), dim=1).cpu().numpy()


def predict_tiled(
    model: nn.Module,
    image: np.ndarray,
    *,
    tile: int = 256,
    overlap: int = 32,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Per-pixel class probabilities (classes, H, W) float32 (softmax; sums to 1) for a normalised (H, W) image
    or a (C, H, W) 2.5D context tile (every channel is cut into the same tiles)."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap} for tile={tile}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    img = _as_image(image)
    want = int((getattr(model, "hparams", None) or {}).get("in_channels", img.shape[0]))
    if img.shape[0] != want:
        raise ValueError(
            f"the model reads {want} input channel(s) but the image has shape {np.shape(image)}: give an (H, W) "
            f"image to a one-channel model, a ({want}, H, W) context tile otherwise"
        )
    h, w = img.shape[-2:]
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    # Per-row / per-column windows and their sums: the blended weight at (y, x) is wy_sum[y] * wx_sum[x].
    wy = [tile_window(th, overlap, y > 0, y + th < h) for y in ys]
    wx = [tile_window(tw, overlap, x > 0, x + tw < w) for x in xs]
    wy_sum, wx_sum = np.zeros(h), np.zeros(w)
    for y, win in zip(ys, wy, strict=True):
        wy_sum[y : y + th] += win
    for x, win in zip(xs, wx, strict=True):
        wx_sum[x : x + tw] += win

    dev = _resolve_device(model, device)
    windows: dict[tuple[int, int], torch.Tensor] = {}  # at most 9 distinct (edge/interior) windows

    def window(i: int, j: int) -> torch.Tensor:
        key = (int(i > 0) + int(i == len(ys) - 1) * 2, int(j > 0) + int(j == len(xs) - 1) * 2)
        if key not in windows:
            windows[key] = torch.from_numpy(np.outer(wy[i], wx[j]).astype(np.float32)).to(dev)
        return windows[key]

    out: np.ndarray | None = None
    cuda = dev.type == "cuda"
    # On CUDA the input batch is staged in pinned memory and copied asynchronously; the .cpu() of the results
    # below waits for the stream, so the buffer is free again before it is refilled.
    staging = torch.empty((batch_size, img.shape[0], th, tw), dtype=torch.float32, pin_memory=cuda)
    buf = staging.numpy()
    pending: list[tuple[int, int]] = []

    def flush() -> None:
        nonlocal out
        n = len(pending)
        x = staging[:n].to(dev, non_blocking=cuda)
        probs = torch.softmax(model(x).float(), dim=1)
        if out is None:
            out = np.zeros((probs.shape[1], h, w), dtype=np.float32)
        wins = [window(i, j) for i, j in pending]
        if len({id(win) for win in wins}) == 1:  # interior tiles share one window: one broadcast multiply
            weighted = probs.mul_(wins[0]).cpu().numpy()
        else:
            weighted = torch.stack([probs[k] * win for k, win in enumerate(wins)]).cpu().numpy()
        for k, (i, j) in enumerate(pending):
            y, x0 = ys[i], xs[j]
            out[:, y : y + th, x0 : x0 + tw] += weighted[k]
        pending.clear()

    with _eval_mode(model), torch.inference_mode():
        for i, y in enumerate(tqdm(ys, desc="tile rows", disable=not progress, leave=False)):
            for j, x in enumerate(xs):
                buf[len(pending)] = img[:, y : y + th, x : x + tw]
                pending.append((i, j))
                if len(pending) == batch_size:
                    flush()
        if pending:
            flush()
    assert out is not None
    # Normalise in row chunks so the temporary weight block stays small.
    wx32 = wx_sum.astype(np.float32)
    for r in range(0, h, 256):
        out[:, r : r + 256] /= (wy_sum[r : r + 256, None].astype(np.float32) * wx32[None, :])[None]
    return out
