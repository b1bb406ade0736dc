"""2.5D context on the model side: (C, H, W) inputs (one channel per slice offset) are cropped and augmented as one
image, fine-tuned for real, and a stored model that reads other slices than CONTEXT_OFFSETS is not fine-tuned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.config import Settings
from ml_backend.data.context import context_batch, model_offsets
from ml_backend.model import build_model, load_checkpoint, save_checkpoint
from ml_backend.training.augment import AugmentConfig, augment_batch, sample_crops
from ml_backend.training.metrics import IGNORE

OFFSETS = (-1, 0, 1)


@pytest.fixture(scope="module")
def volume_tiles():
    """(images (N, 3, 32, 32) normalised, masks (N, 32, 32)) of the generated 3-D volume, neighbours as channels."""
    from ml_backend.data.volume import generate_volume
    from ml_backend.imaging import normalize

    vol = generate_volume((6, 64, 64), seed=3)
    raw = np.stack([normalize(s) for s in vol.image]).astype(np.float32)
    pos = np.array([(z, y, x) for z in range(6) for y in (0, 32) for x in (0, 32)])
    images = context_batch(raw, pos, 32, OFFSETS)
    masks = np.stack([(vol.mask[z, y : y + 32, x : x + 32] > 0) for z, y, x in pos]).astype(np.int64)
    return images, masks


def test_sample_crops_cuts_the_same_window_from_every_channel():
    base = np.arange(40 * 40, dtype=np.float32).reshape(40, 40)
    img = np.stack([base, base + 10_000, base + 20_000])  # channel c = base + c * 10000
    msk = base.astype(np.int64)
    x, y = sample_crops([img], [msk], np.array([0, 0, 0]), 16, np.random.default_rng(0))
    assert x.shape == (3, 3, 16, 16) and y.shape == (3, 16, 16)
    for j in range(3):
        for c in range(3):
            assert torch.equal(x[j, c] - 10_000 * c, y[j].float())  # every channel aligned with the mask


def test_sample_crops_of_plain_tiles_is_unchanged_by_context_support():
    imgs = [np.random.default_rng(1).random((20, 24)).astype(np.float32)]
    msks = [np.zeros((20, 24), dtype=np.int64)]
    x, y = sample_crops(imgs, msks, np.array([0]), 16, np.random.default_rng(4))
    rng = np.random.default_rng(4)
    y0, x0 = int(rng.integers(0, 5)), int(rng.integers(0, 9))
    assert x.shape == (1, 1, 16, 16)
    np.testing.assert_array_equal(x[0, 0].numpy(), imgs[0][y0 : y0 + 16, x0 : x0 + 16])
    small = sample_crops([np.ones((3, 8, 8), np.float32)], [np.zeros((8, 8), np.int64)], np.array([0]), 16,
                         np.random.default_rng(0))  # fmt: skip
    assert small[0].shape == (1, 3, 16, 16) and (small[1][0, 8:] == IGNORE).all()


def test_augmentation_applies_one_geometric_transform_to_every_channel():
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 2, (12, 24, 24), generator=g)
    images = torch.stack([masks.float(), masks.float() * 2, masks.float() * 3], dim=1)  # (N, 3, H, W)
    cfg = AugmentConfig(contrast=0, brightness=0, noise=0, elastic_prob=0.5, elastic_alpha=3)
    out_i, out_m = augment_batch(images, masks, torch.Generator().manual_seed(3), cfg)
    assert out_i.shape == images.shape and out_m.shape == masks.shape
    assert not torch.equal(out_m, masks)
    flat = [k for k in range(12) if torch.equal(out_i[k, 0], out_i[k, 0].round())]  # not elastically warped
    assert flat, "some samples are only flipped/rotated"
    for k in flat:
        for c in range(3):
            assert torch.equal(out_i[k, c], out_m[k].float() * (c + 1))
    for k in range(12):  # warped samples too: the channels moved together
        assert torch.allclose(out_i[k, 1], out_i[k, 0] * 2, atol=1e-5)
        assert torch.allclose(out_i[k, 2], out_i[k, 0] * 3, atol=1e-5)


def test_fine_tune_on_context_tiles_really_trains(volume_tiles):
    from ml_backend.training import TrainConfig, fine_tune

    images, masks = volume_tiles
    torch.set_num_threads(1)  # as tests/conftest.py's train_tiny_unet: seconds, also on a loaded machine
    torch.manual_seed(0)
    model = build_model("unet", in_channels=3, context_offsets=list(OFFSETS), width=8, depth=2, norm="batch")
    losses: list[float] = []
    cfg = TrainConfig(steps=60, lr=3e-3, batch_size=4, crop=32, eval_every=30, log_every=5, seed=0, device="cpu")
    result = fine_tune(
        model, list(images), list(masks), cfg, progress=lambda d: losses.append(d["loss"]),
        calibration_images=list(images[:4]),
    )  # fmt: skip
    steps = [loss for loss in losses if loss is not None]
    assert result.steps == 60 and result.metrics["bn_calibration_images"] == 4
    assert np.mean(steps[-3:]) < np.mean(steps[:2]), steps  # the loss falls
    assert 0.0 <= result.metrics["val_iou"] <= 1.0
    with pytest.raises(ValueError, match="spatial"):
        fine_tune(model, [images[0]], [masks[0][:16]], cfg)
    with pytest.raises(ValueError, match="reads 3 input channel"):
        fine_tune(model, [images[0][1]], [masks[0]], cfg)  # a 2-D tile for a context model: a clear error


def _neighbour_only_tiles(n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(3, 32, 32) tiles whose disc shows only in the neighbouring slices (channels 0 and 2); the centre slice is
    noise that says nothing about the mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    images, masks = [], []
    for _ in range(n):
        cy, cx, r = rng.integers(8, 24), rng.integers(8, 24), rng.integers(4, 7)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.int64)
        neighbour = 0.2 + 0.6 * mask + 0.05 * rng.standard_normal((32, 32))
        images.append(np.stack([neighbour, rng.random((32, 32)), neighbour]).astype(np.float32))
        masks.append(mask)
    return images, masks


def test_a_context_model_learns_what_only_the_neighbouring_slices_show():
    from ml_backend.training import TrainConfig, fine_tune
    from ml_backend.training.metrics import iou
    from ml_backend.training.trainer import predict_probs

    train_x, train_y = _neighbour_only_tiles(16, seed=0)
    test_x, test_y = _neighbour_only_tiles(8, seed=100)
    torch.set_num_threads(1)
    cfg = TrainConfig(steps=60, lr=3e-3, batch_size=4, crop=32, val_fraction=0.0, eval_every=0, seed=0, device="cpu")
    scores = {}
    for name, channels, view in (("context", 3, lambda x: x), ("centre only", 1, lambda x: x[1])):
        torch.manual_seed(0)
        offsets = {"context_offsets": list(OFFSETS)} if channels == 3 else {}
        model = build_model("unet", in_channels=channels, width=8, depth=2, norm="batch", **offsets)
        fine_tune(model, [view(x) for x in train_x], train_y, cfg)
        preds = [predict_probs(model, view(x), torch.device("cpu")).argmax(0) for x in test_x]
        scores[name] = float(np.mean([iou(p, y) for p, y in zip(preds, test_y, strict=True)]))
    # measured: context 0.71-0.76, centre only 0.19-0.31 (data and training seeds 0-3)
    assert scores["context"] > 0.55 and scores["context"] > scores["centre only"] + 0.25, scores


def test_context_offsets_are_recorded_in_the_checkpoint(tmp_path):
    model = build_model("unet", in_channels=3, context_offsets=[-1, 0, 1], width=4, depth=2)
    save_checkpoint(model, tmp_path / "m.pt")
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded.hparams["context_offsets"] == [-1, 0, 1] and model_offsets(loaded) == (-1, 0, 1)
    assert model_offsets(build_model("unet", width=4, depth=2)) == (0,)
    assert "context_offsets" not in build_model("unet", width=4, depth=2).hparams  # 2-D checkpoints unchanged
    with pytest.raises(ValueError, match="context_offsets"):
        build_model("unet", in_channels=2, context_offsets=[-1, 0, 1])


def test_context_offsets_setting_is_validated():
    assert Settings.from_env(context_offsets=" -1, 0 ,1").context_offset_list == (-1, 0, 1)
    assert Settings.from_env().context_offset_list == (0,)  # plain 2-D by default
    for bad in ("1,2", "0,0", "a,0"):
        with pytest.raises(ValueError, match="CONTEXT_OFFSETS"):
            Settings.from_env(context_offsets=bad)


class _Registry:
    """The two things initial_model reads from a ModelRegistry."""

    project_id = 1

    def __init__(self, model):
        self.model = model

    def load_current(self):
        return None if self.model is None else (self.model, {"version": "v1"})


def test_initial_model_starts_fresh_when_the_offsets_change():
    from ml_backend.labelstudio.labelconfig import parse_label_config
    from ml_backend.training.recipe import initial_model, new_model

    config = parse_label_config(
        '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
        '<Label value="Mitochondria"/></BrushLabels></View>'
    )
    flat = Settings.from_env(model_width=4, model_depth=2)
    ctx = flat.replace(context_offsets="-1,0,1")
    fresh = new_model(ctx, config.num_classes)
    assert fresh.hparams["in_channels"] == 3 and model_offsets(fresh) == (-1, 0, 1)
    assert new_model(flat, config.num_classes).hparams["in_channels"] == 1

    stored_2d = new_model(flat, config.num_classes)
    model, parent, how = initial_model(_Registry(stored_2d), config, ctx)
    assert (parent, how) == (None, "from scratch") and model_offsets(model) == (-1, 0, 1)
    model, parent, how = initial_model(_Registry(fresh), config, ctx)
    assert (model, parent, how) == (fresh, "v1", "fine-tuned")
    model, parent, how = initial_model(_Registry(fresh), config, flat)  # back to 2-D: a new 1-channel model
    assert how == "from scratch" and model.hparams["in_channels"] == 1
    other = new_model(ctx.replace(context_offsets="-2,0,2"), config.num_classes)  # same channel count, other slices
    assert initial_model(_Registry(other), config, ctx)[2] == "from scratch"
