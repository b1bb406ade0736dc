"""Issue 17's hedges in ``select_batch``: a seeded random share of each batch and the budget switch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ml_backend.active_learning.plan import batch_config
from ml_backend.config import Settings
from ml_backend.strategies.batch import BatchConfig, LabelledTiles, hedged_share, interleave, select_batch


def _pool(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.random(n)
    emb = rng.normal(size=(n, 4))
    # Every tile on its own slice far apart in z: the stack rule excludes nothing unless a test places tiles.
    pos = np.column_stack([np.zeros(n, int), np.arange(n) * 10, np.zeros(n, int), np.zeros(n, int), np.full(n, 64)])
    return scores, emb, pos


def test_no_hedge_is_the_plain_ranking():
    s, x, pos = _pool(100)
    b = select_batch(
        s, x, pos, 10, config=BatchConfig(method="top", feature_radius=0.0), labelled=LabelledTiles(count=100)
    )
    assert b.random_picks == 0
    assert list(b.order) == list(np.argsort(-s, kind="stable")[:10])


def test_half_the_batch_is_random_and_half_the_top_interleaved():
    s, x, pos = _pool(200)
    cfg = BatchConfig(method="top", feature_radius=0.0, random_share=0.5)
    b = select_batch(s, x, pos, 10, config=cfg, labelled=LabelledTiles(count=100), seed=3)
    top = set(np.argsort(-s, kind="stable")[:5].tolist())
    order = [int(i) for i in b.order]
    assert b.random_picks == 5 and len(set(order)) == 10
    assert top <= set(order)  # the strategy's 5 best are all there
    assert [i in top for i in order] == [True, False] * 5  # interleaved: a partly labelled batch holds both kinds
    rest = [i for i in order if i not in top]
    assert np.mean(s[rest]) < np.mean(s[list(top)])  # the random half is not the next-best tiles
    again = select_batch(s, x, pos, 10, config=cfg, labelled=LabelledTiles(count=100), seed=3)
    other = select_batch(s, x, pos, 10, config=cfg, labelled=LabelledTiles(count=100), seed=4)
    assert list(again.order) == order and list(other.order) != order  # seeded


def test_budget_switch_makes_the_whole_batch_random_while_labels_are_few():
    s, x, pos = _pool(300)
    cfg = BatchConfig(method="top", feature_radius=0.0, random_share=0.25, uncertainty_from_labels=60)
    assert hedged_share(59, cfg) == 1.0 and hedged_share(60, cfg) == 0.25
    early = select_batch(s, x, pos, 20, config=cfg, labelled=LabelledTiles(count=40))
    late = select_batch(s, x, pos, 20, config=cfg, labelled=LabelledTiles(count=60))
    assert early.random_picks == 20 and late.random_picks == 5
    top20 = set(np.argsort(-s, kind="stable")[:20].tolist())
    assert len(top20 & set(early.order.tolist())) < 10  # about 20 x 20 / 300 expected by chance, not the top
    assert set(np.argsort(-s, kind="stable")[:15].tolist()) <= set(late.order.tolist())


def test_random_picks_keep_the_stack_rule():
    n = 60  # 20 xy positions x 3 neighbouring slices: the rule allows one tile per position
    s = np.random.default_rng(1).random(n)
    pos = np.column_stack([np.zeros(n, int), np.arange(n) % 3, (np.arange(n) // 3) * 100, np.zeros(n, int),
                           np.full(n, 64)])  # fmt: skip
    cfg = BatchConfig(method="top", feature_radius=0.0, random_share=1.0)
    b = select_batch(s, np.zeros((n, 1)), pos, 15, config=cfg, labelled=LabelledTiles(count=0), seed=0)
    assert b.relaxed == 0 and len({int(pos[i, 2]) for i in b.order}) == 15  # never two slices of one position


def test_settings_reach_the_product_batch_config(monkeypatch):
    monkeypatch.setenv("SELECTION_RANDOM_SHARE", "0.5")
    monkeypatch.setenv("UNCERTAINTY_FROM_LABELS", "60")
    cfg = batch_config(Settings())
    assert (cfg.random_share, cfg.uncertainty_from_labels) == (0.5, 60)
    with pytest.raises(ValueError):
        BatchConfig(random_share=1.5)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 80),
    k=st.integers(0, 30),
    share=st.floats(0, 1),
    switch=st.integers(0, 50),
    n_labelled=st.integers(0, 100),
    method=st.sampled_from(["top", "stochastic", "typiclust", "weighted_kmeans"]),
)
def test_any_hedge_gives_a_full_batch_of_distinct_tiles(n, k, share, switch, n_labelled, method):
    s, x, pos = _pool(n, seed=n)
    cfg = BatchConfig(method=method, random_share=share, uncertainty_from_labels=switch)
    b = select_batch(s, x, pos, k, config=cfg, labelled=LabelledTiles(count=n_labelled))
    m = min(k, n)
    assert len(b.order) == m and len(set(b.order.tolist())) == m
    assert b.random_picks == (int(round(hedged_share(n_labelled, cfg) * m)) if m else 0)


def test_interleave_keeps_both_orders():
    merged = interleave([1, 2, 3], [7, 8])
    assert sorted(merged) == [1, 2, 3, 7, 8]
    assert [t for t in merged if t < 5] == [1, 2, 3] and [t for t in merged if t > 5] == [7, 8]
    assert interleave([], [4, 5]) == [4, 5] and interleave([4, 5], []) == [4, 5]


def test_hedge_settings_are_in_the_readme_table_with_their_defaults():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    defaults = dict(Settings.documented())
    for var in ("SELECTION_RANDOM_SHARE", "UNCERTAINTY_FROM_LABELS"):
        assert f"| `{var}` | `{defaults[var]}` |" in readme, var
