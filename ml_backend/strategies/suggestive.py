"""Suggestive annotation (Yang et al., MICCAI 2017): bootstrap-ensemble uncertainty + greedy max-cover."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from .base import PoolBatch, Selection, Strategy, aggregate, as_float, batch_values, register_strategy, top_k
from .diversity import max_cover_select
from .params import StrategyParams

# K = factor * k candidates; max-cover costs O(k K N): 50 x k = 1,000 candidates for a batch of 20 is plenty
MAX_CANDIDATES_FACTOR = 50.0


def bootstrap_indices(n: int, members: int, seed: int = 0) -> list[np.ndarray]:
    """Index sets for training ``members`` ensemble models on bootstrap resamples of n labelled tiles.

    Each set draws n indices with replacement (Yang et al. 2017, section 2.2), from ``default_rng(seed)``. Callers
    (the benchmark, the RQ training job) fine-tune one model per set with ``ml_backend.training.fine_tune`` and pass
    the models to ``score_pool(..., ensemble=[...])``. Yang et al. use 4 members.
    """
    if n <= 0:
        raise ValueError(f"need at least one labelled tile to bootstrap, got n={n}")
    if members < 2:
        raise ValueError(f"an ensemble needs >= 2 members for a variance, got {members}")
    rng = np.random.default_rng(seed)
    return [np.sort(rng.integers(0, n, size=n)).astype(np.int64) for _ in range(members)]


@register_strategy("suggestive")
class SuggestiveStrategy(Strategy):
    """Suggestive annotation (Yang et al. 2017, sections 2.2-2.3).

    Uncertainty: E models fine-tuned on bootstrap resamples of the labelled set (``bootstrap_indices``);
        u_j(x)   = 1/C sum_c Var_e [p^e_j(x)]_c       (for C = 2: the variance of the foreground probability)
        value(x) = agg_j u_j(x)                       (the paper averages: use aggregation="mean" to match it)
    Selection: the top K = candidates_factor * k most uncertain tiles form S_c; then greedily choose k of them
    maximising the representativeness of the pool S_u,
        F(S_a, S_u) = sum_{x in S_u} max_{s in S_a} cos(d(s), d(x)),   d = channel-wise mean of the last encoder map
    (= ``model.embed``). Greedy is within (1 - 1/e) of the optimum. The paper uses k = 8, K = 16 (factor 2).
    Forward passes: E full ensemble forwards + the deterministic pass (for the descriptor and the pre-annotation).
    """

    class Params(StrategyParams):
        candidates_factor: float = Field(
            2.0,
            ge=1.0,
            le=MAX_CANDIDATES_FACTOR,
            description="K = candidates_factor x k most uncertain tiles enter max-cover (the paper: 2)",
        )

    needs = frozenset({"ensemble_probs", "embeddings"})
    summary_keys = ("value", "embedding")
    config: Params

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self.candidates_factor = float(self.config.candidates_factor)

    def _summarize(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        ens = as_float(batch.ensemble_probs)
        if ens.shape[2] == 2:  # Var(1 - p) = Var(p): one class carries the whole binary variance
            variance = ens[:, :, 1].var(axis=0)  # (n, H, W)
        else:
            variance = sum(ens[:, :, c].var(axis=0) for c in range(ens.shape[2])) / ens.shape[2]
        return {
            "value": aggregate(variance, self.aggregation),
            "embedding": np.asarray(batch.embeddings, dtype=np.float32),
        }

    def _select(self, summary, k, *, labelled_embeddings, seed) -> Selection:
        value = np.asarray(summary["value"], dtype=np.float64)
        n = value.shape[0]
        n_cand = min(n, max(k, int(np.ceil(self.candidates_factor * k))))
        candidates = top_k(value, n_cand)
        picks = max_cover_select(summary["embedding"][candidates], summary["embedding"], k)
        order = candidates[picks]
        return Selection(values=batch_values(n, order, value), order=order)
