"""The generated 3-D EM-like volume: shapes, determinism, continuity across slices by setting, foreground range."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.data.volume import SETTINGS, generate_volume

SHAPE = (12, 128, 128)


def _slice_iou(mask: np.ndarray) -> float:
    """Mean IoU of the mask between neighbouring slices (over pairs where either slice has foreground)."""
    vals = []
    for a, b in zip(mask[:-1].astype(bool), mask[1:].astype(bool), strict=True):
        union = np.count_nonzero(a | b)
        if union:
            vals.append(np.count_nonzero(a & b) / union)
    return float(np.mean(vals))


@pytest.fixture(scope="module")
def volumes():
    return {s: generate_volume(SHAPE, setting=s, seed=3) for s in SETTINGS}


def test_shape_dtype_and_classes(volumes):
    for vol in volumes.values():
        assert vol.image.shape == vol.labels.shape == vol.mask.shape == SHAPE
        assert vol.image.dtype == vol.labels.dtype == vol.mask.dtype == np.uint8
        assert set(np.unique(vol.labels)) <= {0, 1}
        assert vol.classes == ("background", "mitochondria")
        assert vol.image.std() > 10  # an image, not a constant
    assert volumes["isotropic"].spacing == (1.0, 1.0, 1.0)
    assert volumes["anisotropic"].spacing[0] == SETTINGS["anisotropic"] > 1


def test_deterministic_by_seed():
    a = generate_volume((6, 64, 64), seed=11)
    b = generate_volume((6, 64, 64), seed=11)
    c = generate_volume((6, 64, 64), seed=12)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)


def test_continuity_isotropic_high_anisotropic_lower(volumes):
    iso = _slice_iou(volumes["isotropic"].mask)
    aniso = _slice_iou(volumes["anisotropic"].mask)
    assert iso > 0.7, iso  # neighbouring isotropic slices: nearly the same objects
    assert aniso < iso - 0.2, (iso, aniso)  # anisotropic: objects change quickly across slices
    assert aniso > 0.05  # ...but they still continue: not independent slices


def test_images_follow_masks_across_slices(volumes):
    """Neighbouring isotropic slices are nearly the same image; far slices are not (objects are 3-D, not copies)."""
    img = volumes["isotropic"].image.astype(np.float64)
    near = np.corrcoef(img[5].ravel(), img[6].ravel())[0, 1]
    far = np.corrcoef(img[0].ravel(), img[11].ravel())[0, 1]
    assert near > far + 0.2, (near, far)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_foreground_fraction_realistic(setting, seed):
    vol = generate_volume((8, 128, 128), setting=setting, seed=seed)
    assert 0.02 <= vol.mask.mean() <= 0.20


def test_mitochondria_are_darker_than_cytoplasm(volumes):
    vol = volumes["isotropic"]
    fg = vol.image[vol.mask > 0].mean()
    bg = np.median(vol.image[vol.mask == 0])
    assert fg < bg - 30


def test_multiclass_adds_nuclei_without_changing_the_image():
    plain = generate_volume((8, 128, 128), seed=4, nuclei=1)
    multi = generate_volume((8, 128, 128), seed=4, nuclei=1, multiclass=True)
    np.testing.assert_array_equal(plain.image, multi.image)
    np.testing.assert_array_equal(plain.mask, multi.mask)
    assert multi.classes == ("background", "mitochondria", "nuclei")
    assert set(np.unique(multi.labels)) == {0, 1, 2}
    assert not np.any((multi.labels == 2) & (plain.mask == 1))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="setting"):
        generate_volume((4, 32, 32), setting="flat")
    with pytest.raises(ValueError, match="anisotropy"):
        generate_volume((4, 32, 32), anisotropy=0.5)
    with pytest.raises(ValueError, match="shape"):
        generate_volume((4, 8, 8))
