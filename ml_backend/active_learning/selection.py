"""The selection step of a round: a scored pool -> which tiles come next (and the queue score of every tile).

Two base selectors: ``QueueOrder`` (the product: a queue score for every unlabelled task, lower = served first,
``strategies.pool_queue_scores``) and ``TopK`` (the benchmark: the strategy's batch of k tiles). ``StackAware``
wraps either one and makes its first ``k`` tiles a batch without near-duplicates (issue 11): no two tiles at
overlapping xy on nearby slices of one stack, none next to an already labelled tile, none too close in the model's
feature space (``strategies.batch.select_batch``: Hacohen et al. 2022 TypiClust while labels are few, Zhdanov 2019
uncertainty-weighted k-means after, or the plain score ranking with the exclusions only). Product and benchmark
share it: the product wraps ``QueueOrder``, the benchmark ``TopK``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ml_backend.strategies import pool_queue_scores
from ml_backend.strategies.batch import BatchConfig, LabelledTiles, select_batch

log = logging.getLogger(__name__)


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


PositionsOf = Callable[[Sequence[int]], np.ndarray]  # ids -> (n, 5) [stack, z, y, x, size] or (n, 6) [.., h, w]


def _informativeness(
    inner: Any, strategy: Any, ids: list[int], scores: Any, labelled_embeddings: Any, seed: int, keep_picks: bool
) -> tuple[Ranking, np.ndarray]:
    """(inner's Ranking, per-tile informativeness, higher = more informative) for the pool ``ids``; ``keep_picks``:
    a batch strategy's own picks stay on top in their order (else the raw values, e.g. as k-means weights)."""
    ranking = inner(strategy, ids, scores, labelled_embeddings=labelled_embeddings, seed=seed)
    if ranking.scores is not None:  # a queue: lower score = served first
        return ranking, -np.asarray(ranking.scores, dtype=np.float64)
    # A plain batch: the strategy's values for every tile (its ranking's picks are the k highest-valued tiles).
    n = len(ids)
    sel = strategy.select(scores.summary, min(max(1, len(ranking.picked)), n), labelled_embeddings=labelled_embeddings,
                          seed=seed)  # fmt: skip
    values = np.asarray(sel.values, dtype=np.float64)
    values = np.where(np.isfinite(values), values, np.nanmin(np.where(np.isfinite(values), values, np.inf)))
    if not keep_picks:
        return ranking, values
    # The strategy's own picks keep their order on top (batch strategies rank by more than ``values``).
    pos = {int(t): j for j, t in enumerate(ranking.picked)}
    arr = np.asarray(ids, dtype=np.int64)
    bonus = np.array([len(pos) - pos[int(t)] if int(t) in pos else 0 for t in arr], dtype=np.float64)
    span = float(np.ptp(values)) if values.size else 0.0
    return ranking, values + bonus * (span + 1.0)


@dataclass(frozen=True)
class StackAware:
    """Wrap ``TopK`` or ``QueueOrder``: the first ``k`` tiles become a batch without near-duplicates (issue 11).

    The inner selector gives each tile's informativeness (a queue score, or the strategy's values with its own picks
    on top); ``strategies.batch.select_batch`` picks ``k`` tiles under the stack neighbourhood rule (``positions``:
    pool ids -> [stack, z, y, x, size]; ``labelled_positions``: the labelled tiles' rows, whose neighbours are
    skipped) and the feature rule (bottleneck embeddings from the scored pool's ``summary["embedding"]``; without
    them the feature rule is off and only the stack rule applies). A z radius of "auto" is measured on the pool's
    ``summary["thumbnail"]`` (``strategies.batch.thumbnail``; without them: the fallback radius). ``config.method``:
    "top" keeps the inner ranking with the exclusions only; "stochastic" draws it (softrank, Kirsch et al. 2023);
    "auto" switches TypiClust (Hacohen et al. 2022, low budget) / uncertainty-weighted
    k-means (Zhdanov 2019, high budget); "typiclust" / "weighted_kmeans" force one.

    For a queue the picked tiles take the ``k`` lowest queue scores (strictly increasing, in pick order) and the
    rest keep the inner order after them, so the same score values are reused and Label Studio serves the batch
    first. For a plain batch, ``picked`` is the k tiles.

    ``held_out``: pool ids never picked (the product's audit tasks, which it serves at their own places); they
    follow the batch in the inner order like the rest. ``served``: pool ids the caller serves within this batch
    (the product's audit places): they take ``len(served)`` of the ``k`` places, are never picked, and exclude their
    near-duplicates (stack and feature rule) like picked tiles.
    """

    inner: Any  # TopK | QueueOrder
    positions: PositionsOf
    k: int = 20
    config: Any = None  # strategies.batch.BatchConfig (None: its defaults, method "top")
    labelled_positions: Callable[[], np.ndarray] | None = None
    # run_round embeds the labelled tiles for this selector (feature rule against them, TypiClust's covered clusters)
    wants_labelled_embeddings: bool = False
    held_out: Sequence[int] = ()
    served: Sequence[int] = ()

    def __call__(
        self, strategy: Any, ids: list[int], scores: Any, *, labelled_embeddings: np.ndarray | None, seed: int
    ) -> Ranking:
        cfg = self.config or BatchConfig(method="top")
        ranking, info = _informativeness(
            self.inner, strategy, ids, scores, labelled_embeddings, seed, cfg.method in ("top", "stochastic")
        )
        n = len(ids)
        if n == 0:
            return ranking
        emb = scores.summary.get("embedding") if isinstance(scores.summary, dict) else None
        thumbs = scores.summary.get("thumbnail") if isinstance(scores.summary, dict) else None
        if thumbs is not None and np.shape(thumbs)[0] != n:
            thumbs = None
        features = not (emb is None or np.shape(emb)[0] != n)
        if not features:
            emb, labelled_embeddings = np.zeros((n, 1)), None
            cfg = _no_feature_rule(cfg)
        elif labelled_embeddings is not None and np.shape(labelled_embeddings)[1:] != np.shape(emb)[1:]:
            labelled_embeddings = None
        lpos = self.labelled_positions() if self.labelled_positions is not None else None
        if lpos is not None and len(lpos) == 0:
            lpos = None
        k = min(self.k, n)
        emb, positions = np.asarray(emb, dtype=np.float64), np.asarray(self.positions(ids))
        n_labelled = None if lpos is None else len(lpos)
        cand = None
        if len(self.held_out) or len(self.served):
            index = {int(t): i for i, t in enumerate(ids)}
            held = {int(t) for t in (*self.held_out, *self.served)}
            cand = np.asarray([i for i, t in enumerate(ids) if int(t) not in held], dtype=np.int64)
            seat = np.asarray([index[int(t)] for t in self.served if int(t) in index], dtype=np.int64)
            k = max(0, min(self.k - seat.size, cand.size))
            if n_labelled is None:
                n_labelled = 0 if labelled_embeddings is None else int(np.shape(labelled_embeddings)[0])
            if seat.size:  # served tiles exclude like picks: first in the labelled rows, then the labelled tiles
                lpos = np.concatenate([positions[seat], *([] if lpos is None else [np.asarray(lpos)])])
                if features:
                    lab = [] if labelled_embeddings is None else [np.asarray(labelled_embeddings, dtype=np.float64)]
                    labelled_embeddings = np.concatenate([emb[seat], *lab])
            info, emb, positions = info[cand], emb[cand], positions[cand]
            thumbs = None if thumbs is None else np.asarray(thumbs)[cand]
        batch = select_batch(
            info,
            emb,
            positions,
            k,
            labelled=LabelledTiles(labelled_embeddings, lpos, n_labelled),
            config=cfg,
            seed=seed,
            z_features=thumbs,
        )
        log.info(
            "stack-aware batch: %d tiles, method %s, z radius %s%s, %d picked after relaxing the rules",
            len(batch.order), cfg.method, batch.z_radius, " (measured)" if cfg.neighbourhood.is_auto else "",
            batch.relaxed,
        )  # fmt: skip
        head = [int(i) if cand is None else int(cand[i]) for i in batch.order]
        chosen = set(head)
        if ranking.scores is None:
            arr = np.asarray(ids, dtype=np.int64)
            return Ranking(list(ids), arr[head].tolist())
        queue = np.asarray(ranking.scores, dtype=np.float64)
        inner_order = np.argsort(queue, kind="stable")
        order = head + [int(i) for i in inner_order if int(i) not in chosen]
        values = np.sort(queue)
        for j in range(1, n):  # strictly increasing: ties would let Label Studio serve a rest tile inside the batch
            values[j] = max(values[j], np.nextafter(values[j - 1], np.inf))
        new = np.empty(n, dtype=np.float64)
        new[np.asarray(order)] = values
        return Ranking(list(ids), [int(ids[i]) for i in order], new)


def _no_feature_rule(cfg: Any) -> Any:
    """Without embeddings only the stack rule applies: the inner ranking with the exclusions ("top")."""
    from dataclasses import replace

    return replace(cfg, method="top", feature_radius=0.0)
