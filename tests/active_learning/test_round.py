"""run_round with in-memory plug-ins: the order of the steps, the seams, and the scoring pipeline's tiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.active_learning import (
    Evaluation,
    LabelledSet,
    LabelledTile,
    QueueOrder,
    RoundPlan,
    ScoredPool,
    TopK,
    TrainingError,
    run_round,
)
from ml_backend.data.synthetic import generate_em_like
from ml_backend.inference.scoring import ScoringConfig, score_images
from ml_backend.inference.tiling import predict_tiled
from ml_backend.model import build_model
from ml_backend.strategies import PassConfig, PoolBatch, get_strategy, score_pool
from ml_backend.training import TrainConfig
from ml_backend.training.recipe import EnsembleSpec, ModelState


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("unet", width=4, depth=2)


def _pool(n: int = 12, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    raw, masks = generate_em_like(n, size=size, seed=1)
    return raw.astype(np.float32) / 255.0, masks.astype(np.int64)


class Oracle:
    def __init__(self, images: np.ndarray, masks: np.ndarray, labelled: list[int]) -> None:
        self.images, self.masks, self.ids = images, masks, labelled

    def labelled(self) -> LabelledSet:
        return LabelledSet([LabelledTile(i, None, self.images[i], self.masks[i]) for i in self.ids])

    def unlabelled(self) -> list[int]:
        return [i for i in range(len(self.images)) if i not in self.ids]


class Recorder:
    """Publisher, scorer and sink in one: records what each step received."""

    def __init__(self, images: np.ndarray) -> None:
        self.images, self.calls, self.promoted = images, [], None

    def publish(self, trained, labelled, evaluation) -> str:
        self.calls.append(("publish", len(labelled.tiles), len(trained.ensemble)))
        self.promoted = evaluation.promote
        return "v1"

    def score(self, trained, version, strategy, ids, seed) -> ScoredPool:
        self.calls.append(("score", version, tuple(ids)))
        cfg = ScoringConfig(tile_size=64, batch_size=4, mc_passes=2, device="cpu")
        imgs = [self.images[i] for i in ids]
        return ScoredPool(list(ids), score_images(trained.model, imgs, strategy, cfg, ensemble=trained.ensemble))

    def put(self, version, scored, ranking) -> int:
        self.calls.append(("put", version, None if ranking is None else tuple(ranking.picked)))
        return 0 if ranking is None else len(ranking.picked)


def _plan(strategy: str, **kw) -> RoundPlan:
    tcfg = TrainConfig(steps=2, batch_size=2, crop=32, val_fraction=0.0, device="cpu", eval_every=0)
    return RoundPlan(
        get_strategy(strategy), ModelState(_model()), train=tcfg, scoring=ScoringConfig(device="cpu"), **kw
    )


def test_round_trains_publishes_scores_selects_and_delivers_in_that_order():
    images, masks = _pool()
    rec = Recorder(images)
    seen: list[str] = []

    def evaluate(trained) -> Evaluation:
        seen.append("evaluate")
        return Evaluation({"iou": 0.5})

    out = run_round(
        _plan("entropy"), Oracle(images, masks, [0, 1, 2]), publisher=rec, scorer=rec, select=TopK(4), sink=rec,
        evaluate=evaluate,
    )  # fmt: skip
    assert [c[0] for c in rec.calls] == ["publish", "score", "put"] and seen == ["evaluate"]
    assert rec.calls[0] == ("publish", 3, 0) and rec.promoted is True
    assert rec.calls[1] == ("score", "v1", tuple(range(3, 12)))  # only the unlabelled pool is scored
    assert out.delivered == 4 and len(set(out.ranking.picked)) == 4 and set(out.ranking.picked) <= set(range(3, 12))
    assert out.version == "v1" and out.trained.result is not None and {"train", "score", "upload"} <= set(out.timings)


def test_a_version_the_evaluation_rejects_is_published_unpromoted_and_the_live_queue_stays():
    images, masks = _pool()
    rec = Recorder(images)
    out = run_round(
        _plan("entropy"), Oracle(images, masks, [0, 1, 2]), publisher=rec, scorer=rec, select=TopK(4), sink=rec,
        evaluate=lambda trained: Evaluation({"iou": 0.1}, promote=False, reason="worse on the audit tiles"),
    )  # fmt: skip
    assert rec.calls == [("publish", 3, 0)] and rec.promoted is False  # no re-scoring, nothing delivered
    assert out.scored is None and out.delivered == 0 and out.evaluation.reason == "worse on the audit tiles"


class IntensityModel(torch.nn.Module):
    """Two-class logits +-8 (x - 0.5) per pixel: a tile at 0.5 is the most uncertain, one at 0 or 1 the least."""

    depth = 0  # no padding needed (score_pool pads to 2**depth)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]

    def decode(self, feats: list[torch.Tensor], mc_dropout: bool = False) -> torch.Tensor:
        d = 8.0 * (feats[-1][:, :1] - 0.5)
        return torch.cat([d, -d], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def test_queue_order_serves_the_most_uncertain_tile_first():
    # Constant tiles; the model's uncertainty grows as the intensity nears 0.5: tile 4 (0.5) is the most uncertain,
    # tile 6 (0.42) the next, and the served order is by distance from 0.5.
    levels = [0.0, 0.95, 0.3, 0.1, 0.5, 0.8, 0.42, 0.65]
    images = np.stack([np.full((32, 32), v, dtype=np.float32) for v in levels])
    masks = np.zeros(images.shape, dtype=np.int64)
    rec = Recorder(images)
    plan = RoundPlan(get_strategy("entropy"), ModelState(IntensityModel(), "v0", "kept"), train=None)
    out = run_round(plan, Oracle(images, masks, [0]), publisher=rec, scorer=rec, select=QueueOrder(2), sink=rec)
    expected = sorted(range(1, len(levels)), key=lambda i: abs(levels[i] - 0.5))
    assert expected[:2] == [4, 6]
    assert out.ranking.picked[0] == 4  # the most uncertain tile is served first
    assert out.ranking.picked == expected  # and the rest in order of decreasing uncertainty
    assert rec.calls[-1] == ("put", "v1", tuple(expected))  # the sink receives that order
    scores = out.ranking.scores
    assert scores.shape == (7,) and np.all((scores >= 0) & (scores <= 1))  # every unlabelled tile has a queue score
    assert scores[out.ranking.ids.index(4)] < scores[out.ranking.ids.index(6)] < scores[out.ranking.ids.index(1)]


def test_ensemble_is_trained_only_for_strategies_that_need_it_and_a_kept_model_is_not_trained():
    images, masks = _pool()
    spec = EnsembleSpec(2, 1, bootstrap_seed=0, member_seeds=(1, 2))
    rec = Recorder(images)
    run_round(_plan("suggestive", ensemble=spec), Oracle(images, masks, [0, 1]), publisher=rec, scorer=rec,
              select=TopK(2), sink=rec)  # fmt: skip
    assert rec.calls[0] == ("publish", 2, 2)
    rec = Recorder(images)
    run_round(_plan("entropy", ensemble=spec), Oracle(images, masks, [0, 1]), publisher=rec)
    assert rec.calls == [("publish", 2, 0)]  # no scorer/sink given: train and publish only

    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = RoundPlan(get_strategy("random"), ModelState(model, "v0", "kept"), train=None, score=False)
    out = run_round(kept, Oracle(images, masks, []), publisher=Recorder(images))
    assert out.trained.result is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_round_without_labels_refuses_to_train():
    images, masks = _pool()
    with pytest.raises(TrainingError, match="no usable annotated tile"):
        run_round(_plan("entropy"), Oracle(images, masks, []), publisher=Recorder(images))


def test_scoring_small_tiles_is_score_pool_and_large_images_are_tiled():
    model = _model().eval()
    images, _ = _pool(n=5, size=32)
    strategy = get_strategy("entropy")
    cfg = ScoringConfig(tile_size=48, tile_overlap=8, batch_size=2, mc_passes=2, device="cpu")
    small = score_images(model, list(images), strategy, cfg)
    ref = score_pool(model, images, strategy, passes=PassConfig(device="cpu", batch_size=2, mc_passes=2))
    np.testing.assert_array_equal(small.summary["value"], ref["value"])
    assert small.pixels.tolist() == [32 * 32] * 5

    big = generate_em_like(1, size=96, seed=3)[0][0].astype(np.float32) / 255.0  # larger than one 48 px tile
    got: dict[int, np.ndarray] = {}
    scored = score_images(model, [images[0], big], strategy, cfg, on_probs=lambda i, p: got.__setitem__(i, p))
    tiled = predict_tiled(model, big, tile=48, overlap=8, batch_size=2, device="cpu")
    np.testing.assert_allclose(got[1], tiled, atol=1e-6)  # the large image's masks come from tiled inference
    exact = strategy.summarize(PoolBatch(probs=tiled[None]))["value"][0]
    np.testing.assert_allclose(scored.summary["value"][1], exact, rtol=1e-5)
    assert scored.pixels.tolist() == [32 * 32, 96 * 96] and got[0].shape == (2, 32, 32)

    bald = score_images(model, [big, big], get_strategy("bald"), cfg, seed=1)  # MC passes: tile-sized crops
    assert bald.summary["value"].shape == (2,) and np.all(np.isfinite(bald.summary["value"]))
    assert bald.summary["value"][0] == bald.summary["value"][1] and bald.summary["value"][0] > 0
