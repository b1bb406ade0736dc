"""score_pool with a tiny real U-Net (engineer A's model): chunking, MC dropout, ensemble, embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.model import build_model
from ml_backend.strategies import PassConfig, PoolBatch, bootstrap_indices, forward_passes, get_strategy, score_pool

torch.set_num_threads(1)


def tiny_unet(seed: int = 0, dropout: float = 0.3):
    torch.manual_seed(seed)
    return build_model("unet", width=4, depth=2, dropout=dropout).eval()


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    return np.random.default_rng(0).random((5, 21, 13)).astype(np.float32)  # not multiples of 2**depth


def test_score_pool_matches_forward_and_embed_and_is_chunk_independent(tiles):
    model = tiny_unet()
    seen: list[tuple[int, PoolBatch]] = []
    summary = score_pool(
        model, tiles, "kmeans", passes=PassConfig(batch_size=2), on_batch=lambda s, b: seen.append((s, b))
    )
    assert [s for s, _ in seen] == [0, 2, 4]
    with torch.no_grad():
        x = torch.from_numpy(tiles).unsqueeze(1)
        probs = torch.softmax(model(x), dim=1).numpy()
        emb = model.embed(x).numpy()
    np.testing.assert_allclose(np.concatenate([b.probs for _, b in seen]), probs, atol=1e-5)
    np.testing.assert_allclose(summary["embedding"], emb, atol=1e-5)
    entropy = score_pool(model, tiles, "entropy", passes=PassConfig(batch_size=5))["value"]
    np.testing.assert_allclose(
        score_pool(model, tiles, "entropy", passes=PassConfig(batch_size=1))["value"], entropy, rtol=1e-5
    )


def test_bald_mc_passes_are_stochastic_but_seeded_and_leave_global_state_alone(tiles):
    model = tiny_unet()
    batches: list[PoolBatch] = []
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = score_pool(
        model,
        tiles,
        "bald",
        passes=PassConfig(batch_size=3, mc_passes=4),
        seed=5,
        on_batch=lambda s, b: batches.append(b),
    )
    assert torch.rand(1) == before, "score_pool must not consume the global torch RNG"
    assert not model.training
    assert batches[0].mc_probs.shape == (4, 3, 2, 21, 13)
    assert not np.allclose(batches[0].mc_probs[0], batches[0].mc_probs[1]), "dropout must be on in the MC passes"
    assert np.all(a["value"] > 0)
    b = score_pool(model, tiles, "bald", passes=PassConfig(batch_size=3, mc_passes=4), seed=5)
    np.testing.assert_array_equal(a["value"], b["value"])
    c = score_pool(model, tiles, "bald", passes=PassConfig(batch_size=3, mc_passes=4), seed=6)
    assert not np.array_equal(a["value"], c["value"])
    without_dropout = score_pool(tiny_unet(dropout=0.0), tiles, "bald", passes=PassConfig(mc_passes=3))
    np.testing.assert_allclose(without_dropout["value"], 0.0, atol=1e-4)  # passes agree: no disagreement


def test_suggestive_with_a_bootstrap_ensemble_and_mode_restored(tiles):
    model = tiny_unet().train()
    members = [tiny_unet(seed=s) for s in (1, 2, 3)]
    summary = score_pool(model, tiles, "suggestive", passes=PassConfig(batch_size=2), ensemble=members)
    assert model.training, "the caller's train/eval mode is restored"
    assert summary["value"].shape == (5,) and np.all(summary["value"] > 0)
    selection = get_strategy("suggestive").select(summary, 2)
    assert len(set(selection.order.tolist())) == 2
    with pytest.raises(ValueError, match="ensemble of >= 2 models"):
        score_pool(model, tiles, "suggestive", ensemble=members[:1])
    assert len(bootstrap_indices(8, 3)) == 3


def test_score_pool_rejects_bad_input(tiles):
    model = tiny_unet()
    with pytest.raises(ValueError, match="empty pool"):
        score_pool(model, tiles[:0], "entropy")
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        score_pool(model, tiles[0], "entropy")
    with pytest.raises(ValueError, match="mc_passes"):
        score_pool(model, tiles, "bald", passes=PassConfig(mc_passes=0))
    with pytest.raises(ValueError, match="unknown strategy"):
        score_pool(model, tiles, "nope")


def test_forward_pass_counts():
    assert forward_passes("entropy") == {"encoder": 1, "decoder": 1, "ensemble_forward": 0}
    assert forward_passes("bald", mc_passes=8) == {"encoder": 1, "decoder": 9, "ensemble_forward": 0}
    assert forward_passes(get_strategy("hybrid", uncertainty="bald"), mc_passes=5)["decoder"] == 6
    assert forward_passes("suggestive", ensemble_size=4)["ensemble_forward"] == 4
