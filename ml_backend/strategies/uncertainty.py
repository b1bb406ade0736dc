"""Pixel-uncertainty strategies: entropy, least confidence, margin, BALD (Roels & Saeys 2019, section 3).

Each computes a per-pixel uncertainty map from the softmax probabilities p_j(x) (pixel j, C classes) and aggregates
it over the tile (``aggregation="sum"`` as in the papers, or ``"mean"``, which is size-independent; for a pool of
equal-size tiles both give the same ranking). All are vectorised over the whole chunk (no per-tile Python loop).
Values are scaled so that HIGHER = more uncertain, and each strategy knows the largest possible per-pixel value,
which gives the absolute queue-score mapping (``queue.uncertainty_to_queue_score``).
"""

from __future__ import annotations

import math

import numpy as np

from .base import (
    EPS,
    PoolBatch,
    Selection,
    Strategy,
    aggregate,
    as_float,
    class_max,
    ranked_selection,
    register_strategy,
)

_BLOCK_PIXELS = 1 << 18  # pixels per block in pixel_entropy: 1 MB float32 temporaries stay in cache


def pixel_entropy(probs: np.ndarray) -> np.ndarray:
    """(..., C, H, W) probabilities -> (..., H, W) entropy -sum_c p_c log p_c (nats; 0 log 0 = 0).

    Works on blocks of a few tiles, class by class (C is small), with one reused temporary: measured 2x faster
    than ``-(p * log p).sum(axis=-3)``, whose full-size temporaries fall out of cache.
    """
    p = as_float(probs)
    c, h, w = p.shape[-3:]
    flat = p.reshape(-1, c, h, w)
    out = np.zeros((flat.shape[0], h, w), dtype=np.float32)
    block = max(1, _BLOCK_PIXELS // (h * w))
    tmp = np.empty((min(block, flat.shape[0]), h, w), dtype=np.float32)
    for start in range(0, flat.shape[0], block):
        piece = flat[start : start + block]
        acc = out[start : start + block]
        t = tmp[: piece.shape[0]]
        for cls in range(c):
            np.maximum(piece[:, cls], EPS, out=t)
            np.log(t, out=t)
            t *= piece[:, cls]
            acc -= t
    return out.reshape(p.shape[:-3] + (h, w))


class _RankedUncertainty(Strategy):
    """Shared select(): rank tiles by their aggregated uncertainty."""

    def _select(self, summary, k, *, labelled_embeddings, seed) -> Selection:
        return ranked_selection(summary["value"], k)


@register_strategy("entropy")
class EntropyStrategy(_RankedUncertainty):
    """Maximum entropy sampling, the project default.

    value(x) = agg_j  -sum_c [p_j(x)]_c log [p_j(x)]_c            (Roels & Saeys 2019, Eq. 1; agg = sum in the paper)

    Highest when p_j = 1/C (no consensus). Per-pixel maximum: log C. Forward passes: 1 (deterministic pass).
    """

    def _summarize(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        return {"value": aggregate(pixel_entropy(batch.probs), self.aggregation)}

    def max_pixel_value(self, num_classes: int) -> float:
        return math.log(num_classes)


@register_strategy("least_confidence")
class LeastConfidenceStrategy(_RankedUncertainty):
    """Least confidence sampling.

    The paper selects argmin_x sum_j max_c [p_j(x)]_c (Roels & Saeys 2019, Eq. 2; Culotta & McCallum 2005). We use the
    equivalent, higher-is-more-informative form value(x) = agg_j (1 - max_c [p_j(x)]_c): same ranking, and a value
    that is 0 for a fully confident tile. Per-pixel maximum: 1 - 1/C. Forward passes: 1.
    """

    def _summarize(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        p = as_float(batch.probs)
        return {"value": aggregate(1.0 - class_max(p), self.aggregation)}

    def max_pixel_value(self, num_classes: int) -> float:
        return 1.0 - 1.0 / num_classes


@register_strategy("margin")
class MarginStrategy(_RankedUncertainty):
    """Margin (best-versus-second-best) sampling.

    value(x) = agg_j (1 - ([p_j(x)]_(1) - [p_j(x)]_(2)))   with (1), (2) the most and second most likely classes
    (Scheffer et al. 2001; Joshi et al. 2009 "BvSB"): smallest margin first. For C = 2 it equals 2 x least confidence
    per pixel, so both rank binary maps identically. Per-pixel maximum: 1. Forward passes: 1.
    """

    def _summarize(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        p = as_float(batch.probs)
        if p.shape[1] == 2:
            margin = np.abs(p[:, 0] - p[:, 1])
        else:  # running best and second best, class by class (vectorised over pixels)
            best = np.maximum(p[:, 0], p[:, 1])
            second = np.minimum(p[:, 0], p[:, 1])
            for c in range(2, p.shape[1]):
                np.maximum(second, np.minimum(best, p[:, c]), out=second)
                np.maximum(best, p[:, c], out=best)
            margin = best - second
        return {"value": aggregate(1.0 - margin, self.aggregation)}

    def max_pixel_value(self, num_classes: int) -> float:
        return 1.0


@register_strategy("bald")
class BaldStrategy(_RankedUncertainty):
    """Bayesian active learning by disagreement with Monte-Carlo dropout.

    With T stochastic passes p^t (dropout on at inference, Gal, Islam & Ghahramani 2017; Roels & Saeys 2019, Eq. 3):
        mean p_j = 1/T sum_t p_j^t
        MI_j     = H(mean p_j) - 1/T sum_t H(p_j^t)       (mutual information between prediction and weights)
        value(x) = agg_j MI_j
    The summary also holds ``entropy`` = agg_j H(mean p_j), the MC-averaged entropy. MI is 0 when all passes agree and
    positive when they disagree; per-pixel maximum log C. Forward passes: encoder once, decoder 1 + T times
    (``score_pool`` reuses the encoder features for the T dropout passes).
    """

    needs = frozenset({"mc_probs"})

    def _summarize(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        mc = as_float(batch.mc_probs)
        h_mean = pixel_entropy(mc.mean(axis=0))
        mean_h = pixel_entropy(mc).mean(axis=0)
        mi = np.maximum(h_mean - mean_h, 0.0)  # tiny negative values are float round-off
        return {"value": aggregate(mi, self.aggregation), "entropy": aggregate(h_mean, self.aggregation)}

    def max_pixel_value(self, num_classes: int) -> float:
        return math.log(num_classes)
