"""Queue score mapping: from acquisition values to the prediction ``score`` Label Studio orders its queue by.

Label Studio serves the LOWEST prediction score first, both with project sampling "Uncertainty sampling" (``/next``
picks the task with the lowest ``predictions_score`` of the project's model version) and in a Data Manager view
sorted ascending by prediction score. Acquisition values are the opposite (HIGHER = more informative), so every
mapping below is decreasing in informativeness and lands in [0, 1]:

* **Pixel-uncertainty strategies** (entropy, least_confidence, margin, bald) use an ABSOLUTE mapping,
  ``score = 1 - value / max_value`` (``uncertainty_to_queue_score``), where ``max_value`` is the largest value the
  strategy can produce for that tile: per-pixel maximum (log C for entropy and BALD, 1 - 1/C for least confidence,
  1 for margin) times the pixel count for ``aggregation="sum"`` (or alone for ``"mean"``). Because the scale does
  not depend on the other tiles, scores computed in separate ``/predict`` calls (Label Studio sends tasks in
  batches, and skips tasks that already have a prediction) are comparable and the queue order is global. Score 0 =
  every pixel at maximum uncertainty, score 1 = fully confident. (With sum aggregation this equals 1 - the mean
  normalised per-pixel uncertainty, so tiles of different sizes are compared fairly.)
* **Batch strategies** (random, kmeans, coreset, suggestive, effort_aware, hybrid) have no absolute scale: a tile's
  worth depends on the rest of the pool. They use a RANK mapping over one pool (``queue_scores``):
  ``score = rank / N`` with rank 0 for the first selected tile, then the rest of the selection in order, then the
  unselected tiles by decreasing value (``pool_queue_scores`` selects the first ``QUEUE_SELECT_K`` = 100 tiles
  with the batch algorithm; the rest follow the strategy's secondary value, e.g. distance to the nearest centre).
  Such scores are only comparable within one rescoring run, so the backend rescores the whole pool (RQ job
  ``rescore_chunk``) and pushes all scores with the same model version. (effort_aware and random rank by a
  per-tile value too, but it has no fixed maximum, so they also use ranks.)
* **Cold start** (no trained model yet; no masks are shown): ``cold_start_scores`` orders tasks for coverage of
  the data. Default: a seeded hash of each task id, i.e. a uniform random order that depends only on (seed, task
  id), so tasks imported later slot in without reshuffling the others and separate calls agree. With simple image
  features (``image_features``: intensity histogram, contrast, gradient energy) it orders by farthest-point
  traversal instead (greedy k-center), so the first tiles served span the variety of the data.
"""

from __future__ import annotations

import numpy as np

from .base import Selection, Strategy, check_summary
from .diversity import k_center_greedy

# splitmix64 constants (Steele, Lea & Flood 2014): a fast, well-mixed, vectorisable 64-bit hash.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)

# Batch strategies order this many tiles with their batch algorithm in a full-pool rescoring (the rest: secondary
# value). More than one labelling round (Roels & Saeys: k = 20) before the next retrain replaces the order anyway.
QUEUE_SELECT_K = 100


def queue_scores(selection: Selection, n: int) -> np.ndarray:
    """Rank-based queue scores in [0, 1): the first selected tile gets 0, lower = served first by Label Studio.

    Order: ``selection.order`` first, then the remaining tiles by decreasing ``selection.values`` (ties: lower
    index first). Scores are ``rank / n``.
    """
    values = np.asarray(selection.values, dtype=np.float64)
    order = np.asarray(selection.order, dtype=np.int64)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if values.shape != (n,):
        raise ValueError(f"selection.values has shape {values.shape}, expected ({n},)")
    if order.ndim != 1 or (order.size and (order.min() < 0 or order.max() >= n)):
        raise ValueError(f"selection.order must be indices in [0, {n}), got {order}")
    if len(np.unique(order)) != order.size:
        raise ValueError("selection.order holds duplicate indices")
    if not np.all(np.isfinite(values)):
        raise ValueError("selection.values holds NaN or infinite values")
    rest_mask = np.ones(n, dtype=bool)
    rest_mask[order] = False
    rest = np.flatnonzero(rest_mask)
    rest = rest[np.argsort(-values[rest], kind="stable")]
    ranking = np.concatenate([order, rest])
    scores = np.empty(n, dtype=np.float64)
    scores[ranking] = np.arange(n, dtype=np.float64) / n
    return scores


def uncertainty_to_queue_score(values: np.ndarray | float, max_value: np.ndarray | float) -> np.ndarray:
    """Absolute mapping ``clip(1 - value / max_value, 0, 1)`` for pixel-uncertainty strategies.

    ``max_value`` is a scalar or one per tile (``Strategy.max_value(num_classes, num_pixels)``; tiles of different
    sizes under sum aggregation need their own). The most uncertain possible tile gets 0 (served first).
    """
    v = np.asarray(values, dtype=np.float64)
    m = np.asarray(max_value, dtype=np.float64)
    if np.any(~np.isfinite(m)) or np.any(m <= 0):
        raise ValueError(f"max_value must be finite and > 0, got {max_value}")
    if not np.all(np.isfinite(v)):
        raise ValueError("values hold NaN or infinite entries")
    if np.any(v < -1e-9 * m):
        raise ValueError("uncertainty values must be >= 0")
    return np.clip(1.0 - v / m, 0.0, 1.0)


def pool_queue_scores(
    strategy: Strategy,
    summary: dict[str, np.ndarray],
    *,
    num_classes: int,
    num_pixels: int | np.ndarray,
    labelled_embeddings: np.ndarray | None = None,
    seed: int = 0,
    k: int = QUEUE_SELECT_K,
) -> np.ndarray:
    """Queue scores for a scored pool under ``strategy``: absolute mapping when the strategy has one, else ranks.

    ``num_pixels``: pixels per tile (scalar, or (N,) for tiles of different sizes). Batch strategies select the
    first ``k`` tiles (clipped to N) with their batch algorithm; the rest follow in the order of the strategy's
    secondary value (distance to the nearest centre, uncertainty, ...). Selecting all N greedily would cost
    O(N^2) for k-center/max-cover and N clusters for k-means, for an order nobody reaches before the next retrain.
    """
    n = check_summary(summary, strategy.summary_keys)
    per_pixel = strategy.max_pixel_value(num_classes)
    if per_pixel is not None:
        pixels = np.asarray(num_pixels, dtype=np.float64)
        max_value = per_pixel * pixels if strategy.aggregation == "sum" else np.full(n, per_pixel)
        return uncertainty_to_queue_score(summary["value"], max_value)
    selection = strategy.select(summary, min(k, n), labelled_embeddings=labelled_embeddings, seed=seed)
    return queue_scores(selection, n)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def image_features(images: np.ndarray, bins: int = 16) -> np.ndarray:
    """Cheap per-image descriptors for cold-start coverage: (N, H, W) normalised images -> (N, bins + 3).

    Intensity histogram (fractions over [0, 1]), standard deviation (contrast), mean gradient magnitude (texture /
    membrane density) and intensity mean; all computed without a model.
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 3 or x.shape[0] == 0:
        raise ValueError(f"images must have shape (N, H, W) with N >= 1, got {x.shape}")
    n = x.shape[0]
    flat = np.clip(x.reshape(n, -1), 0.0, 1.0)
    idx = np.minimum((flat * bins).astype(np.int64), bins - 1) + np.arange(n)[:, None] * bins
    hist = np.bincount(idx.ravel(), minlength=n * bins).reshape(n, bins) / flat.shape[1]
    gy = np.abs(np.diff(x, axis=1)).mean(axis=(1, 2)) if x.shape[1] > 1 else np.zeros(n)
    gx = np.abs(np.diff(x, axis=2)).mean(axis=(1, 2)) if x.shape[2] > 1 else np.zeros(n)
    return np.column_stack([hist, flat.std(axis=1), gx + gy, flat.mean(axis=1)]).astype(np.float64)


def cold_start_scores(task_ids: list[int], seed: int = 0, features: np.ndarray | None = None) -> np.ndarray:
    """Queue scores in [0, 1) before any model was trained (lower = served first), ordered for coverage.

    Without ``features``: ``splitmix64(seed, task_id) / 2**64``, a uniform random order that depends only on the
    seed and each task's id (stable when tasks are added, and across calls). With ``features`` ((N, F), e.g.
    ``image_features``), farthest-point traversal (greedy k-center from a seeded start) on standardised features:
    rank r gets r / N, so the first tiles cover the data's variety.
    """
    ids = np.asarray(task_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError("task_ids must be a non-empty list of task ids")
    if features is None:
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"task ids must be integers, got dtype {ids.dtype}")
        key = _splitmix64(np.uint64(np.int64(seed) & 0x7FFFFFFFFFFFFFFF) * np.uint64(0x100000001B3))
        hashed = _splitmix64(ids.astype(np.int64).astype(np.uint64) ^ key)
        return (hashed >> np.uint64(11)).astype(np.float64) / float(2**53)  # 53 random bits: exact in float64
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] != ids.size:
        raise ValueError(f"features must have shape ({ids.size}, F), got {feats.shape}")
    if not np.all(np.isfinite(feats)):
        raise ValueError("features hold NaN or infinite values")
    std = feats.std(axis=0)
    z = (feats - feats.mean(axis=0)) / np.where(std > 0, std, 1.0)
    order, _ = k_center_greedy(z, ids.size, seed=seed)
    scores = np.empty(ids.size, dtype=np.float64)
    scores[order] = np.arange(ids.size, dtype=np.float64) / ids.size
    return scores
