"""Active-learning acquisition strategies, selectable by name (``STRATEGY``; default ``entropy``).

>>> from ml_backend.strategies import get_strategy, score_pool, queue_scores
>>> strategy = get_strategy("entropy", aggregation="sum")
>>> summary = score_pool(model, tiles, strategy)          # chunk-wise model outputs -> per-tile statistics
>>> selection = strategy.select(summary, k=20, seed=0)    # values (N,), order (k,) most informative first

Registered: random, entropy, least_confidence, margin, bald, kmeans, coreset, suggestive, effort_aware, hybrid.
Each declares its parameters, with types and bounds, as ``Strategy.Params`` (``params``; ``strategy_params_model``).
"""

# ruff: noqa: I001  (import order = registration order = the order available_strategies() lists)
from .base import (
    AGGREGATIONS,
    PoolBatch,
    Selection,
    Strategy,
    available_strategies,
    get_strategy,
    register_strategy,
    strategy_params_model,
)
from .params import StrategyParams, StrategyParamsError
from .random import RandomStrategy
from .uncertainty import BaldStrategy, EntropyStrategy, LeastConfidenceStrategy, MarginStrategy, pixel_entropy
from .diversity import CoresetStrategy, KMeansStrategy, greedy_max_cover, k_center_greedy
from .suggestive import SuggestiveStrategy, bootstrap_indices
from .effort import EffortAwareStrategy, annotation_effort, boundary_lengths, soft_dice
from .hybrid import HybridStrategy
from .pool import PassConfig, forward_passes, score_pool
from .queue import cold_start_scores, image_features, pool_queue_scores, queue_scores, uncertainty_to_queue_score

__all__ = [
    "AGGREGATIONS",
    "BaldStrategy",
    "CoresetStrategy",
    "EffortAwareStrategy",
    "EntropyStrategy",
    "HybridStrategy",
    "KMeansStrategy",
    "LeastConfidenceStrategy",
    "MarginStrategy",
    "PassConfig",
    "PoolBatch",
    "RandomStrategy",
    "Selection",
    "Strategy",
    "StrategyParams",
    "StrategyParamsError",
    "SuggestiveStrategy",
    "annotation_effort",
    "available_strategies",
    "bootstrap_indices",
    "boundary_lengths",
    "cold_start_scores",
    "forward_passes",
    "get_strategy",
    "greedy_max_cover",
    "image_features",
    "k_center_greedy",
    "pixel_entropy",
    "pool_queue_scores",
    "queue_scores",
    "register_strategy",
    "score_pool",
    "soft_dice",
    "strategy_params_model",
    "uncertainty_to_queue_score",
]
