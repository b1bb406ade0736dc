"""Queue-score mapping (Label Studio serves the LOWEST score first) and cold-start ordering."""

from __future__ import annotations

import math

import numpy as np
import pytest
from strategy_helpers import binary_probs, make_batch

from ml_backend.strategies import (
    PoolBatch,
    Selection,
    cold_start_scores,
    get_strategy,
    image_features,
    pool_queue_scores,
    queue_scores,
    uncertainty_to_queue_score,
)


def test_rank_scores_serve_the_selection_first_then_the_rest_by_value():
    selection = Selection(values=np.array([0.1, 0.9, 0.5, 2.0, 0.3]), order=np.array([3, 1]))
    scores = queue_scores(selection, 5)
    assert np.argsort(scores).tolist() == [3, 1, 2, 4, 0]
    assert scores[3] == 0.0 and scores.max() < 1.0
    assert len(np.unique(scores)) == 5  # no ties: the order is total


def test_rank_scores_reject_inconsistent_selections():
    with pytest.raises(ValueError, match="expected \\(4,\\)"):
        queue_scores(Selection(values=np.zeros(3), order=np.array([0])), 4)
    with pytest.raises(ValueError, match="duplicate"):
        queue_scores(Selection(values=np.zeros(3), order=np.array([1, 1])), 3)
    with pytest.raises(ValueError, match="indices in"):
        queue_scores(Selection(values=np.zeros(3), order=np.array([5])), 3)


def test_absolute_mapping_is_lowest_for_the_most_uncertain_and_comparable_across_calls():
    entropy = get_strategy("entropy")
    pool = PoolBatch(probs=binary_probs(np.array([0.5, 0.9, 0.999])[:, None, None] * np.ones((1, 4, 4))))
    values = entropy.summarize(pool)["value"]
    max_value = entropy.max_value(num_classes=2, num_pixels=16)
    assert max_value == pytest.approx(16 * math.log(2))
    scores = uncertainty_to_queue_score(values, max_value)
    assert scores[0] == pytest.approx(0.0, abs=1e-6)  # p = 0.5 everywhere: the most uncertain possible tile
    assert np.all(np.diff(scores) > 0) and scores.max() <= 1.0
    # scored alone in a second /predict call, a tile gets the same score (absolute, not rank-based)
    alone = uncertainty_to_queue_score(entropy.summarize(PoolBatch(probs=pool.probs[1:2]))["value"], max_value)
    assert alone[0] == pytest.approx(scores[1])


@pytest.mark.parametrize("name", ["entropy", "least_confidence", "margin", "bald"])
@pytest.mark.parametrize("c", [2, 3])
def test_max_value_bounds_every_pixel_uncertainty_strategy(name, c):
    batch = make_batch(n=20, c=c, size=4)
    uniform = np.full((1, c, 4, 4), 1.0 / c, np.float32)
    worst = PoolBatch(
        probs=uniform,
        mc_probs=np.stack(
            [np.eye(c, dtype=np.float32)[i][None, :, None, None] * np.ones((1, c, 4, 4), np.float32) for i in range(c)]
        ),
    )
    strategy = get_strategy(name)
    max_value = strategy.max_value(c, 16)
    assert np.all(strategy.summarize(batch)["value"] <= max_value + 1e-6)
    # the bound is attained (uniform prediction; for BALD, passes that each put all mass on a different class)
    assert strategy.summarize(worst)["value"][0] == pytest.approx(max_value, rel=1e-5)
    assert get_strategy(name, aggregation="mean").max_value(c, 16) == pytest.approx(max_value / 16)


def test_uncertainty_mapping_rejects_bad_scales():
    with pytest.raises(ValueError, match="max_value"):
        uncertainty_to_queue_score([1.0], 0.0)
    with pytest.raises(ValueError, match="NaN"):
        uncertainty_to_queue_score([np.nan], 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        uncertainty_to_queue_score([-1.0], 1.0)


def test_pool_queue_scores_use_absolute_mapping_or_ranks():
    batch = make_batch(n=10)
    entropy = get_strategy("entropy")
    scores = pool_queue_scores(entropy, entropy.summarize(batch), num_classes=2, num_pixels=64)
    np.testing.assert_allclose(scores, uncertainty_to_queue_score(entropy.summarize(batch)["value"], 64 * math.log(2)))
    coreset = get_strategy("coreset")
    summary = coreset.summarize(batch)
    ranks = pool_queue_scores(coreset, summary, num_classes=2, num_pixels=64, seed=1)
    assert sorted(ranks.tolist()) == [i / 10 for i in range(10)]
    assert np.argmin(ranks) == coreset.select(summary, 1, seed=1).order[0]
    # the first k follow the batch selection, the rest the secondary value (distance to the nearest centre)
    few = pool_queue_scores(coreset, summary, num_classes=2, num_pixels=64, seed=1, k=3)
    selection = coreset.select(summary, 3, seed=1)
    assert np.argsort(few)[:3].tolist() == selection.order.tolist()
    rest = np.argsort(few)[3:]
    assert np.all(np.diff(selection.values[rest]) <= 0)


def test_cold_start_random_order_depends_only_on_seed_and_task_id():
    ids = list(range(1, 201))
    scores = cold_start_scores(ids, seed=0)
    assert scores.shape == (200,) and scores.min() >= 0 and scores.max() < 1
    assert len(np.unique(scores)) == 200
    # the same task keeps its score when the task list changes (new imports) or is split across calls
    np.testing.assert_array_equal(cold_start_scores(ids[50:120], seed=0), scores[50:120])
    assert not np.array_equal(cold_start_scores(ids, seed=1), scores)
    # roughly uniform, and not simply the import order
    assert abs(scores.mean() - 0.5) < 0.1
    assert abs(np.corrcoef(scores, ids)[0, 1]) < 0.3


def test_cold_start_with_features_covers_the_data_first():
    rng = np.random.default_rng(0)
    dark = rng.random((30, 16, 16)).astype(np.float32) * 0.2
    bright = 0.8 + rng.random((2, 16, 16)).astype(np.float32) * 0.2
    images = np.concatenate([dark, bright])
    feats = image_features(images)
    assert feats.shape == (32, 19) and np.all(np.isfinite(feats))
    scores = cold_start_scores(list(range(32)), seed=0, features=feats)
    first_two = set(np.argsort(scores)[:3].tolist())
    assert first_two & {30, 31}, "a rare kind of tile is served early"
    np.testing.assert_array_equal(scores, cold_start_scores(list(range(32)), seed=0, features=feats))


def test_cold_start_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        cold_start_scores([])
    with pytest.raises(ValueError, match="features must have shape"):
        cold_start_scores([1, 2], features=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="images must have shape"):
        image_features(np.zeros((4, 4)))
