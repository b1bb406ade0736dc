"""The selection step of a round: a scored pool -> which tiles come next (and the queue score of every tile).

Two selectors today: ``QueueOrder`` (the product: a queue score for every unlabelled task, lower = served first,
``strategies.pool_queue_scores``) and ``TopK`` (the benchmark: the strategy's batch of k tiles). This is the seam for
stack-aware batch diversity (issue 11): a selector that wraps another and removes near-duplicates in z/xy or in
feature space plugs in here, for the product and the benchmark alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass
class Ranking:
    """The outcome of selection over a pool of ``ids``: the picked ids in order and, for a queue, every id's score."""

    ids: list[int]
    picked: list[int]  # most informative first
    scores: np.ndarray | None = None  # queue score per id (lower = served first), None for a plain batch


class Selector(Protocol):
    def __call__(
        self, strategy: Any, ids: list[int], scores: Any, *, labelled_embeddings: np.ndarray | None, seed: int
    ) -> Ranking:
        """Rank the scored pool (``scores``: inference.scoring.PoolScores for ``ids``)."""
        ...


@dataclass(frozen=True)
class TopK:
    """The strategy's next batch of ``k`` tiles (``Strategy.select``): what the benchmark's oracle annotates."""

    k: int

    def __call__(
        self, strategy: Any, ids: list[int], scores: Any, *, labelled_embeddings: np.ndarray | None, seed: int
    ) -> Ranking:
        selection = strategy.select(
            scores.summary, min(self.k, len(ids)), labelled_embeddings=labelled_embeddings, seed=seed
        )
        arr = np.asarray(ids, dtype=np.int64)
        return Ranking(list(ids), arr[selection.order].tolist())


@dataclass(frozen=True)
class QueueOrder:
    """A queue score for every tile of the pool (the product: Label Studio serves the lowest score first)."""

    num_classes: int

    def __call__(
        self, strategy: Any, ids: list[int], scores: Any, *, labelled_embeddings: np.ndarray | None, seed: int
    ) -> Ranking:
        from ml_backend.strategies import pool_queue_scores

        queue = pool_queue_scores(
            strategy,
            scores.summary,
            num_classes=self.num_classes,
            num_pixels=scores.pixels,
            labelled_embeddings=labelled_embeddings,
            seed=seed,
        )
        order = np.argsort(queue, kind="stable")
        return Ranking(list(ids), [int(ids[i]) for i in order], queue)
