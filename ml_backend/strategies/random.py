"""Random sampling, the baseline every paper compares against."""

from __future__ import annotations

import numpy as np

from .base import PoolBatch, Selection, Strategy, ranked_selection, register_strategy


@register_strategy("random")
class RandomStrategy(Strategy):
    """Uniform random selection without replacement (baseline of Roels & Saeys 2019 and Yang et al. 2017).

    value(x) ~ U[0, 1) drawn from ``numpy.random.default_rng(seed)`` over the whole pool at select time, so the
    selection depends only on (seed, pool size), not on how the pool was chunked. Forward passes: none are needed
    (``score_pool`` still runs the deterministic pass, which the pre-annotation uses anyway).
    """

    def _summarize(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        # Nothing to measure; a zero column only carries the tile count through concatenation.
        return {"value": np.zeros(batch.n, dtype=np.float64)}

    def _select(self, summary, k, *, labelled_embeddings, seed) -> Selection:
        rng = np.random.default_rng(seed)
        return ranked_selection(rng.random(summary["value"].shape[0]), k)
