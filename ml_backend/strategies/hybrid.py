"""Hybrid: uncertainty first, then diversity among the most uncertain tiles."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
from pydantic import Field

from .base import PoolBatch, Selection, Strategy, batch_values, register_strategy, top_k
from .diversity import k_center_greedy, max_cover_select
from .params import StrategyParams
from .suggestive import MAX_CANDIDATES_FACTOR
from .uncertainty import BaldStrategy, EntropyStrategy, LeastConfidenceStrategy, MarginStrategy

_UNCERTAINTY = {
    "entropy": EntropyStrategy,
    "least_confidence": LeastConfidenceStrategy,
    "margin": MarginStrategy,
    "bald": BaldStrategy,
}
Uncertainty = Literal["entropy", "least_confidence", "margin", "bald"]  # the keys of _UNCERTAINTY
Diversity = Literal["coreset", "maxcover"]
DIVERSITY: tuple[str, ...] = get_args(Diversity)


@register_strategy("hybrid")
class HybridStrategy(Strategy):
    """Exploration plus uncertainty, the combination Roels & Saeys (2019, section 4) name as future work.

    1. candidates S_c = the K = candidates_factor * k tiles with the highest uncertainty value (``uncertainty``:
       entropy (default), least_confidence, margin or bald, with this strategy's aggregation);
    2. among S_c, pick k for diversity on the bottleneck embedding:
       diversity="coreset" (default): greedy k-center with the labelled embeddings as initial centres
       (Sener & Savarese 2018): u = argmax_{x in S_c} min_{c in L u S} ||z_x - z_c||;
       diversity="maxcover": greedy max-cover of the whole pool by cosine similarity (Yang et al. 2017).
    Unselected tiles' value: their uncertainty. Forward passes: those of the uncertainty part (1; encoder once +
    decoder 1 + T for bald), the embedding comes from the same encoder pass.
    """

    class Params(StrategyParams):
        uncertainty: Uncertainty = Field("entropy", description="the uncertainty that picks the candidates")
        diversity: Diversity = Field(
            "coreset", description="how k tiles are picked among them: greedy k-center or max-cover of the pool"
        )
        candidates_factor: float = Field(
            4.0,
            ge=1.0,
            le=MAX_CANDIDATES_FACTOR,
            description="K = candidates_factor x k most uncertain tiles are the candidates",
        )

    summary_keys = ("value", "embedding")
    config: Params

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self.uncertainty = self.config.uncertainty
        self.diversity = self.config.diversity
        self.candidates_factor = float(self.config.candidates_factor)
        self._inner = _UNCERTAINTY[self.uncertainty](aggregation=self.aggregation)
        self.needs = self._inner.needs | {"embeddings"}  # instance attribute: depends on the uncertainty part

    def _summarize(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        value = self._inner._summarize(batch)["value"]
        return {"value": value, "embedding": np.asarray(batch.embeddings, dtype=np.float32)}

    def _select(self, summary, k, *, labelled_embeddings, seed) -> Selection:
        value = np.asarray(summary["value"], dtype=np.float64)
        emb = np.asarray(summary["embedding"], dtype=np.float64)
        n = value.shape[0]
        n_cand = min(n, max(k, int(np.ceil(self.candidates_factor * k))))
        candidates = top_k(value, n_cand)
        if self.diversity == "coreset":
            if labelled_embeddings is None:
                # no labelled centres: start from the most uncertain candidate rather than a random one
                first = np.zeros(1, dtype=np.int64)
                rest, _ = k_center_greedy(emb[candidates], k, emb[candidates[:1]], seed=seed)
                rest = rest[rest != 0][: k - 1]
                picks = np.concatenate([first, rest])
            else:
                picks, _ = k_center_greedy(emb[candidates], k, labelled_embeddings, seed=seed)
        else:
            picks = max_cover_select(emb[candidates], emb, k)
        order = candidates[picks]
        return Selection(values=batch_values(n, order, value), order=order)
