"""fine_tune with a real small U-Net on generated EM-like data."""

import numpy as np
import pytest
import torch

from ml_backend.data.synthetic import generate_em_like
from ml_backend.model import build_model
from ml_backend.training import IGNORE, TrainConfig, evaluate, fine_tune, split_train_val
from ml_backend.training.trainer import ValidationTiles, recalibrate_batchnorm


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; tiny models do not gain from threads
    yield
    torch.set_num_threads(old)


def _data(n: int, seed: int, size: int = 64) -> tuple[list[np.ndarray], list[np.ndarray]]:
    raw, masks = generate_em_like(n, size=size, seed=seed)
    return [r.astype(np.float32) / 255.0 for r in raw], [m.astype(np.int64) for m in masks]


def _small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("unet", width=8, depth=3)


def test_training_measurably_improves_heldout_iou():
    train_i, train_m = _data(16, seed=1)
    test_i, test_m = _data(6, seed=2)
    model = _small_model()
    before = evaluate(model, test_i, test_m, torch.device("cpu"))["iou"]
    seen: list[dict] = []
    cfg = TrainConfig(steps=150, lr=2e-3, batch_size=4, crop=64, eval_every=50, log_every=25, device="cpu")
    result = fine_tune(model, train_i, train_m, cfg, progress=seen.append)
    after = evaluate(model, test_i, test_m, torch.device("cpu"))["iou"]
    assert after >= before + 0.2, f"held-out IoU {before:.3f} -> {after:.3f}"
    assert after > 0.35
    assert result.n_val >= 1 and result.n_train + result.n_val == 16
    assert result.metrics["val_iou"] is not None and result.metrics["val_iou"] > result.metrics["initial_val_iou"]
    assert result.steps == 150 and result.device == "cpu"
    assert seen and seen[-1]["step"] == 150 and {"step", "steps", "loss", "val_iou"} <= set(seen[0])
    assert not model.training


def _right_half_recall(model: torch.nn.Module, images: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """Fraction of the foreground pixels in the right halves of ``images`` that ``model`` predicts as foreground."""
    with torch.no_grad():
        pred = model(torch.from_numpy(np.stack(images))[:, None]).argmax(1).numpy()[:, :, 32:]
    truth = np.stack(masks)[:, :, 32:] == 1
    return float((pred[truth] == 1).mean())


def test_sparse_labels_train_and_explicit_val_set_is_used():
    """Unpainted pixels (IGNORE) teach nothing: the right halves of the tiles are never painted, yet the model finds
    the objects there; the same training with those halves painted as background (what an unpainted pixel would mean
    if it counted) learns to miss them."""
    train_i, train_m = _data(8, seed=3)
    val_i, val_m = _data(3, seed=4)
    recall = {}
    for name, fill in (("unpainted", IGNORE), ("painted background", 0)):
        masks = []
        for m in train_m:
            s = m.copy()
            s[:, 32:] = fill  # the left half holds the true labels
            masks.append(s)
        model = _small_model()
        cfg = TrainConfig(steps=60, lr=2e-3, batch_size=4, crop=48, eval_every=10, device="cpu")
        result = fine_tune(model, train_i, masks, cfg, validation=ValidationTiles(val_i, val_m))
        assert result.n_train == 8 and result.n_val == 3  # the explicit validation set is used, nothing split off
        assert 0.0 <= result.metrics["val_iou"] <= 1.0
        recall[name] = _right_half_recall(model, train_i, train_m)
    assert recall["unpainted"] > 0.5, recall  # objects in the never-painted halves are found
    assert recall["unpainted"] > recall["painted background"] + 0.3, recall  # unpainted != background


def test_same_seed_gives_same_weights():
    imgs, masks = _data(4, seed=5, size=32)
    states = []
    for _ in range(2):
        model = _small_model()
        fine_tune(model, imgs, masks, TrainConfig(steps=5, batch_size=2, crop=32, device="cpu", seed=7))
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_time_budget_stops_early():
    imgs, masks = _data(3, seed=6, size=32)
    res = fine_tune(_small_model(), imgs, masks, TrainConfig(steps=10_000, crop=32, time_budget_s=0.5, device="cpu"))
    assert res.metrics["stopped"] == "time_budget" and res.steps < 10_000


@pytest.mark.parametrize("by_time", [True, False])
def test_a_run_the_clock_stops_ends_annealed_only_when_annealing_by_time(by_time):
    """anneal_by_time (a product's first version on a CPU, issue 18): the schedule follows the clock when it runs
    ahead of the steps, so warm-up and cosine both happen within the budget; by steps alone, a run the clock stops
    after a few percent of its steps is cut inside the warm-up."""
    imgs, masks = _data(3, seed=6, size=32)
    seen: list[dict] = []
    cfg = TrainConfig(steps=1_000_000, lr=1e-3, batch_size=2, crop=16, time_budget_s=3.0, eval_every=0, log_every=1,
                      anneal_by_time=by_time, device="cpu")  # fmt: skip
    res = fine_tune(build_model("unet", width=4, depth=2), imgs, masks, cfg, progress=seen.append)
    lrs = [s["lr"] for s in seen if "lr" in s]
    assert res.metrics["stopped"] == "time_budget" and len(lrs) >= 10, (res.metrics, len(lrs))
    if by_time:  # through the warm-up to the peak, then down the cosine to (near) its floor
        assert max(lrs) > 0.7e-3 and lrs[-1] < 0.35e-3 and lrs[-1] < max(lrs) / 2, (max(lrs), lrs[-1])
    else:  # 5% warm-up of a million steps: still warming up when the clock stops
        assert max(lrs) < 0.1e-3 and lrs == sorted(lrs)


@pytest.mark.parametrize(
    ("step", "steps", "seconds", "budget", "eta"),
    [(100, 900, 30.0, 300.0, 240.0), (100, 900, 100.0, 120.0, 20.0), (900, 900, 50.0, 300.0, 0.0),
     (10, 900, 400.0, 300.0, 0.0), (0, 900, 1.0, 300.0, 299.0)],
)
def test_the_training_eta_counts_the_time_budget(step, steps, seconds, budget, eta):
    """The status page's ETA of a training: the steps to go at the rate so far, or the budget's rest if sooner."""
    from ml_backend.training.trainer import _eta

    assert _eta(step, steps, seconds, budget) == pytest.approx(eta)


def test_split_is_stable_as_the_labelled_set_grows():
    imgs, _ = _data(30, seed=8, size=16)
    for n in (2, 5, 10, 20, 30):
        tr, va = split_train_val(imgs[:n], 0.2, seed=0)
        assert va and tr and sorted(tr + va) == list(range(n))
    _, va_small = split_train_val(imgs[:20], 0.2, seed=0)
    tr_big, _ = split_train_val(imgs, 0.2, seed=0)
    # A tile used for training at 20 labels is never validated at 30 (no leakage when fine-tuning onwards).
    tr_small = set(range(20)) - set(va_small)
    assert tr_small <= set(tr_big) | set()
    assert split_train_val(imgs[:1], 0.2, seed=0) == ([0], [])


def test_bad_inputs_raise_clear_errors():
    imgs, masks = _data(2, seed=9, size=32)
    model = _small_model()
    with pytest.raises(ValueError, match="masks"):
        fine_tune(model, imgs, masks[:1])
    with pytest.raises(ValueError, match="shapes"):
        fine_tune(model, [imgs[0][:16]], [masks[0]])
    with pytest.raises(ValueError, match="IGNORE"):
        fine_tune(model, [imgs[0]], [np.full((32, 32), IGNORE)], TrainConfig(val_fraction=0.0))
    with pytest.raises(ValueError, match="classes"):
        fine_tune(model, [imgs[0]], [np.full((32, 32), 3)], TrainConfig(val_fraction=0.0))
    with pytest.raises(ValueError, match="at least one"):
        fine_tune(model, [], [])
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=1.0)


def test_batchnorm_recalibration_matches_hand_computed_statistics():
    """After recalibration the first BatchNorm holds the exact mean/variance of its input over the given images."""
    torch.manual_seed(0)
    model = build_model("unet", width=4, depth=2, dropout=0.5, norm="batch").train()
    images = [np.random.default_rng(i).random((32, 32), dtype=np.float32) * (i + 1) for i in range(5)]
    assert recalibrate_batchnorm(model, images, torch.device("cpu"), batch_size=2) == 5
    assert model.training and all(m.training for m in model.modules())  # mode restored
    conv, bn = model.encoders[0][0], model.encoders[0][1]
    with torch.no_grad():
        feats = torch.cat([conv(torch.from_numpy(im)[None, None]) for im in images])  # (5, 4, 32, 32)
    # momentum None: the cumulative average of per-batch means/unbiased variances (batches of 2, 2, 1 images)
    batches = [feats[0:2], feats[2:4], feats[4:5]]
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1  # restored
    state = {k: v.clone() for k, v in model.state_dict().items()}
    recalibrate_batchnorm(model, images, torch.device("cpu"), batch_size=2)  # dropout off: deterministic
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_recalibration_leaves_groupnorm_models_alone_and_fine_tune_reports_it():
    model = _small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_batchnorm(model, [np.zeros((16, 16), np.float32)], torch.device("cpu")) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    images, masks = _data(6, seed=4, size=32)
    bn_model = build_model("unet", width=4, depth=2, norm="batch")
    cfg = TrainConfig(steps=3, batch_size=2, crop=32, device="cpu")
    res = fine_tune(bn_model, images, masks, cfg, calibration_images=images + images)
    assert res.metrics["bn_calibration_images"] == 12
    with pytest.raises(ValueError, match="calibration_images"):
        fine_tune(bn_model, images, masks, cfg, calibration_images=[np.full((8, 8), np.nan, np.float32)])
