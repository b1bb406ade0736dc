"""``run_round``: one active-learning round, the same function for the product's RQ job and for the benchmark.

    labels ──► train (+ bootstrap members) ──► evaluate ──► publish ──► score the pool ──► select ──► sink
    (LabelSource)  training.recipe          (Evaluator)   (Publisher)  (PoolScorer)      (Selector)  (PredictionSink)

The plug-ins, product | benchmark:

* ``LabelSource``: Label Studio's latest annotations decoded to masks (``ml_backend.jobs``) | the ground-truth
  oracle on the tiles selected so far (``ml_backend.benchmarks.run``).
* ``Publisher``: the model registry (versioned, promoted, pruned) | memory (the model is carried to the next round).
* ``PoolScorer``: chunks shared with idle workers through Redis | in-process; both call ``inference.scoring``.
  ``RoundPlan.candidates`` first bounds what it scores (``active_learning.candidates``: CANDIDATE_POOL tiles, a
  fresh draw per round plus the previous best), so a round costs the same for 2,000 or 1,000,000 tiles.
* ``Selector``: a queue score for every task (``QueueOrder``) | the strategy's batch of k (``TopK``). Issue 11's
  stack-aware batch diversity is a selector.
* ``Evaluator`` (optional): the benchmark's test-region IoU | the product's audit gate (``active_learning.audit``:
  the new version against the live one on audit tiles selection did not choose), which answers
  ``Evaluation(promote=False, reason=...)`` when it is worse; the publisher stores it without promoting it (with
  ``Evaluation.meta`` in its metadata), and the round ends there (the live version and its queue stay).
* ``PredictionSink``: bulk push to Label Studio + project model version | the benchmark's record of the next batch.

Everything that travels together is a small dataclass: ``RoundPlan`` (what to do), ``LabelledSet`` (what was
learned from), ``ScoredPool`` (what the pool looks like to the model), ``RoundOutcome`` (what happened).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ml_backend.active_learning.selection import Ranking, Selector
from ml_backend.config import torch_device
from ml_backend.inference.scoring import PoolScores, ScoringConfig, embed_images
from ml_backend.training.recipe import EnsembleSpec, ModelState, TrainedModel, add_ensemble, train_model


class TrainingError(RuntimeError):
    """The job cannot train (no usable annotation, no label config): reported in the failed job, not retried blindly."""


@dataclass
class LabelledTile:
    task_id: int
    annotation_id: int | None
    image: np.ndarray  # float32 (H, W) normalised
    mask: np.ndarray  # int64 (H, W) class index or IGNORE


@dataclass
class LabelledSet:
    """The tiles a round learns from, in a stable order, and the annotations that could not be used (with why)."""

    tiles: list[LabelledTile]
    skipped: list[dict] = field(default_factory=list)

    @property
    def images(self) -> list[np.ndarray]:
        return [t.image for t in self.tiles]

    @property
    def masks(self) -> list[np.ndarray]:
        return [t.mask for t in self.tiles]


@dataclass
class ScoredPool:
    """The unlabelled pool as the new model sees it: ids that could be scored, their scores, optional masks."""

    ids: list[int]
    scores: PoolScores
    results: list[list[dict]] | None = None  # Label Studio results per id (product), None when masks are not needed
    failed: list[dict] = field(default_factory=list)


@dataclass
class Evaluation:
    """A version's quality check. ``promote`` False keeps the live version (issue 11: audit tiles, not worse)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    promote: bool = True
    reason: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # written into the version's metadata (audit, promotion)


@dataclass
class RoundPlan:
    """What one round does: the strategy, the model it starts from and how it trains, and the seeds it scores with.

    ``train`` None keeps the model as it is (the benchmark's cached initial model); ``score`` False stops after
    publishing (the benchmark's last round has no next batch to pick).
    """

    strategy: Any  # None: train and publish only (no scoring)
    model: ModelState
    train: Any = None  # training.TrainConfig
    ensemble: EnsembleSpec | None = None  # used only when the strategy needs ensemble probabilities
    calibration: Callable[[], list[np.ndarray] | None] | None = None
    progress: Callable[[dict], None] | None = None
    # The unlabelled pool's tiles for the semi-supervised term (training.semi), fetched only when it is enabled.
    unlabelled: Callable[[], list[np.ndarray] | None] | None = None
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    score_seed: int = 0
    select_seed: int = 0
    score: bool = True
    # (unlabelled pool, round's version) -> the ids to score and select among (``candidates.CandidateSampler``:
    # a bounded sample, issue 20.2); None scores the whole pool.
    candidates: Callable[[list[int], str], list[int]] | None = None


@dataclass
class RoundOutcome:
    version: str
    trained: TrainedModel
    labelled: LabelledSet
    evaluation: Evaluation
    scored: ScoredPool | None = None
    ranking: Ranking | None = None
    delivered: int = 0  # predictions handed to the sink
    timings: dict[str, float] = field(default_factory=dict)
    pool_size: int = 0  # unlabelled tiles the round could score; ``len(scored.ids)`` of them were (candidate sample)


class LabelSource(Protocol):
    def labelled(self) -> LabelledSet:
        """The labelled tiles this round trains on."""
        ...

    def unlabelled(self) -> list[int]:
        """Ids of the pool to score for the next selection."""
        ...


class Publisher(Protocol):
    def publish(self, trained: TrainedModel, labelled: LabelledSet, evaluation: Evaluation) -> str:
        """Store (or keep) the trained model; returns the version that now serves."""
        ...


class PoolScorer(Protocol):
    def score(self, trained: TrainedModel, version: str, strategy: Any, ids: list[int], seed: int) -> ScoredPool:
        """Score the pool ``ids`` with the trained model (and its bootstrap members)."""
        ...


class PredictionSink(Protocol):
    def put(self, version: str, scored: ScoredPool | None, ranking: Ranking | None) -> int:
        """Deliver the round's ranking (and masks); returns how many predictions were delivered."""
        ...


Phase = Callable[[str], contextlib.AbstractContextManager]


@contextlib.contextmanager
def _timed(name: str, timings: dict[str, float], outer: Phase | None) -> Iterator[None]:
    t0 = time.monotonic()
    with outer(name) if outer is not None else contextlib.nullcontext():
        try:
            yield
        finally:
            timings[name] = time.monotonic() - t0


def run_round(
    plan: RoundPlan,
    source: LabelSource,
    *,
    publisher: Publisher,
    scorer: PoolScorer | None = None,
    select: Selector | None = None,
    sink: PredictionSink | None = None,
    evaluate: Callable[[TrainedModel], Evaluation] | None = None,
    phase: Phase | None = None,
) -> RoundOutcome:
    """Train on the labelled set, publish, score the pool, select the next tiles, deliver them (see module doc).

    ``phase(name)`` is an optional context manager around the "train", "score" and "upload" steps (the RQ job shows
    them as progress); the outcome's ``timings`` hold their durations either way.
    """
    timings: dict[str, float] = {}
    labelled = source.labelled()
    if plan.train is not None and not labelled.tiles:
        raise TrainingError("no usable annotated tile to train on")
    with _timed("train", timings, phase):
        images, masks = labelled.images, labelled.masks
        trained = train_model(
            plan.model, images, masks, plan.train, calibration=plan.calibration, progress=plan.progress,
            unlabelled=plan.unlabelled,
        )  # fmt: skip
        evaluation = evaluate(trained) if evaluate is not None else Evaluation()
        if plan.ensemble is not None and "ensemble_probs" in _needs(plan):
            add_ensemble(trained, images, masks, plan.ensemble)
        version = publisher.publish(trained, labelled, evaluation)
    outcome = RoundOutcome(version, trained, labelled, evaluation, timings=timings)
    if not evaluation.promote:  # the live version keeps serving, and so does the queue it ordered
        return outcome
    ids = source.unlabelled() if plan.score and scorer is not None and select is not None else []
    outcome.pool_size = len(ids)
    if ids:
        with _timed("score", timings, phase):
            if plan.candidates is not None:  # issue 20.2: the round's cost bounded by the sample, not the pool
                ids = plan.candidates(ids, version)
            outcome.scored = scorer.score(trained, version, plan.strategy, ids, plan.score_seed)
            if outcome.scored.ids:
                outcome.ranking = select(
                    plan.strategy,
                    outcome.scored.ids,
                    outcome.scored.scores,
                    labelled_embeddings=_labelled_embeddings(plan, trained, labelled, select),
                    seed=plan.select_seed,
                )
    if sink is not None:
        with _timed("upload", timings, phase):
            outcome.delivered = sink.put(version, outcome.scored, outcome.ranking)
    return outcome


def _needs(plan: RoundPlan) -> frozenset[str]:
    return frozenset(getattr(plan.strategy, "needs", frozenset()))


def _labelled_embeddings(
    plan: RoundPlan, trained: TrainedModel, labelled: LabelledSet, select: Any = None
) -> np.ndarray | None:
    """Where the labelled set lies in feature space, only for strategies (coreset/k-means) or selectors (stack-aware
    diversity: ``wants_labelled_embeddings``) that use it."""
    if "embeddings" not in _needs(plan) and not getattr(select, "wants_labelled_embeddings", False):
        return None
    if not labelled.tiles:
        return None
    device = torch_device(plan.scoring.device)
    return embed_images(trained.model, labelled.images, device, batch_size=plan.scoring.embed_batch)
