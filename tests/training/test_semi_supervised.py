"""Semi-supervised fine-tuning (issue 17, ``training.semi``): FixMatch pseudo-labels from the EMA teacher."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ml_backend.config import Settings
from ml_backend.data.volume import HARD, generate_volume
from ml_backend.model import build_model
from ml_backend.training import TrainConfig, evaluate, fine_tune
from ml_backend.training.recipe import ModelState, train_config, train_model
from ml_backend.training.semi import SemiConfig, consistency_loss, pseudo_labels, rampup, strong_view


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _tiles(n_slices: int = 8, size: int = 128, tile: int = 64, seed: int = 3) -> tuple[list, list]:
    """2-D tiles of a generated isotropic volume (images normalised to [0, 1], masks 0/1)."""
    vol = generate_volume((n_slices, size, size), setting="isotropic", seed=seed, difficulty=HARD)
    raw = np.asarray(vol.image, dtype=np.float32) / 255.0
    lab = vol.mask.astype(np.int64)
    imgs, msks = [], []
    for z in range(n_slices):
        for y in range(0, size, tile):
            for x in range(0, size, tile):
                imgs.append(np.ascontiguousarray(raw[z, y : y + tile, x : x + tile]))
                msks.append(np.ascontiguousarray(lab[z, y : y + tile, x : x + tile]))
    return imgs, msks


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("unet", width=8, depth=3)


def test_only_confident_pixels_contribute():
    teacher = torch.zeros(1, 2, 4, 4)
    teacher[0, 1, :2] = 10.0  # top half: foreground with p ~ 1; bottom half: 50/50, not confident
    student = torch.randn(1, 2, 4, 4)
    loss, frac = consistency_loss(student, teacher, threshold=0.95)
    assert frac == pytest.approx(0.5)
    moved = student.clone()
    moved[0, :, 2:] += torch.tensor([5.0, -5.0]).view(2, 1, 1)  # change only the unconfident pixels
    assert consistency_loss(moved, teacher, 0.95)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    moved = student.clone()
    moved[0, :, :2] += torch.tensor([5.0, -5.0]).view(2, 1, 1)  # push the confident pixels to the wrong class
    assert consistency_loss(moved, teacher, 0.95)[0].item() > loss.item() + 1.0
    keep = torch.zeros(1, 4, 4, dtype=torch.bool)  # the cutout covers everything: no pixel keeps a pseudo-label
    assert consistency_loss(student, teacher, 0.95, keep)[0].item() == 0.0
    labels, confident = pseudo_labels(teacher, 0.95)
    assert confident[0, :2].all() and not confident[0, 2:].any() and (labels[0, :2] == 1).all()


def test_threshold_one_gives_zero_loss_even_for_saturated_teachers():
    teacher = torch.zeros(2, 2, 8, 8)
    teacher[:, 1] = 80.0  # softmax is exactly 1.0 in float32
    assert float(teacher.softmax(1).max()) == 1.0
    loss, frac = consistency_loss(torch.randn(2, 2, 8, 8, requires_grad=True), teacher, threshold=1.0)
    assert loss.item() == 0.0 and frac == 0.0
    loss.backward()  # still a graph: the trainer adds it to the supervised loss


def test_gradients_reach_the_student_only():
    student, teacher = _model(0), _model(1)
    x = torch.rand(2, 1, 32, 32)
    t_logits = teacher(x)  # built WITH a graph: the loss itself must cut it
    loss, _ = consistency_loss(student(x), t_logits, threshold=0.5)
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_strong_view_keeps_geometry_and_marks_the_cutout():
    gen = torch.Generator().manual_seed(0)
    weak = torch.rand(4, 1, 32, 32)
    strong, keep = strong_view(weak, gen, SemiConfig(cutout=0.5, noise=0.0, contrast=0.0, brightness=0.0))
    assert strong.shape == weak.shape and keep.shape == (4, 32, 32)
    assert (~keep).any(dim=(1, 2)).all()  # one square per sample
    assert torch.allclose(strong[:, 0][keep], weak[:, 0][keep], atol=1e-6)  # outside the square: same pixels
    assert rampup(0, 100, 0.2) < 0.01 and rampup(10, 100, 0.2) < rampup(19, 100, 0.2) < 1.0
    assert rampup(20, 100, 0.2) == 1.0 and rampup(0, 100, 0.0) == 1.0


def test_switched_off_is_exactly_the_supervised_path():
    imgs, msks = _tiles(n_slices=2)
    cfg = TrainConfig(steps=12, lr=2e-3, batch_size=2, crop=64, eval_every=6, device="cpu")
    off = copy.deepcopy(cfg)
    off.semi = SemiConfig(enabled=False, threshold=0.5, unlabelled_batch=2)
    a, b = _model(), _model()
    ra = fine_tune(a, imgs[:4], msks[:4], cfg)
    rb = fine_tune(b, imgs[:4], msks[:4], off, unlabelled_images=imgs[4:])
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert ra.metrics["train_loss"] == rb.metrics["train_loss"] and "semi" not in rb.metrics
    # The product's switch: SEMI_SUPERVISED off (the default) -> the recipe never even asks for the pool.
    asked: list[int] = []

    def pool() -> list[np.ndarray]:
        asked.append(1)
        return imgs[4:]

    tcfg = train_config(Settings(semi_supervised=False), steps=2, batch_size=2, crop=64, device="cpu")
    assert not tcfg.semi.active
    train_model(ModelState(_model()), imgs[:4], msks[:4], tcfg, unlabelled=pool)
    assert asked == []
    on = train_config(
        Settings(semi_supervised=True, semi_threshold=0.9, semi_weight=0.5, semi_unlabelled_batch=3),
        steps=2, batch_size=2, crop=64, device="cpu",
    )  # fmt: skip
    assert (on.semi.enabled, on.semi.threshold, on.semi.weight, on.semi.unlabelled_batch) == (True, 0.9, 0.5, 3)
    trained = train_model(ModelState(_model()), imgs[:4], msks[:4], on, unlabelled=pool)
    assert asked == [1] and trained.result.metrics["semi"]["unlabelled_tiles"] == len(imgs) - 4


def test_a_real_model_learns_with_the_unlabelled_term_on_a_generated_volume():
    """Labelled: 8 tiles of two slices; unlabelled: the other slices' tiles; held-out: a separate volume. The model
    trains with the term on, its loss falls, it learns (held-out IoU up), and the teacher becomes confident on part of
    the pool (the term is not idle)."""
    imgs, msks = _tiles(n_slices=8)
    test_i, test_m = _tiles(n_slices=2, seed=11)
    labelled_i, labelled_m = imgs[:8], msks[:8]
    unlabelled = imgs[8:]
    model = _model()
    before = evaluate(model, test_i, test_m, torch.device("cpu"))["iou"]
    seen: list[dict] = []
    cfg = TrainConfig(
        steps=160, lr=3e-3, batch_size=4, crop=64, eval_every=40, log_every=20, device="cpu",
        semi=SemiConfig(enabled=True, threshold=0.9, weight=1.0, unlabelled_batch=4),
    )  # fmt: skip
    result = fine_tune(model, labelled_i, labelled_m, cfg, progress=seen.append, unlabelled_images=unlabelled)
    after = evaluate(model, test_i, test_m, torch.device("cpu"))["iou"]
    losses = [d["loss"] for d in seen if d["loss"] is not None]
    assert losses[-1] < 0.7 * losses[0], losses
    assert after >= before + 0.12, f"held-out IoU {before:.3f} -> {after:.3f}"
    semi = result.metrics["semi"]
    assert semi["unlabelled_tiles"] == len(unlabelled)
    assert 0.1 < semi["confident_fraction"] <= 1.0 and np.isfinite(semi["loss_u"]) and semi["loss_u"] > 0
