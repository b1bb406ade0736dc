"""One active-learning round, shared by the product's training job and the benchmark.

``run_round``: train on the labelled set -> evaluate (seam) -> publish/keep -> score the pool -> select (seam) ->
hand the ranking to a prediction sink. Where labels come from (Label Studio annotations or a ground-truth oracle)
and where predictions go (Label Studio or memory) are the plug-ins; see ``ml_backend.active_learning.round``.
"""

from ml_backend.active_learning.round import (
    Evaluation,
    LabelledSet,
    LabelledTile,
    LabelSource,
    PoolScorer,
    PredictionSink,
    Publisher,
    RoundOutcome,
    RoundPlan,
    ScoredPool,
    TrainingError,
    run_round,
)
from ml_backend.active_learning.selection import QueueOrder, Ranking, Selector, TopK

__all__ = [
    "Evaluation",
    "LabelSource",
    "LabelledSet",
    "LabelledTile",
    "PoolScorer",
    "PredictionSink",
    "Publisher",
    "QueueOrder",
    "Ranking",
    "RoundOutcome",
    "RoundPlan",
    "ScoredPool",
    "Selector",
    "TopK",
    "TrainingError",
    "run_round",
]
