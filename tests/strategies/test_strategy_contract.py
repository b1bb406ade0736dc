"""One contract every registered strategy must pass (as segmentation_models_pytorch tests every encoder)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from strategy_helpers import make_batch

from ml_backend.strategies import PoolBatch, Selection, available_strategies, get_strategy

EXPECTED = {
    "random",
    "entropy",
    "least_confidence",
    "margin",
    "bald",
    "kmeans",
    "coreset",
    "suggestive",
    "effort_aware",
    "hybrid",
}


@pytest.fixture(params=[2, 3], ids=["C2", "C3"])
def full_batch(request) -> PoolBatch:
    """A small pool with every PoolBatch field filled, for 2 and 3 classes."""
    return make_batch(c=request.param)


def test_all_ten_strategies_are_registered():
    assert set(available_strategies()) == EXPECTED


def test_unknown_strategy_and_bad_parameters_are_clear_errors():
    with pytest.raises(ValueError, match="unknown strategy 'nope'.*entropy"):
        get_strategy("nope")
    with pytest.raises(ValueError, match="bad parameters for strategy 'entropy'"):
        get_strategy("entropy", no_such_param=1)
    with pytest.raises(ValueError, match="aggregation"):
        get_strategy("entropy", aggregation="max")


@pytest.mark.parametrize("name", sorted(EXPECTED))
class TestStrategyContract:
    def test_summarize_then_select(self, name, full_batch):
        strategy = get_strategy(name)
        summary = strategy.summarize(full_batch)
        assert all(arr.shape[0] == full_batch.n for arr in summary.values())
        selection = strategy.select(summary, 4, labelled_embeddings=full_batch.embeddings[:2], seed=3)
        assert isinstance(selection, Selection)
        assert selection.values.shape == (full_batch.n,)
        assert selection.values.dtype == np.float64
        assert np.all(np.isfinite(selection.values))
        assert selection.order.shape == (4,)
        assert selection.order.dtype == np.int64
        assert len(set(selection.order.tolist())) == 4
        assert selection.order.min() >= 0 and selection.order.max() < full_batch.n

    def test_values_rank_the_selection(self, name, full_batch):
        strategy = get_strategy(name)
        selection = strategy.select(strategy.summarize(full_batch), 5, seed=1)
        chosen = selection.values[selection.order]
        assert np.all(np.diff(chosen) <= 0), "values must not increase along the selection order"
        rest = np.setdiff1d(np.arange(full_batch.n), selection.order)
        assert chosen.min() >= selection.values[rest].max(), "a selected tile must not be worth less than the rest"

    def test_deterministic_for_a_seed(self, name, full_batch):
        a = get_strategy(name)
        b = get_strategy(name)
        sel_a = a.select(a.summarize(full_batch), 5, seed=7)
        sel_b = b.select(b.summarize(full_batch), 5, seed=7)
        np.testing.assert_array_equal(sel_a.order, sel_b.order)
        np.testing.assert_array_equal(sel_a.values, sel_b.values)

    def test_summaries_of_chunks_concatenate(self, name, full_batch):
        """score_pool summarises chunk by chunk; the result must equal summarising the whole pool at once."""
        strategy = get_strategy(name)
        whole = strategy.summarize(full_batch)
        parts = [strategy.summarize(_slice(full_batch, sl)) for sl in (slice(0, 5), slice(5, None))]
        for key, arr in whole.items():
            np.testing.assert_allclose(np.concatenate([p[key] for p in parts]), arr, rtol=1e-6)

    def test_k_larger_than_pool_returns_whole_pool(self, name, full_batch):
        strategy = get_strategy(name)
        selection = strategy.select(strategy.summarize(full_batch), full_batch.n + 10)
        assert sorted(selection.order.tolist()) == list(range(full_batch.n))

    def test_single_tile_pool(self, name):
        strategy = get_strategy(name)
        selection = strategy.select(strategy.summarize(make_batch(n=1)), 3)
        assert selection.order.tolist() == [0]

    @pytest.mark.parametrize("k", [0, -1])
    def test_non_positive_k_is_rejected(self, name, full_batch, k):
        strategy = get_strategy(name)
        summary = strategy.summarize(full_batch)
        with pytest.raises(ValueError, match="k must be positive"):
            strategy.select(summary, k)

    def test_empty_pool_is_rejected(self, name, full_batch):
        strategy = get_strategy(name)
        empty = _slice(full_batch, slice(0, 0))
        with pytest.raises(ValueError, match="empty pool"):
            strategy.summarize(empty)
        summary = strategy.summarize(full_batch)
        with pytest.raises(ValueError, match="empty pool"):
            strategy.select({key: arr[:0] for key, arr in summary.items()}, 3)

    def test_mismatched_shapes_are_rejected(self, name, full_batch):
        strategy = get_strategy(name)
        bad_batches = {
            "probs 3-D": dataclasses.replace(full_batch, probs=full_batch.probs[:, 0]),
            "one class": dataclasses.replace(full_batch, probs=full_batch.probs[:, :1]),
            "mc tiles": dataclasses.replace(full_batch, mc_probs=full_batch.mc_probs[:, 1:]),
            "embedding rows": dataclasses.replace(full_batch, embeddings=full_batch.embeddings[1:]),
            "ensemble size": dataclasses.replace(full_batch, ensemble_probs=full_batch.ensemble_probs[..., 1:]),
        }
        for label, batch in bad_batches.items():
            with pytest.raises(ValueError):
                strategy.summarize(batch)
                pytest.fail(f"{name} accepted a batch with bad {label}")
        summary = strategy.summarize(full_batch)
        with pytest.raises(ValueError, match="mismatched tile counts"):
            strategy.select({**summary, "effort_or_other": np.zeros(full_batch.n + 1)}, 2)
        if "embedding" in summary:
            with pytest.raises(ValueError, match="labelled_embeddings have D="):
                strategy.select(summary, 2, labelled_embeddings=np.zeros((2, summary["embedding"].shape[1] + 1)))

    def test_missing_required_input_is_named(self, name, full_batch):
        strategy = get_strategy(name)
        for field in sorted(strategy.needs):
            with pytest.raises(ValueError, match=field):
                strategy.summarize(dataclasses.replace(full_batch, **{field: None}))


def _slice(batch: PoolBatch, sl: slice) -> PoolBatch:
    return PoolBatch(
        probs=batch.probs[sl],
        mc_probs=batch.mc_probs[:, sl],
        embeddings=batch.embeddings[sl],
        ensemble_probs=batch.ensemble_probs[:, sl],
    )
