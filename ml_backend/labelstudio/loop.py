"""Label Studio's side of the active-learning round: where labels come from (annotated tasks) and where the
predictions go (masks + queue scores in bulk, then the project's model version).

``AnnotatedTasks`` is the product's ``LabelSource`` and ``LabelStudioSink`` its ``PredictionSink`` for
``ml_backend.active_learning.run_round``; ``score_tiles`` turns one chunk of task images into strategy summaries
and brush-mask results with one forward pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml_backend.active_learning.round import LabelledSet, ScoredPool
from ml_backend.active_learning.selection import Ranking
from ml_backend.config import Settings, get_settings
from ml_backend.inference.scoring import ScoringConfig, score_images
from ml_backend.labelstudio.client import LabelStudioError, LabelStudioUnavailable
from ml_backend.labelstudio.overlays import prediction_results
from ml_backend.strategies.batch import thumbnail

log = logging.getLogger(__name__)


@dataclass
class AnnotatedTasks:
    """The product's label source: the decoded latest annotations, and the project's tasks without one."""

    labelled_set: LabelledSet
    pool: list[int]

    def labelled(self) -> LabelledSet:
        return self.labelled_set

    def unlabelled(self) -> list[int]:
        return list(self.pool)


def score_tiles(
    model: Any,
    images: list[np.ndarray],
    strategy: Any,
    config: Any,
    settings: Settings,
    *,
    ensemble: list[Any] | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], list[list[dict]], np.ndarray]:
    """(summary in input order, Label Studio results per tile, pixels per tile) for one chunk of the pool.

    ``inference.scoring.score_images`` (tiled for large images) gives the summary; the same probabilities become the
    pre-annotation masks, with the uncertainty layer and suggested region of ``overlays.prediction_results`` (the
    builder /predict uses) when the label config has their controls.
    """
    results: list[list[dict]] = [[] for _ in images]

    def on_probs(i: int, probs: np.ndarray) -> None:
        results[i] = prediction_results(probs, config, settings)

    cfg = ScoringConfig.from_settings(settings)
    if getattr(settings, "batch_diversity", False):
        strategy = WithEmbedding(strategy)
    scored = score_images(model, images, strategy, cfg, ensemble=ensemble, seed=seed, on_probs=on_probs)
    if getattr(settings, "batch_diversity", False) and images:
        # The stack rule's "auto" z radius is measured on what the tiles look like (strategies.batch).
        scored.summary["thumbnail"] = np.stack([thumbnail(im) for im in images])
    return scored.summary, results, scored.pixels


class WithEmbedding:
    """A strategy whose pool summary also holds each tile's bottleneck embedding (``summary["embedding"]``), for
    stack-aware batch diversity (``active_learning.plan.StackAwareQueue``) with ANY strategy.

    The encoder pass already computes the embedding (``strategies.score_pool``), so small tiles cost nothing more;
    tiles larger than one inference tile are scored as tile-sized crops whose embeddings are averaged
    (``inference.scoring.combine_crop_summaries``). Everything else is the wrapped strategy's.
    """

    def __init__(self, strategy: Any) -> None:
        self._inner = strategy
        self.needs = frozenset(strategy.needs) | {"embeddings"}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"{self._inner!r}+embedding"

    def summarize(self, batch: Any) -> dict[str, np.ndarray]:
        summary = dict(self._inner.summarize(batch))
        if "embedding" not in summary and batch.embeddings is not None:
            summary["embedding"] = np.asarray(batch.embeddings, dtype=np.float32)
        return summary


@dataclass
class LabelStudioSink:
    """The product's prediction sink: every scored task's mask and queue score in bulk (never twice for a version),
    then the project's ``model_version`` so Label Studio orders its queue by the new scores. ``project``: a
    ``ProjectData`` (``project_data.LabelStudioProject``; the unit tests' ``FakeProject``), its task list as read
    before the delivery."""

    project: Any
    keep_prediction_versions: int | None = None  # None: KEEP_PREDICTION_VERSIONS
    last_prune: Any = None
    blank: frozenset[int] = frozenset()  # audit tasks: a queue score, no pre-annotation (active_learning.audit)

    def put(self, version: str, scored: ScoredPool | None, ranking: Ranking | None) -> int:
        pid = self.project.pid
        predictions = predictions_for(version, scored, ranking, blank=self.blank)
        held = {tid for tid, task in self.project.tasks().items() if _holds_prediction(task, version)}
        fresh = [p for p in predictions if int(p["task"]) not in held]  # a re-run never duplicates a prediction
        if len(fresh) < len(predictions):
            log.info("project %s: %d tasks already hold a prediction of %s (uploaded by an earlier run of this job)",
                     pid, len(predictions) - len(fresh), version)  # fmt: skip
        if fresh:
            self.project.push_predictions(fresh)
        try:
            self.project.set_model_version(version)
        except LabelStudioError as exc:
            if isinstance(exc, LabelStudioUnavailable) or predictions:
                raise
            # Label Studio accepts a model_version only once predictions of it exist: nothing left to predict
            log.warning("project %s: every task is labelled; model_version %s not set (%s)", pid, version, exc)
            return len(predictions)
        self._prune(version, held | {int(p["task"]) for p in predictions})
        return len(predictions)

    def _prune(self, version: str, covered: set[int]) -> None:
        """Prediction hygiene, only once the new predictions are in and the project's model_version names them; a
        failure here is logged, never fails the delivery (the next round prunes again)."""
        keep = self.keep_prediction_versions
        if keep is None:
            keep = get_settings().keep_prediction_versions
        try:
            self.last_prune = self.project.prune(version, covered, keep)
        except LabelStudioError as exc:
            log.warning("project %s: prediction hygiene failed (%s); older predictions stay until the next round",
                        self.project.pid, exc)  # fmt: skip


def predictions_for(
    version: str, scored: ScoredPool | None, ranking: Ranking | None, *, blank: frozenset[int] = frozenset()
) -> list[dict]:
    """``[{task, result, score, model_version}]`` for Label Studio (score: lower = served first); tasks in ``blank``
    get an empty result (audit tasks are annotated without the model's mask to anchor on)."""
    if scored is None or ranking is None or not scored.ids:
        return []
    return [
        {"task": int(tid), "result": [] if int(tid) in blank else res, "score": float(score), "model_version": version}
        for tid, res, score in zip(scored.ids, scored.results, ranking.scores, strict=True)
    ]


def _holds_prediction(task: dict, version: str) -> bool:
    return any(isinstance(p, dict) and p.get("model_version") == version for p in task.get("predictions") or [])
