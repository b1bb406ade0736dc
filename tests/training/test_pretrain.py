"""Self-supervised pretraining: runs, learns, resumes exactly, and its weights initialise the segmentation U-Net."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.data.volume import generate_volume
from ml_backend.imaging import normalize
from ml_backend.model import build_model
from ml_backend.training import TrainConfig, fine_tune
from ml_backend.training.pretrain import PretrainConfig, make_batch, pretrain, reconstruction_loss

HP = {"width": 4, "depth": 2, "dropout": 0.2, "norm": "batch"}


@pytest.fixture(scope="module")
def tiles() -> list[np.ndarray]:
    vol = generate_volume((4, 64, 64), seed=0)
    return [normalize(vol.image[k, y : y + 32, x : x + 32]) for k in range(4) for y in (0, 32) for x in (0, 32)]


def _cfg(**kw) -> PretrainConfig:
    base = {"steps": 6, "batch_size": 4, "crop": 32, "patch": 4, "checkpoint_every": 3, "device": "cpu", "seed": 1}
    return PretrainConfig(**{**base, **kw})


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("unet", **HP)


def test_runs_and_reports_progress(tiles):
    seen: list[dict] = []
    model = _model()
    res = pretrain(model, tiles, _cfg(log_every=2), progress=seen.append)
    assert res.steps == 6 and res.stopped == "steps" and len(res.losses) == 6
    assert [d["step"] for d in seen] == [2, 4, 6]
    assert all({"step", "steps", "loss", "eta_s", "seconds"} <= d.keys() for d in seen)
    assert seen[-1]["eta_s"] == 0
    assert not model.training
    assert not model.head._forward_pre_hooks  # no hook left behind for fine-tuning


def test_resume_continues_and_equals_an_uninterrupted_run(tiles, tmp_path):
    full = pretrain(_model(), tiles, _cfg())
    ckpt = tmp_path / "pre.pt"
    _run_steps(tiles, ckpt, 3)  # interrupted after step 3 (its checkpoint)
    resumed = pretrain(_model(), tiles, _cfg(), checkpoint_path=ckpt)
    assert resumed.resumed_from == 3 and resumed.steps == 6 and len(resumed.losses) == 6
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-5, atol=1e-6)
    for key, value in full.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # A finished run returns at once from its checkpoint.
    again = pretrain(_model(), tiles, _cfg(), checkpoint_path=ckpt)
    assert again.resumed_from == 6 and again.steps == 6 and again.losses == resumed.losses


def test_time_budget_stops_and_checkpoints(tiles, tmp_path):
    ckpt = tmp_path / "pre.pt"
    first = pretrain(_model(), tiles, _cfg(time_budget_s=0.0), checkpoint_path=ckpt)
    assert first.stopped == "time_budget" and first.steps == 0
    assert torch.load(ckpt, weights_only=True)["step"] == 0
    rest = pretrain(_model(), tiles, _cfg(), checkpoint_path=ckpt)  # a larger budget later continues
    assert rest.stopped == "steps" and rest.steps == 6


def _run_steps(tiles, path, n: int) -> None:
    """Stop a 6-step run after ``n`` steps the way an interrupted worker would: through the progress callback."""

    class Stop(Exception):
        pass

    def cb(d: dict) -> None:
        if d["step"] == n:
            raise Stop

    model = _model()
    with pytest.raises(Stop):
        pretrain(model, tiles, _cfg(checkpoint_every=n, log_every=1), checkpoint_path=path, progress=cb)
    assert not model.head._forward_pre_hooks
    assert torch.load(path, weights_only=True)["step"] == n


def test_checkpoint_of_another_configuration_is_refused(tiles, tmp_path):
    ckpt = tmp_path / "pre.pt"
    pretrain(_model(), tiles, _cfg(steps=2), checkpoint_path=ckpt)
    with pytest.raises(ValueError, match="another"):
        pretrain(_model(), tiles, _cfg(steps=2, mask_ratio=0.3), checkpoint_path=ckpt)


def test_loss_decreases(tiles):
    res = pretrain(_model(), tiles, _cfg(steps=60, lr=3e-3, checkpoint_every=100))
    assert np.mean(res.losses[-10:]) < 0.7 * np.mean(res.losses[:10])


def test_weights_load_into_build_model_and_fine_tune(tiles):
    res = pretrain(_model(), tiles, _cfg(steps=3))
    model = build_model("unet", **HP)
    model.load_state_dict(res.state_dict, strict=True)
    # The pretrained encoder differs from a fresh initialisation; the segmentation head is untouched.
    fresh = _model()
    assert not torch.equal(model.encoders[0][0].weight, fresh.encoders[0][0].weight)
    assert torch.equal(model.head.weight, fresh.head.weight)
    vol = generate_volume((1, 64, 64), seed=1)
    img, msk = normalize(vol.image[0]), vol.mask[0].astype(np.int64)
    out = fine_tune(model, [img, img], [msk, msk], TrainConfig(steps=2, crop=32, batch_size=2, device="cpu"))
    assert out.steps == 2


def test_multichannel_tiles_for_context_models(tiles):
    model = build_model("unet", in_channels=3, **HP)
    stacked = [np.stack([t, t, t]) for t in tiles[:4]]
    res = pretrain(model, stacked, _cfg(steps=2))
    assert res.steps == 2
    with pytest.raises(ValueError, match="expected"):
        pretrain(build_model("unet", in_channels=3, **HP), tiles[:2], _cfg(steps=1))


def test_batches_are_a_function_of_seed_and_step(tiles):
    chw = [t[None] for t in tiles]
    a = make_batch(chw, _cfg(), 5)
    b = make_batch(chw, _cfg(), 5)
    c = make_batch(chw, _cfg(), 6)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    x, y, m = a
    assert 0.2 < float(m.mean()) < 0.8
    torch.testing.assert_close(x[m.expand_as(x) == 0], y[m.expand_as(y) == 0], atol=0.5, rtol=0)  # visible: noisy
    assert float(reconstruction_loss(y, y, m, 0.25)) == 0.0
