"""The loss must ignore IGNORE pixels completely (value and gradient) and behave on edge cases."""

import pytest
import torch

from ml_backend.training.losses import segmentation_loss, soft_dice_loss
from ml_backend.training.metrics import IGNORE


def _target() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    t = (torch.rand((2, 16, 16), generator=g) < 0.1).long()
    t[:, :, 8:] = IGNORE  # right half unknown (sparse label config)
    return t


@pytest.mark.parametrize("dice_weight", [0.0, 1.0])
def test_changing_logits_at_ignored_pixels_changes_nothing(dice_weight):
    target = _target()
    g = torch.Generator().manual_seed(1)
    base = torch.randn((2, 2, 16, 16), generator=g)
    other = base.clone()
    other[:, :, :, 8:] = torch.randn((2, 2, 16, 8), generator=g) * 10  # wild values where nothing is known

    a = base.clone().requires_grad_(True)
    b = other.clone().requires_grad_(True)
    la = segmentation_loss(a, target, dice_weight=dice_weight)
    lb = segmentation_loss(b, target, dice_weight=dice_weight)
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, atol=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-7)
    assert a.grad[:, :, :, 8:].abs().max() == 0  # no gradient flows into unknown pixels
    assert a.grad[:, :, :, :8].abs().max() > 0


def test_loss_is_low_for_correct_confident_logits_and_high_for_wrong():
    target = _target()
    known = target.clamp(min=0)
    good = torch.stack([(1 - known) * 10.0 - 5, known * 10.0 - 5], dim=1).float()
    bad = -good
    assert segmentation_loss(good, target) < 0.05
    assert segmentation_loss(bad, target) > 5


def test_all_ignored_gives_zero_with_graph():
    logits = torch.randn((1, 2, 4, 4), requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 4, 4), IGNORE))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.abs().max() == 0


def test_soft_dice_defined_without_foreground():
    logits = torch.zeros((1, 2, 4, 4))
    logits[:, 0] = 10
    assert soft_dice_loss(logits, torch.zeros((1, 4, 4), dtype=torch.long)).item() == pytest.approx(0.0, abs=1e-3)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="do not match"):
        segmentation_loss(torch.zeros((1, 2, 4, 4)), torch.zeros((1, 5, 4), dtype=torch.long))
