"""2.5D context on the inference side: tiled prediction, THE scoring pipeline and embeddings take (C, H, W) inputs,
with the same results as a direct forward pass, and refuse an input whose channels the model does not read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.inference.scoring import ScoringConfig, embed_images, score_images
from ml_backend.inference.tiling import predict_batch, predict_tiled
from ml_backend.model import build_model
from ml_backend.strategies import get_strategy


@pytest.fixture(scope="module")
def ctx_unet():
    torch.manual_seed(0)
    return build_model("unet", in_channels=3, context_offsets=[-1, 0, 1], width=4, depth=2, norm="group").eval()


def _images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((3, size, size)).astype(np.float32) for _ in range(n)]


def test_predict_tiled_on_context_tiles_matches_a_direct_forward_pass(ctx_unet):
    img = _images(1, 40)[0]
    probs = predict_tiled(ctx_unet, img, tile=64, overlap=8, device="cpu")  # one tile: no blending
    with torch.no_grad():
        direct = torch.softmax(ctx_unet(torch.from_numpy(img)[None]), dim=1)[0].numpy()
    assert probs.shape == (2, 40, 40)
    np.testing.assert_allclose(probs, direct, atol=1e-5)
    tiled = predict_tiled(ctx_unet, _images(1, 70)[0], tile=32, overlap=8, batch_size=3, device="cpu")
    assert tiled.shape == (2, 70, 70) and np.allclose(tiled.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(predict_batch(ctx_unet, np.stack([img]), device="cpu")[0], direct, atol=1e-5)


def test_a_model_refuses_an_input_with_other_channels(ctx_unet):
    with pytest.raises(ValueError, match="3 input channel"):
        predict_tiled(ctx_unet, np.zeros((20, 20), np.float32))
    with pytest.raises(ValueError, match="1 input channel"):
        predict_tiled(build_model("unet", width=4, depth=2), np.zeros((3, 20, 20), np.float32))


def test_score_images_and_embeddings_on_context_tiles(ctx_unet):
    cfg = ScoringConfig(tile_size=32, tile_overlap=8, batch_size=2, mc_passes=2, device="cpu")
    small, large = _images(3, 32, seed=1), _images(1, 48, seed=2)  # 48 > tile: tiled, crops for MC strategies
    got: dict[int, np.ndarray] = {}
    scored = score_images(
        ctx_unet, small + large, get_strategy("entropy"), cfg, on_probs=lambda i, p: got.update({i: p})
    )
    assert scored.summary["value"].shape == (4,) and np.isfinite(scored.summary["value"]).all()
    assert scored.pixels.tolist() == [32 * 32] * 3 + [48 * 48]
    assert sorted(got) == [0, 1, 2, 3] and got[3].shape == (2, 48, 48)
    with torch.no_grad():
        direct = torch.softmax(ctx_unet(torch.from_numpy(small[0])[None]), dim=1)[0].numpy()
    np.testing.assert_allclose(got[0], direct, atol=1e-5)
    mc = score_images(ctx_unet, small + large, get_strategy("bald"), cfg)
    assert mc.summary["value"].shape == (4,)
    emb = embed_images(ctx_unet, small + large, torch.device("cpu"), batch_size=2)
    assert emb.shape == (4, ctx_unet.embedding_dim) and np.isfinite(emb).all()
