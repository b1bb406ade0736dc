"""Augmentation keeps image and mask aligned and keeps IGNORE / class values intact."""

import numpy as np
import pytest
import torch

from ml_backend.training.augment import AugmentConfig, augment_batch, sample_crops
from ml_backend.training.metrics import IGNORE


def _pair(n: int = 16, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 2, (n, size, size), generator=g)
    masks[:, :4, :] = IGNORE
    images = masks.float().unsqueeze(1)  # image == mask: alignment is then checkable pixel by pixel
    return images, masks


def test_geometric_transforms_keep_alignment():
    images, masks = _pair()
    cfg = AugmentConfig(contrast=0, brightness=0, noise=0)
    out_i, out_m = augment_batch(images, masks, torch.Generator().manual_seed(3), cfg)
    assert out_i.shape == images.shape and out_m.shape == masks.shape and out_m.dtype == torch.long
    assert torch.equal(out_i[:, 0], out_m.float())
    assert not torch.equal(out_m, masks)  # something was transformed
    # Every output is one of the 8 dihedral transforms of its input.
    for k in range(len(masks)):
        variants = []
        for r in range(4):
            rot = masks[k].rot90(r, dims=(0, 1))
            variants += [rot, rot.flip(-1)]
        assert any(torch.equal(out_m[k], v) for v in variants)


def test_elastic_keeps_alignment_and_label_values():
    images, masks = _pair()
    cfg = AugmentConfig(flip=False, rot90=False, contrast=0, brightness=0, noise=0, elastic_prob=1.0, elastic_alpha=3)
    out_i, out_m = augment_batch(images, masks, torch.Generator().manual_seed(1), cfg)
    assert set(torch.unique(out_m).tolist()) <= {IGNORE, 0, 1}
    assert not torch.equal(out_m, masks)
    # Bilinear image vs nearest mask: they agree wherever the warped image is not between labels.
    crisp = (out_i[:, 0] - out_i[:, 0].round()).abs() < 1e-4
    assert torch.equal(out_i[:, 0][crisp].round(), out_m.float()[crisp])


def test_intensity_jitter_changes_image_only():
    images, masks = _pair()
    cfg = AugmentConfig(flip=False, rot90=False)
    out_i, out_m = augment_batch(images, masks, torch.Generator().manual_seed(2), cfg)
    assert torch.equal(out_m, masks)
    assert not torch.allclose(out_i, images)


def test_same_generator_seed_is_reproducible():
    images, masks = _pair()
    a = augment_batch(images, masks, torch.Generator().manual_seed(5))
    b = augment_batch(images, masks, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_sample_crops_pads_small_tiles_with_ignore():
    rng = np.random.default_rng(0)
    img = np.arange(100, dtype=np.float32).reshape(10, 10)
    msk = (img > 50).astype(np.int64)
    x, y = sample_crops([img], [msk], np.array([0, 0]), 16, rng)
    assert x.shape == (2, 1, 16, 16) and y.shape == (2, 16, 16)
    assert (y[:, 10:, :] == IGNORE).all() and (y[:, :, 10:] == IGNORE).all()
    assert torch.equal(x[0, 0, :10, :10], torch.from_numpy(img))
    big = np.arange(40 * 40, dtype=np.float32).reshape(40, 40)
    x, y = sample_crops([big], [(big % 2).astype(np.int64)], np.array([0]), 16, rng)
    assert torch.equal((x[0, 0] % 2).long(), y[0])  # the mask crop is the image crop's window


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError):
        augment_batch(torch.zeros((2, 1, 8, 8)), torch.zeros((2, 8, 9), dtype=torch.long), torch.Generator())
