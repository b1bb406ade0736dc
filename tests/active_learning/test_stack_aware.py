"""StackAware selector: a batch from a pool of near-duplicates across z holds at most one tile of each group,
through the benchmark's TopK and the product's QueueOrder alike (hand-built pools, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.active_learning.selection import QueueOrder, StackAware, TopK
from ml_backend.inference.scoring import PoolScores
from ml_backend.strategies import get_strategy
from ml_backend.strategies.batch import BatchConfig, Neighbourhood

TILE = 64


def _pool(groups: int = 6, per_group: int = 5, seed: int = 0):
    """``groups`` xy positions of one stack, each seen on ``per_group`` consecutive slices (near-duplicates); the most
    uncertain tiles are all in group 0, so plain top-k would take group 0 several times."""
    rng = np.random.default_rng(seed)
    rows, group, value, emb = [], [], [], []
    for g in range(groups):
        centre = rng.normal(size=8) * 10
        for dz in range(per_group):
            rows.append([0, 10 + dz, (g // 3) * 2 * TILE, (g % 3) * 2 * TILE, TILE])
            group.append(g)
            value.append(0.6 - g * 0.05 - dz * 0.001)  # group 0 first, then 1, ...
            emb.append(centre + rng.normal(size=8) * 0.01)  # a group is one point in feature space too
    ids = [1000 + i for i in range(len(rows))]
    pos = dict(zip(ids, rows, strict=True))
    summary = {"value": np.asarray(value), "embedding": np.asarray(emb)}
    scores = PoolScores(summary, np.full(len(ids), TILE * TILE))
    return ids, pos, np.asarray(group), scores


def _groups_of(picked, ids, group):
    index = {t: i for i, t in enumerate(ids)}
    return [int(group[index[t]]) for t in picked]


@pytest.mark.parametrize("method", ["top", "weighted_kmeans", "auto", "stochastic"])
@pytest.mark.parametrize("embeddings", [True, False])
def test_topk_batch_has_one_tile_per_group(method, embeddings):
    ids, pos, group, scores = _pool()
    if not embeddings:
        del scores.summary["embedding"]
    k = 6
    cfg = BatchConfig(neighbourhood=Neighbourhood(z_radius=5), method=method)
    sel = StackAware(TopK(k), lambda xs: np.asarray([pos[t] for t in xs]), k=k, config=cfg)
    plain = TopK(k)(get_strategy("entropy"), ids, scores, labelled_embeddings=None, seed=0)
    assert len(set(_groups_of(plain.picked, ids, group))) < k  # the hand-built case does trap plain top-k
    r = sel(get_strategy("entropy"), ids, scores, labelled_embeddings=None, seed=0)
    gs = _groups_of(r.picked, ids, group)
    assert len(r.picked) == k and sorted(gs) == list(range(6))
    if method == "top":
        assert gs == [0, 1, 2, 3, 4, 5]  # the score order survives, duplicates removed


def test_queue_order_head_has_one_tile_per_group_and_keeps_score_values():
    ids, pos, group, scores = _pool()
    k = 6
    strategy = get_strategy("entropy", aggregation="mean")
    inner = QueueOrder(num_classes=2)
    sel = StackAware(inner, lambda xs: np.asarray([pos[t] for t in xs]), k=k, config=BatchConfig(method="top"))
    base = inner(strategy, ids, scores, labelled_embeddings=None, seed=0)
    r = sel(strategy, ids, scores, labelled_embeddings=None, seed=0)
    assert len(set(_groups_of(base.picked[:k], ids, group))) < k
    served = [ids[i] for i in np.argsort(r.scores, kind="stable")]  # what Label Studio serves: lowest score first
    assert served[:k] == r.picked[:k]
    assert sorted(_groups_of(served[:k], ids, group)) == list(range(6))
    assert np.all(np.diff(np.sort(r.scores)[: k + 1]) > 0)  # no ties through the batch
    assert np.allclose(np.sort(r.scores), np.sort(base.scores), atol=1e-9)
    assert sorted(r.picked) == sorted(ids)


def test_labelled_neighbours_are_skipped_and_other_stacks_do_not_exclude():
    ids, pos, group, scores = _pool(groups=2, per_group=3)
    # Same xy as group 0 but another stack: not a near-duplicate.
    labelled = np.asarray([[0, 11, 0, 0, TILE]])  # next to group 0 (slices 10-12)
    sel = StackAware(
        TopK(2),
        lambda xs: np.asarray([pos[t] for t in xs]),
        k=2,
        config=BatchConfig(neighbourhood=Neighbourhood(z_radius=2), method="top", feature_radius=0.0),
        labelled_positions=lambda: labelled,
    )
    r = sel(get_strategy("entropy"), ids, scores, labelled_embeddings=None, seed=0)
    gs = _groups_of(r.picked, ids, group)
    assert gs[0] == 1  # group 0 sits next to a labelled tile: skipped while another tile is allowed
    moved = {t: [1, *row[1:]] if group[i] == 0 else row for i, (t, row) in enumerate(pos.items())}
    sel2 = StackAware(
        TopK(2),
        lambda xs: np.asarray([moved[t] for t in xs]),
        k=2,
        config=BatchConfig(neighbourhood=Neighbourhood(z_radius=2), method="top", feature_radius=0.0),
        labelled_positions=lambda: labelled,
    )
    r2 = sel2(get_strategy("entropy"), ids, scores, labelled_embeddings=None, seed=0)
    assert _groups_of(r2.picked, ids, group) == [0, 1]


def test_queue_with_tied_scores_still_serves_the_batch_first():
    ids, pos, group, scores = _pool()
    scores.summary["value"][:] = 5.0  # above entropy's maximum: every queue score clips to 0
    sel = StackAware(QueueOrder(2), lambda xs: np.asarray([pos[t] for t in xs]), k=6, config=BatchConfig(method="top"))
    r = sel(get_strategy("entropy", aggregation="mean"), ids, scores, labelled_embeddings=None, seed=0)
    served = [ids[i] for i in np.argsort(r.scores, kind="stable")]
    assert served[:6] == r.picked[:6] and len(np.unique(r.scores)) == len(ids)
    assert sorted(_groups_of(served[:6], ids, group)) == list(range(6))


def test_small_pool_still_gives_k_tiles():
    ids, pos, group, scores = _pool(groups=1, per_group=4)
    sel = StackAware(TopK(3), lambda xs: np.asarray([pos[t] for t in xs]), k=3, config=BatchConfig(method="top"))
    r = sel(get_strategy("random"), ids, scores, labelled_embeddings=None, seed=0)
    assert len(r.picked) == 3 and len(set(r.picked)) == 3
