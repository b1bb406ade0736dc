"""THE scoring pipeline: images -> probabilities -> strategy summaries (+ the probabilities for masks, on request).

Used by re-scoring after a training (``ml_backend.jobs`` / ``ml_backend.active_learning``) and by the benchmark;
the /predict route is the next caller (it already tiles the same way). Why it is shaped like this:

* Images no larger than one inference tile (``ScoringConfig.tile_size``) go through ``strategies.score_pool`` in
  groups of equal shape, ``batch_size`` at a time: the strategy gets every input it needs (MC-dropout passes,
  bootstrap members, bottleneck embeddings) from one encoder pass, and ``on_probs`` reuses the same probabilities
  for the pre-annotation masks.
* A larger image never goes through the network whole (memory would grow with its area, times the MC passes).
  For strategies that read only the probabilities (entropy, least confidence, margin, ...) its probabilities come
  from ``inference.tiling.predict_tiled`` (blended tiles, bounded memory) and are summarised exactly. Strategies
  that need more (MC passes, ensembles, embeddings) score the image as a grid of tile-sized crops whose summaries
  are combined per image (``combine_crop_summaries``: sums for "sum" aggregation, pixel-weighted means otherwise,
  mean embeddings); its masks still come from the blended tiled prediction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml_backend.config import torch_device
from ml_backend.inference.precision import inference_model
from ml_backend.inference.tiling import predict_tiled, tile_starts
from ml_backend.strategies import PassConfig, PoolBatch, score_pool

log = logging.getLogger(__name__)

__all__ = ["PoolScores", "ScoringConfig", "combine_crop_summaries", "embed_images", "score_images"]

# Summary keys that are per-image vectors (averaged over crops), not per-image totals.
VECTOR_KEYS = frozenset({"embedding"})


@dataclass(frozen=True)
class ScoringConfig:
    """How a pool is pushed through the network (the numbers of a benchmark depend on batch_size via MC seeds)."""

    tile_size: int = 256
    tile_overlap: int = 32
    batch_size: int = 4
    mc_passes: int = 8
    device: str = "auto"
    embed_batch: int = 1  # labelled-set embeddings per forward pass
    # The inference engine (inference.precision): None = the model as given (direct callers, the AL benchmark's
    # reproducible numbers); from_settings takes INFERENCE_RUNTIME / INFERENCE_PRECISION.
    runtime: str | None = None
    precision: str = "fp32"
    calibration_tiles: int = 16
    cuda_tuning: bool = True

    @classmethod
    def from_settings(cls, settings: Any) -> ScoringConfig:
        return cls(
            tile_size=int(settings.tile_size),
            tile_overlap=int(settings.tile_overlap),
            batch_size=max(1, int(settings.inference_batch)),
            mc_passes=int(settings.mc_passes),
            device=str(settings.device),
            runtime=str(getattr(settings, "inference_runtime", "auto")),
            precision=str(getattr(settings, "inference_precision", "auto")),
            calibration_tiles=int(getattr(settings, "int8_calibration_tiles", 16)),
            cuda_tuning=bool(getattr(settings, "cuda_tuning", True)),
        )


@dataclass
class PoolScores:
    """A scored pool: the strategy's summary in input order and the pixel count of each image."""

    summary: dict[str, np.ndarray]
    pixels: np.ndarray

    @property
    def n(self) -> int:
        return int(self.pixels.shape[0])


def score_images(
    model: Any,
    images: Sequence[np.ndarray],
    strategy: Any,
    cfg: ScoringConfig,
    *,
    ensemble: Sequence[Any] | None = None,
    seed: int = 0,
    on_probs: Callable[[int, np.ndarray], None] | None = None,
) -> PoolScores:
    """Summaries of ``images`` (normalised float32 (H, W), or (C, H, W) 2.5D context tiles; any sizes) for
    ``strategy``; ``on_probs(i, (classes, H, W))`` receives each image's probabilities (for masks) without a second
    forward pass where possible."""
    device = torch_device(cfg.device)
    if cfg.runtime is not None:  # the cached fast engine of this model (int8 calibrates on these images)
        model = inference_model(
            model, cfg.precision, cfg.runtime, device, calibration=images, calibration_tiles=cfg.calibration_tiles,
            cuda_tuning=cfg.cuda_tuning,
        )  # fmt: skip
    run = _ScoringRun(model, strategy, cfg, device, ensemble, seed, on_probs)
    n = len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(np.shape(img)), []).append(i)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for shape, idx in groups.items():
        if shape[-2] <= cfg.tile_size and shape[-1] <= cfg.tile_size:
            group = [images[i] for i in idx]
            summary = _score_small(run, group, idx)
        else:
            rows = [_score_large(run, images[i], i) for i in idx]
            summary = {k: np.concatenate([r[k] for r in rows], axis=0) for k in rows[0]}
        for k, arr in summary.items():
            parts.setdefault(k, []).append((np.asarray(idx), np.asarray(arr)))
        log.debug("scored %d images of shape %s", len(idx), shape)
    out: dict[str, np.ndarray] = {}
    for k, pieces in parts.items():
        first = pieces[0][1]
        arr = np.zeros((n, *first.shape[1:]), dtype=first.dtype)
        for idx, values in pieces:
            arr[idx] = values
        out[k] = arr
    pixels = np.array([np.shape(img)[-2] * np.shape(img)[-1] for img in images], dtype=np.int64)
    return PoolScores(out, pixels)


@dataclass(frozen=True)
class _ScoringRun:
    """What every image of one ``score_images`` call is scored with (the model on its device, the strategy, the
    config, the ensemble, the seed and the probabilities' receiver)."""

    model: Any
    strategy: Any
    cfg: ScoringConfig
    device: Any
    ensemble: Sequence[Any] | None
    seed: int
    on_probs: Callable[[int, np.ndarray], None] | None


def _score_small(run: _ScoringRun, images: list[np.ndarray], idx: list[int]) -> dict[str, np.ndarray]:
    """Equal-shape images that fit one tile: one ``score_pool`` call (its chunks = ``batch_size`` images)."""
    model, strategy, cfg, device, ensemble, seed, on_probs = (
        run.model, run.strategy, run.cfg, run.device, run.ensemble, run.seed, run.on_probs
    )  # fmt: skip

    def on_batch(start: int, batch: Any) -> None:
        probs = np.asarray(batch.probs)
        for j in range(probs.shape[0]):
            on_probs(idx[start + j], probs[j])

    return score_pool(
        model,
        np.stack(images).astype(np.float32),
        strategy,
        passes=PassConfig(device=device, batch_size=max(1, cfg.batch_size), mc_passes=cfg.mc_passes),
        ensemble=list(ensemble or []) or None,
        seed=seed,
        on_batch=on_batch if on_probs is not None else None,
    )


def _score_large(run: _ScoringRun, image: np.ndarray, index: int) -> dict[str, np.ndarray]:
    """One image larger than a tile, with bounded memory (see the module docstring)."""
    model, strategy, cfg, device, ensemble, seed, on_probs = (
        run.model, run.strategy, run.cfg, run.device, run.ensemble, run.seed, run.on_probs
    )  # fmt: skip

    probs = None
    if on_probs is not None or not strategy.needs:
        probs = predict_tiled(
            model, image, tile=cfg.tile_size, overlap=cfg.tile_overlap, batch_size=cfg.batch_size, device=device
        )
        if on_probs is not None:
            on_probs(index, probs)
    if not strategy.needs:
        return strategy.summarize(PoolBatch(probs=probs[None]))
    del probs
    t = cfg.tile_size
    h, w = image.shape[-2:]
    crops = [image[..., y : y + t, x : x + t] for y in tile_starts(h, t, 0) for x in tile_starts(w, t, 0)]
    scored = score_images(model, crops, strategy, cfg, ensemble=ensemble, seed=seed)
    return combine_crop_summaries(scored, getattr(strategy, "aggregation", "sum"))


def combine_crop_summaries(scored: PoolScores, aggregation: str) -> dict[str, np.ndarray]:
    """One image's summary (leading axis 1) from its crops': totals add up under "sum" aggregation, per-pixel means
    are weighted by crop area, vector keys (embeddings) are averaged."""
    weights = scored.pixels.astype(np.float64) / max(1, int(scored.pixels.sum()))
    out: dict[str, np.ndarray] = {}
    for key, arr in scored.summary.items():
        a = np.asarray(arr, dtype=np.float64)
        if key in VECTOR_KEYS:
            value = a.mean(axis=0)
        elif aggregation == "sum":
            value = a.sum(axis=0)
        else:
            value = np.tensordot(weights, a, axes=1)
        out[key] = np.asarray(value, dtype=np.asarray(arr).dtype)[None]
    return out


def embed_images(model: Any, images: Sequence[np.ndarray], device: Any, batch_size: int = 1) -> np.ndarray:
    """(n, D) bottleneck embeddings (coreset/k-means: the labelled set's position in feature space).

    Consecutive images of equal shape go through the encoder ``batch_size`` at a time.
    """
    import torch

    out = []
    model.to(device).eval()
    with torch.inference_mode():
        start = 0
        while start < len(images):
            shape = np.shape(images[start])
            stop = start + 1
            while stop < len(images) and stop - start < batch_size and np.shape(images[stop]) == shape:
                stop += 1
            x = np.stack([np.asarray(images[i], dtype=np.float32) for i in range(start, stop)])
            xt = torch.from_numpy(np.ascontiguousarray(x))
            xt = xt[:, None] if xt.ndim == 3 else xt  # (N, H, W) or (N, C, H, W) context tiles
            out.append(model.embed(xt.to(device)).float().cpu().numpy())
            start = stop
    return np.concatenate(out, axis=0) if out else np.zeros((0, 1), dtype=np.float32)
