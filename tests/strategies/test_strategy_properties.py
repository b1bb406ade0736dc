"""Property-based invariants (hypothesis): finite scores, no duplicate picks, order consistent with values."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from strategy_helpers import softmax

from ml_backend.strategies import PoolBatch, Selection, available_strategies, get_strategy, queue_scores

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def pools(draw):
    """Random pools: sizes, class counts, and probabilities ranging from uniform to (almost) one-hot."""
    n = draw(st.integers(1, 9))
    c = draw(st.integers(2, 4))
    h = draw(st.integers(1, 5))
    w = draw(st.integers(1, 5))
    scale = draw(st.sampled_from([0.0, 1.0, 50.0]))  # 0: all uniform (ties), 50: saturated softmax (p = 0, 1)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(n, c, h, w))
    dup = draw(st.booleans())
    emb = rng.normal(size=(n, 3))
    if dup:  # duplicated embeddings stress the diversity strategies
        emb[:] = emb[0]
    return PoolBatch(
        probs=softmax(logits, axis=1),
        mc_probs=softmax(logits[None] + rng.normal(scale=scale, size=(2, n, c, h, w)), axis=2),
        embeddings=emb.astype(np.float32),
        ensemble_probs=softmax(logits[None] + rng.normal(scale=scale, size=(3, n, c, h, w)), axis=2),
    )


@SETTINGS
@given(pool=pools(), name=st.sampled_from(available_strategies()), k=st.integers(1, 12), seed=st.integers(0, 99))
def test_selection_invariants(pool, name, k, seed):
    strategy = get_strategy(name)
    summary = strategy.summarize(pool)
    for arr in summary.values():
        assert np.all(np.isfinite(arr))
    selection = strategy.select(summary, k, labelled_embeddings=pool.embeddings[:1], seed=seed)
    assert np.all(np.isfinite(selection.values))
    assert selection.order.shape == (min(k, pool.n),)
    assert len(np.unique(selection.order)) == selection.order.size
    chosen = selection.values[selection.order]
    assert np.all(np.diff(chosen) <= 0)
    rest = np.setdiff1d(np.arange(pool.n), selection.order)
    if rest.size:
        assert chosen.min() >= selection.values[rest].max()
    scores = queue_scores(selection, pool.n)
    assert np.all((scores >= 0) & (scores < 1))
    assert np.all(scores[selection.order] < np.delete(scores, selection.order).min(initial=1.0))


@SETTINGS
@given(pool=pools(), name=st.sampled_from(["entropy", "least_confidence", "margin", "bald", "effort_aware"]))
def test_ranked_strategies_select_the_highest_values(pool, name):
    """For value-ranked strategies the order is exactly the descending sort of the values (ties: lower index)."""
    strategy = get_strategy(name)
    selection = strategy.select(strategy.summarize(pool), pool.n)
    assert selection.order.tolist() == np.argsort(-selection.values, kind="stable").tolist()
    assert np.all(selection.values >= 0)


@SETTINGS
@given(values=arrays(np.float64, st.integers(1, 30), elements=st.floats(-1e6, 1e6)), k=st.integers(1, 40))
def test_queue_scores_are_a_permutation_of_ranks(values, k):
    order = np.argsort(-values, kind="stable")[:k]
    scores = queue_scores(Selection(values=values, order=order), values.size)
    assert sorted(scores.tolist()) == [i / values.size for i in range(values.size)]
    assert np.all(np.diff(values[np.argsort(scores)]) <= 0)
