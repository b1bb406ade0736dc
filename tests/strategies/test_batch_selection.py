"""Stack-aware batch selection: near-duplicate groups across z, stacks, feature radius, budget switch, coverage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ml_backend.strategies.batch import (
    BatchConfig,
    LabelledTiles,
    Neighbourhood,
    StackPositions,
    coverage_order,
    is_low_budget,
    select_batch,
    stack_conflicts,
    typicality,
)

METHODS = ("typiclust", "weighted_kmeans", "top", "auto", "stochastic")


def _groups(n_groups: int, per_group: int, *, stack: int = 0, seed: int = 0, spread: float = 0.01):
    """n_groups tiles positions x per_group consecutive slices at the same xy, near-identical embeddings."""
    rng = np.random.default_rng(seed)
    pos, emb, group = [], [], []
    for g in range(n_groups):
        centre = rng.normal(size=6) * 5
        for z in range(per_group):
            pos.append([stack, z, (g % 4) * 64, (g // 4) * 64, 64])
            emb.append(centre + spread * rng.normal(size=6))
            group.append(g)
    return np.array(pos), np.array(emb), np.array(group)


@pytest.mark.parametrize("method", METHODS)
def test_at_most_one_pick_per_near_duplicate_group(method):
    pos, emb, group = _groups(8, 4)
    # The most informative tiles are all in group 0: ranking alone would take its 4 slices.
    scores = np.where(group == 0, 10.0, 1.0) + np.random.default_rng(1).random(len(group)) * 0.1
    sel = select_batch(scores, emb, pos, 8, config=BatchConfig(method=method), seed=0)
    assert len(sel.order) == 8
    assert sorted(group[sel.order].tolist()) == list(range(8))
    assert sel.relaxed == 0


def test_without_the_rules_ranking_takes_near_duplicates():
    """Control: the same pool with both rules off gives group 0's slices (what the rules prevent)."""
    pos, emb, group = _groups(8, 4)
    scores = np.where(group == 0, 10.0, 1.0)
    off = BatchConfig(method="top", neighbourhood=Neighbourhood(z_radius=-1), feature_radius=0.0)
    assert group[select_batch(scores, emb, pos, 4, config=off).order].tolist() == [0, 0, 0, 0]


def test_top_keeps_the_score_ranking_between_groups():
    pos, emb, group = _groups(6, 3)
    scores = -group.astype(float)  # group 0 best, then 1, ...
    sel = select_batch(scores, emb, pos, 3, config=BatchConfig(method="top"))
    assert group[sel.order].tolist() == [0, 1, 2]


def test_stack_rule_alone_excludes_neighbouring_slices():
    """Different embeddings (feature rule silent): the z radius decides. Tiles 4 slices apart are allowed."""
    pos = np.array([[0, z, 0, 0, 64] for z in range(8)])
    emb = np.eye(8) * 100
    cfg = BatchConfig(method="top", neighbourhood=Neighbourhood(z_radius=3), feature_radius=0.0)
    sel = select_batch(np.arange(8, 0, -1, dtype=float), emb, pos, 2, config=cfg)
    assert sel.order.tolist() == [0, 4]
    # Shifted by half a tile in x: still overlapping, still excluded; a full tile away: allowed.
    pos2 = np.array([[0, 0, 0, 0, 64], [0, 1, 0, 32, 64], [0, 1, 0, 64, 64]])
    sel = select_batch(np.array([3.0, 2.0, 1.0]), np.eye(3) * 100, pos2, 2, config=cfg)
    assert sel.order.tolist() == [0, 2]
    # xy_margin makes touching tiles neighbours.
    cfg_m = BatchConfig(method="top", neighbourhood=Neighbourhood(z_radius=3, xy_margin=8), feature_radius=0.0)
    sel = select_batch(np.array([3.0, 2.0, 1.0]), np.eye(3) * 100, pos2, 1, config=cfg_m)
    assert sel.order.tolist() == [0]
    nb = Neighbourhood(z_radius=3, xy_margin=8)
    assert stack_conflicts(StackPositions.from_array(pos2), 0, StackPositions.from_array(pos2), nb).tolist() == [
        True, True, True,
    ]  # fmt: skip


def test_different_stacks_never_exclude_each_other():
    pos_a, emb_a, _ = _groups(1, 3, stack=0, seed=0)
    pos_b = pos_a.copy()
    pos_b[:, 0] = 1  # same z, same xy, another stack
    pos = np.concatenate([pos_a, pos_b])
    emb = np.eye(6) * 100  # far apart in features
    cfg = BatchConfig(method="top", feature_radius=0.0)
    sel = select_batch(np.array([6.0, 5, 4, 3, 2, 1]), emb, pos, 2, config=cfg)
    assert sel.order.tolist() == [0, 3]
    assert sel.relaxed == 0


def test_labelled_tiles_block_their_neighbours():
    pos, emb, group = _groups(4, 3)
    labelled = np.flatnonzero(group == 0)
    rest = np.flatnonzero(group != 0)
    sel = select_batch(
        np.ones(len(rest)), emb[rest], pos[rest], 3, labelled=LabelledTiles(emb[labelled], pos[labelled]),
        config=BatchConfig(method="weighted_kmeans"),
    )  # fmt: skip
    assert sorted(group[rest][sel.order].tolist()) == [1, 2, 3]
    # A pool tile on the labelled tile's xy, 2 slices away, is skipped while others remain.
    extra_pos = np.array([[0, 5, 0, 0, 64], [0, 5, 64, 64, 64]])
    sel = select_batch(
        np.array([10.0, 1.0]), np.eye(2) * 100, extra_pos, 1,
        labelled=LabelledTiles(np.zeros((1, 2)), np.array([[0, 3, 0, 0, 64]])),
        config=BatchConfig(method="top"),
    )  # fmt: skip
    assert sel.order.tolist() == [1]


def test_feature_radius_excludes_near_identical_embeddings_across_stacks():
    """Two stacks holding the same image content: the feature rule stops the second copy."""
    pos = np.array([[0, 0, 0, 0, 64], [1, 0, 0, 0, 64], [2, 0, 0, 0, 64]])
    emb = np.array([[0.0, 0.0], [1e-4, 0.0], [10.0, 10.0]])
    sel = select_batch(np.array([3.0, 2.0, 1.0]), emb, pos, 2, config=BatchConfig(method="top", feature_radius=0.05))
    assert sel.order.tolist() == [0, 2]
    sel = select_batch(np.array([3.0, 2.0, 1.0]), emb, pos, 2, config=BatchConfig(method="top", feature_radius=0.0))
    assert sel.order.tolist() == [0, 1]


@pytest.mark.parametrize("method", METHODS)
def test_k_larger_than_pool_returns_everything_once(method):
    pos, emb, _ = _groups(2, 3)
    sel = select_batch(np.ones(6), emb, pos, 50, config=BatchConfig(method=method))
    assert sorted(sel.order.tolist()) == list(range(6))
    assert sel.relaxed > 0  # the rules had to relax to fill the batch
    assert select_batch(np.ones(6), emb, pos, 0).order.size == 0


@pytest.mark.parametrize("method", METHODS)
def test_degenerate_embeddings_and_tied_scores(method):
    n = 12
    pos = np.array([[0, z, 0, 0, 64] for z in range(n)])
    emb = np.zeros((n, 4))
    a = select_batch(np.zeros(n), emb, pos, 3, config=BatchConfig(method=method), seed=3)
    b = select_batch(np.zeros(n), emb, pos, 3, config=BatchConfig(method=method), seed=3)
    assert a.order.tolist() == b.order.tolist()
    assert len(set(a.order.tolist())) == 3
    zs = np.sort(pos[a.order, 1])
    if method == "stochastic" and a.relaxed:  # a random first draw in the middle can leave no room for 3
        return
    assert np.all(np.diff(zs) > 3)  # the stack rule still holds when features say nothing


def test_budget_switch():
    cfg = BatchConfig()
    assert is_low_budget(20, 420, 20, cfg) and not is_low_budget(40, 420, 20, cfg)
    assert is_low_budget(100, 4000, 20, cfg)  # 5% of a large pool
    assert not is_low_budget(5, 100, 20, BatchConfig(low_budget_labels=5))
    pos, emb, _ = _groups(6, 2)
    low = select_batch(np.ones(12), emb, pos, 3, labelled=LabelledTiles(count=0))
    high = select_batch(np.ones(12), emb, pos, 3, labelled=LabelledTiles(count=1000))
    assert (low.regime, high.regime) == ("low_budget", "high_budget")


def test_typiclust_prefers_dense_regions_and_uncovered_clusters():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(30, 2)) * 0.1  # a typical mode
    outliers = rng.normal(size=(5, 2)) * 0.1 + np.array([[8.0, 8.0]])
    emb = np.concatenate([dense, outliers, np.array([[4.0, -4.0]])])  # plus one isolated tile
    n = len(emb)
    cfg = BatchConfig(method="typiclust", feature_radius=0.0)
    sel = select_batch(rng.random(n), emb, None, 1, config=cfg)
    assert sel.order[0] < 30  # the largest cluster's most typical tile
    t = typicality(dense)
    assert sel.order[0] == int(np.argmax(t))
    # With the dense mode already labelled, the next pick covers another cluster.
    sel = select_batch(rng.random(n), emb, None, 1, labelled=LabelledTiles(dense[:3]), config=cfg)
    assert sel.order[0] >= 30


def test_coverage_order_is_a_full_permutation_that_spreads_first():
    pos, emb, group = _groups(10, 4)
    order = coverage_order(emb, pos, 5, seed=0)
    assert sorted(order.tolist()) == list(range(40))
    assert len(set(group[order[:10]].tolist())) == 10  # the first 10 cover all 10 groups
    np.testing.assert_array_equal(order, coverage_order(emb, pos, 5, seed=0))
    assert coverage_order(np.zeros((0, 3)), None, 5).size == 0
    assert sorted(coverage_order(np.zeros((4, 3)), None, 10).tolist()) == [0, 1, 2, 3]


def test_input_validation():
    pos, emb, _ = _groups(2, 2)
    with pytest.raises(ValueError, match="embeddings"):
        select_batch(np.ones(4), emb[:3], pos, 2)
    with pytest.raises(ValueError, match="positions"):
        select_batch(np.ones(4), emb, pos[:, :3], 2)
    with pytest.raises(ValueError, match="NaN"):
        select_batch(np.array([1.0, np.nan, 1, 1]), emb, pos, 2)
    with pytest.raises(ValueError, match="method"):
        BatchConfig(method="best")


@st.composite
def pools(draw):
    n = draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    pos = np.column_stack(
        [rng.integers(0, 2, n), rng.integers(0, 6, n), rng.integers(0, 3, n) * 32, rng.integers(0, 3, n) * 32,
         np.full(n, 32)]
    )  # fmt: skip
    emb = rng.normal(size=(n, 3))
    if draw(st.booleans()):
        emb[:] = emb[0]  # degenerate embeddings
    scores = rng.integers(0, 3, n).astype(float) if draw(st.booleans()) else rng.random(n)  # ties or not
    return scores, emb, pos


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pool=pools(), k=st.integers(0, 40), seed=st.integers(0, 50), method=st.sampled_from(METHODS))
def test_properties(pool, k, seed, method):
    scores, emb, pos = pool
    n = len(scores)
    cfg = BatchConfig(method=method)
    a = select_batch(scores, emb, pos, k, config=cfg, seed=seed)
    b = select_batch(scores, emb, pos, k, config=cfg, seed=seed)
    assert len(a.order) == min(k, n)
    assert len(set(a.order.tolist())) == len(a.order)
    assert all(0 <= i < n for i in a.order)
    assert a.order.tolist() == b.order.tolist()
    # While the rules were not relaxed, no two picks are stack neighbours.
    if a.relaxed == 0:
        sp = StackPositions.from_array(pos)
        picked = sp.take(a.order)
        for j in range(len(a.order)):
            hits = stack_conflicts(picked, j, picked, cfg.neighbourhood)
            assert hits.sum() == 1  # only itself
    order = coverage_order(emb, pos, k, seed=seed)
    assert sorted(order.tolist()) == list(range(n))
    assert order.tolist() == coverage_order(emb, pos, k, seed=seed).tolist()


@pytest.mark.parametrize("method", ["kcenter", "random"])
def test_coverage_order_methods_respect_the_rules(method):
    pos, emb, group = _groups(10, 4)
    order = coverage_order(emb, pos, 5, seed=2, method=method)
    assert sorted(order.tolist()) == list(range(40))
    assert len(set(group[order[:10]].tolist())) == 10
    np.testing.assert_array_equal(order, coverage_order(emb, pos, 5, seed=2, method=method))
    with pytest.raises(ValueError, match="coverage method"):
        coverage_order(emb, pos, 5, method="hash")
