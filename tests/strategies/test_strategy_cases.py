"""Hand-computed cases per strategy on tiny synthetic probability maps."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from strategy_helpers import binary_probs, make_batch

from ml_backend.strategies import (
    PoolBatch,
    annotation_effort,
    bootstrap_indices,
    boundary_lengths,
    get_strategy,
    greedy_max_cover,
    k_center_greedy,
    pixel_entropy,
    soft_dice,
)
from ml_backend.strategies.base import batch_values, class_max, hard_labels, top_k
from ml_backend.training.metrics import boundary_length


def constant_pool(ps: list[float], size: int = 4) -> PoolBatch:
    """One tile per foreground probability p, constant over the tile."""
    return PoolBatch(probs=binary_probs(np.array(ps)[:, None, None] * np.ones((1, size, size))))


# ---------------------------------------------------------------- entropy / least confidence / margin
def test_entropy_picks_the_tile_at_one_half_and_matches_the_formula():
    pool = constant_pool([0.9, 0.5, 0.99, 0.7])
    strategy = get_strategy("entropy")
    summary = strategy.summarize(pool)
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
    np.testing.assert_allclose(summary["value"], [16 * h(p) for p in (0.9, 0.5, 0.99, 0.7)], rtol=1e-5)
    assert strategy.select(summary, 2).order.tolist() == [1, 3]
    mean = get_strategy("entropy", aggregation="mean").summarize(pool)["value"]
    np.testing.assert_allclose(mean, summary["value"] / 16, rtol=1e-6)


def test_blocked_pixel_entropy_equals_the_formula_for_any_leading_shape():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 4, 130, 90))  # blocks do not divide the tile count
    p = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    np.testing.assert_allclose(pixel_entropy(p), -(p * np.log(p)).sum(axis=2), rtol=1e-5, atol=1e-6)


def test_entropy_of_certain_pixels_is_zero_not_nan():
    pool = PoolBatch(probs=binary_probs(np.array([[[0.0, 1.0]], [[0.5, 0.5]]])))
    values = get_strategy("entropy").summarize(pool)["value"]
    np.testing.assert_allclose(values, [0.0, 2 * math.log(2)], rtol=1e-6)


def test_least_confidence_and_margin_values():
    pool = constant_pool([0.9, 0.6], size=1)
    lc = get_strategy("least_confidence").summarize(pool)["value"]
    margin = get_strategy("margin").summarize(pool)["value"]
    np.testing.assert_allclose(lc, [0.1, 0.4], rtol=1e-6)
    np.testing.assert_allclose(margin, [0.2, 0.8], rtol=1e-6)  # 1 - |p1 - p0|


def test_least_confidence_and_margin_agree_on_binary_maps():
    rng = np.random.default_rng(1)
    pool = PoolBatch(probs=binary_probs(rng.random((30, 6, 6))))
    lc = get_strategy("least_confidence")
    mg = get_strategy("margin")
    lc_sel = lc.select(lc.summarize(pool), 30)
    mg_sel = mg.select(mg.summarize(pool), 30)
    np.testing.assert_array_equal(lc_sel.order, mg_sel.order)
    np.testing.assert_allclose(mg_sel.values, 2 * lc_sel.values, rtol=1e-5)


def test_margin_uses_the_two_most_likely_of_three_classes():
    probs = np.array([[0.5, 0.3, 0.2], [0.4, 0.35, 0.25]], dtype=np.float32)[:, :, None, None]
    values = get_strategy("margin").summarize(PoolBatch(probs=probs))["value"]
    np.testing.assert_allclose(values, [1 - 0.2, 1 - 0.05], rtol=1e-5)


# ---------------------------------------------------------------- BALD
def test_bald_is_zero_when_passes_agree_and_positive_when_they_disagree():
    agree = binary_probs(np.full((1, 4, 4), 0.3))
    mc_agree = np.stack([agree] * 5)
    p_a, p_b = binary_probs(np.full((1, 4, 4), 0.1)), binary_probs(np.full((1, 4, 4), 0.9))
    mc_disagree = np.stack([p_a, p_b, p_a, p_b])
    probs = np.concatenate([agree, mc_disagree.mean(0)])
    batch = PoolBatch(probs=probs, mc_probs=np.concatenate([mc_agree[:4], mc_disagree], axis=1))
    summary = get_strategy("bald").summarize(batch)
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
    assert summary["value"][0] == pytest.approx(0.0, abs=1e-5)
    assert summary["value"][1] == pytest.approx(16 * (h(0.5) - h(0.1)), rel=1e-5)  # H(mean) - mean H
    assert summary["entropy"][1] == pytest.approx(16 * h(0.5), rel=1e-5)
    assert summary["entropy"][0] == pytest.approx(16 * h(0.3), rel=1e-5)  # MC-averaged entropy is reported too


# ---------------------------------------------------------------- k-center / coreset / kmeans
def test_k_center_never_picks_a_duplicate_of_a_labelled_tile_while_a_distant_tile_exists():
    labelled = np.array([[0.0, 0.0], [10.0, 0.0]])
    pool = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 0.0], [5.0, 5.0], [0.1, 0.0], [0.0, 9.0]])
    order, dist = k_center_greedy(pool, 3, labelled)
    assert order.tolist() == [5, 3, 4]  # farthest first; exact duplicates (0, 1, 2) never while others remain
    assert dist[[0, 1, 2]].max() == 0.0
    strategy = get_strategy("coreset")
    summary = {"value": np.zeros(6), "embedding": pool}
    assert strategy.select(summary, 3, labelled_embeddings=labelled).order.tolist() == [5, 3, 4]
    full = strategy.select(summary, 6, labelled_embeddings=labelled).order.tolist()
    assert set(full[-3:]) == {0, 1, 2}, "duplicates come last"


def test_k_center_without_labelled_spreads_out():
    pool = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [5.0]])
    order, _ = k_center_greedy(pool, 3, None, seed=0)
    groups = {0: "low", 1: "low", 2: "low", 3: "high", 4: "high", 5: "mid"}
    assert {groups[i] for i in order.tolist()} == {"low", "high", "mid"}


def test_kmeans_picks_the_tile_closest_to_each_cluster_centre_largest_cluster_first():
    rng = np.random.default_rng(0)
    big = rng.normal(scale=0.1, size=(7, 2))
    big[3] = 0.0
    small = np.array([[10.0, 10.0], [10.2, 10.0], [10.1, 10.0]])
    emb = np.concatenate([big, small])
    centre_big = big.mean(axis=0)
    closest_big = int(np.argmin(np.linalg.norm(big - centre_big, axis=1)))
    selection = get_strategy("kmeans").select({"value": np.zeros(10), "embedding": emb}, 2, seed=0)
    assert selection.order.tolist() == [closest_big, 9]


def test_kmeans_with_duplicate_embeddings_still_returns_k_unique_tiles():
    emb = np.array([[0.0, 0.0]] * 4 + [[1.0, 1.0]] * 2)
    selection = get_strategy("kmeans").select({"value": np.zeros(6), "embedding": emb}, 4, seed=0)
    assert len(set(selection.order.tolist())) == 4
    assert {0, 4} <= {min(i, 4 if i >= 4 else 0) for i in selection.order.tolist()}  # both groups represented


# ---------------------------------------------------------------- max-cover / suggestive
def _cover(sim: np.ndarray, chosen) -> float:
    return float(np.maximum(sim[list(chosen)].max(axis=0), 0).sum())


def test_greedy_max_cover_equals_the_optimum_on_disjoint_sets_and_meets_the_bound():
    # disjoint 0/1 sets of sizes 3, 2, 1: greedy is exactly optimal
    sim = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0]], np.float32)
    order, value = greedy_max_cover(sim, 2)
    assert order.tolist() == [0, 1]
    assert value == 5.0
    rng = np.random.default_rng(0)
    for trial in range(20):
        sim = rng.random((7, 12)).astype(np.float32) ** 3
        for k in (1, 2, 3):
            order, value = greedy_max_cover(sim, k)
            best = max(_cover(sim, c) for c in itertools.combinations(range(7), k))
            assert value == pytest.approx(_cover(sim, order), rel=1e-6)
            assert value >= (1 - 1 / math.e) * best - 1e-6, (trial, k)
            if k == 1:
                assert value == pytest.approx(best, rel=1e-6)  # one greedy step is the exact optimum


def test_greedy_max_cover_is_below_the_optimum_on_the_classic_counterexample():
    # Greedy takes the big middle set first, then can only add 2 of the 3 remaining (optimum 6 vs greedy 5).
    sim = np.array(
        [
            [1, 1, 1, 0, 0, 0],  # A
            [0, 0, 0, 1, 1, 1],  # B
            [0, 1, 1, 1, 1, 0],  # middle (4 elements)
        ],
        np.float32,
    )
    order, value = greedy_max_cover(sim, 2)
    assert order[0] == 2
    assert value == 5.0
    assert value >= (1 - 1 / math.e) * 6


def test_suggestive_prefers_uncertain_then_representative():
    # candidates: top-4 by ensemble variance = tiles 0..3; tiles 0-2 are near-duplicates, 3 represents another mode
    n, size = 8, 4
    ens_fg = np.full((3, n, size, size), 0.1, np.float32)
    for i, spread in enumerate([0.4, 0.39, 0.38, 0.3]):
        ens_fg[:, i] = np.array([0.5 - spread, 0.5, 0.5 + spread])[:, None, None]
    ensemble = np.stack([binary_probs(m) for m in ens_fg])
    emb = np.array([[1, 0], [1, 0.01], [1, 0.02], [0, 1], [1, 0.05], [0.05, 1], [0.02, 1], [0.9, 0.1]], np.float32)
    batch = PoolBatch(probs=ensemble.mean(0), embeddings=emb, ensemble_probs=ensemble)
    strategy = get_strategy("suggestive", candidates_factor=2)
    summary = strategy.summarize(batch)
    assert top_k(summary["value"], 4).tolist() == [0, 1, 2, 3]
    order = strategy.select(summary, 2).order.tolist()
    assert order[0] in (0, 1, 2) and order[1] == 3  # not two near-duplicates
    assert get_strategy("entropy").select(get_strategy("entropy").summarize(batch), 2).order.tolist() != order


@pytest.mark.parametrize("c", [2, 3])
def test_suggestive_uncertainty_is_the_class_mean_ensemble_variance(c):
    batch = make_batch(n=4, c=c, size=5, e=4)
    expected = batch.ensemble_probs.astype(np.float64).var(axis=0).mean(axis=1).sum(axis=(1, 2))
    values = get_strategy("suggestive").summarize(batch)["value"]
    np.testing.assert_allclose(values, expected, rtol=1e-4)


def test_bootstrap_indices_resample_with_replacement_deterministically():
    sets = bootstrap_indices(10, 4, seed=3)
    assert len(sets) == 4 and all(s.shape == (10,) and s.min() >= 0 and s.max() < 10 for s in sets)
    assert any(len(np.unique(s)) < 10 for s in sets)  # with replacement
    assert all(np.array_equal(a, b) for a, b in zip(sets, bootstrap_indices(10, 4, seed=3), strict=True))
    with pytest.raises(ValueError, match=">= 2 members"):
        bootstrap_indices(10, 1)
    with pytest.raises(ValueError, match="at least one labelled"):
        bootstrap_indices(0, 4)


# ---------------------------------------------------------------- effort-aware
def test_boundary_length_matches_the_training_metric():
    rng = np.random.default_rng(0)
    masks = (rng.random((5, 9, 11)) > 0.6).astype(np.int64)
    masks[0] = 0
    masks[1] = -1  # IGNORE counts as background
    masks[2, :, :] = 0
    masks[2, 2:5, 3:6] = 1  # 3x3 square: 12 edges
    expected = [boundary_length(m) for m in masks]
    np.testing.assert_array_equal(boundary_lengths(masks), expected)
    assert annotation_effort(masks[2]) == 12.0
    assert [annotation_effort(m) for m in masks] == expected
    with pytest.raises(ValueError, match="2-D"):
        annotation_effort(masks)


def test_effort_aware_divides_gain_by_boundary_length_with_a_floor():
    size = 16
    p = np.full((3, size, size), 0.02, np.float32)
    p[0, 4:8, 4:8] = 0.6  # one small uncertain object: boundary 16 (floored to 8 -> 16)
    p[1, 2:14, 2:14] = 0.6  # the same uncertainty per object pixel, but a 12x12 object: boundary 48
    p[2] = 0.001  # empty, confident
    batch = PoolBatch(probs=binary_probs(p))
    strategy = get_strategy("effort_aware")
    summary = strategy.summarize(batch)
    np.testing.assert_array_equal(summary["effort"], [16.0, 48.0, 8.0])  # floor (H + W) / 4 = 8
    np.testing.assert_allclose(summary["value"], summary["gain"] / summary["effort"])
    assert summary["value"][2] < summary["value"][0]
    floored = get_strategy("effort_aware", effort_floor=100.0).summarize(batch)
    np.testing.assert_array_equal(floored["effort"], [100.0, 100.0, 100.0])
    dice = get_strategy("effort_aware", gain="dice").summarize(batch)
    np.testing.assert_allclose(dice["gain"], 1 - soft_dice(batch.probs))
    assert dice["gain"][2] == pytest.approx(0.0, abs=1e-3)  # confidently empty: no room for improvement
    assert 0 < dice["gain"][0] < 1


def test_soft_dice_is_one_for_confident_correct_masks():
    p = np.zeros((1, 8, 8), np.float32)
    p[0, 2:6, 2:6] = 1.0
    assert soft_dice(binary_probs(p))[0] == pytest.approx(1.0)
    p[0, 2:6, 2:6] = 0.6
    p[0, 0, :] = 0.3  # 8 uncertain background pixels: expected false negatives 8 * 0.3
    p[0, 7, :] = 0.01  # below the floor: certain background
    tp, fp, fn = 0.6 * 16, 0.4 * 16, 0.3 * 8
    assert soft_dice(binary_probs(p))[0] == pytest.approx((2 * tp + 1) / (2 * tp + fp + fn + 1), rel=1e-5)
    assert soft_dice(binary_probs(np.full((1, 256, 256), 1e-3, np.float32)))[0] == 1.0


def test_effort_aware_rejects_bad_parameters():
    with pytest.raises(ValueError, match="gain must be one of"):
        get_strategy("effort_aware", gain="iou")
    with pytest.raises(ValueError, match="effort_floor"):
        get_strategy("effort_aware", effort_floor=0)


# ---------------------------------------------------------------- hybrid / random / helpers
def test_hybrid_keeps_uncertain_candidates_and_diversifies_among_them():
    # tiles 0-3 are the 4 most uncertain; 0-2 share one embedding, 3 is elsewhere; 4-7 are certain
    ps = [0.5, 0.49, 0.48, 0.45, 0.01, 0.02, 0.03, 0.04]
    pool = constant_pool(ps)
    emb = np.array([[0, 0], [0, 0.01], [0.01, 0], [5, 5], [9, 9], [9, 8], [8, 9], [-9, 9]], np.float32)
    pool.embeddings = emb
    for diversity in ("coreset", "maxcover"):
        strategy = get_strategy("hybrid", diversity=diversity, candidates_factor=2)
        order = strategy.select(strategy.summarize(pool), 2).order.tolist()
        assert set(order) <= {0, 1, 2, 3}, diversity
        assert 3 in order, diversity  # the distinct uncertain tile, not a second near-duplicate
    coreset = get_strategy("hybrid", candidates_factor=2)
    order = coreset.select(coreset.summarize(pool), 2, labelled_embeddings=emb[3:4]).order.tolist()
    assert 3 not in order  # a labelled tile sits on it


def test_hybrid_bald_needs_mc_passes_and_rejects_unknown_parts():
    assert get_strategy("hybrid", uncertainty="bald").needs == {"mc_probs", "embeddings"}
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        get_strategy("hybrid", uncertainty="kmeans")
    with pytest.raises(ValueError, match="diversity must be one of"):
        get_strategy("hybrid", diversity="random")
    with pytest.raises(ValueError, match="candidates_factor"):
        get_strategy("suggestive", candidates_factor=0.5)


def test_random_depends_on_the_seed_only():
    strategy = get_strategy("random")
    summary = strategy.summarize(make_batch(n=50))
    a = strategy.select(summary, 10, seed=1).order
    assert np.array_equal(a, strategy.select(summary, 10, seed=1).order)
    assert not np.array_equal(a, strategy.select(summary, 10, seed=2).order)


def test_top_k_breaks_ties_by_index_and_batch_values_follow_the_order():
    values = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    assert top_k(values, 2).tolist() == [1, 2]
    assert top_k(values, 5).tolist() == [1, 2, 4, 3, 0]
    v = batch_values(5, np.array([3, 0]), secondary=np.array([5.0, 1.0, 2.0, 0.0, 4.0]))
    assert np.argsort(-v, kind="stable").tolist()[:2] == [3, 0]
    assert v[[1, 2, 4]].max() <= 0.5 < v[[3, 0]].min()


@pytest.mark.parametrize("c", [2, 3, 4])
def test_class_loops_match_numpy_reductions_including_ties(c):
    rng = np.random.default_rng(c)
    p = np.round(rng.random((3, c, 5, 6)), 1).astype(np.float32)  # rounding creates ties
    p[0, :, 0, 0] = 0.5
    np.testing.assert_array_equal(hard_labels(p), p.argmax(axis=1))
    np.testing.assert_array_equal(class_max(p), p.max(axis=1))
    top2 = np.sort(p, axis=1)[:, -2:]
    margin = get_strategy("margin", aggregation="mean").summarize(PoolBatch(probs=p))["value"]
    np.testing.assert_allclose(margin, (1 - (top2[:, 1] - top2[:, 0])).mean(axis=(1, 2)), rtol=1e-6)


def test_non_integer_k_is_rejected():
    strategy = get_strategy("entropy")
    summary = strategy.summarize(make_batch())
    with pytest.raises(ValueError, match="k must be an integer"):
        strategy.select(summary, 2.5)
