"""The measured z radius of the stack rule (thumbnails of same-xy tiles across slices) and softrank batches."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ml_backend.data.volume import generate_volume
from ml_backend.strategies.batch import (
    AUTO_FALLBACK_Z_RADIUS,
    BatchConfig,
    Neighbourhood,
    StackPositions,
    estimate_z_radius,
    resolve_neighbourhood,
    select_batch,
    softrank_keys,
    stack_conflicts,
    thumbnail,
)


def _tiles(volume: np.ndarray, tile: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Every (z, y, x) grid tile of a (Z, H, W) volume: thumbnails and [stack, z, y, x, size] rows."""
    thumbs, pos = [], []
    for z in range(volume.shape[0]):
        for y in range(0, volume.shape[1] - tile + 1, tile):
            for x in range(0, volume.shape[2] - tile + 1, tile):
                thumbs.append(thumbnail(volume[z, y : y + tile, x : x + tile]))
                pos.append([0, z, y, x, tile])
    return np.stack(thumbs), np.array(pos)


@given(scale=st.floats(0.1, 10.0), shift=st.floats(-100.0, 100.0), seed=st.integers(0, 1000))
@settings(max_examples=30, deadline=None)
def test_thumbnail_ignores_brightness_and_contrast(scale, shift, seed):
    img = np.random.default_rng(seed).random((40, 24)) * 255
    t = thumbnail(img)
    assert t.shape == (64,)
    np.testing.assert_allclose(t.mean(), 0.0, atol=1e-9)
    np.testing.assert_allclose(thumbnail(img * scale + shift), t, atol=1e-6)


def test_thumbnail_of_a_context_tile_is_its_centre_slice_and_bad_shapes_fail():
    rng = np.random.default_rng(0)
    stack = rng.random((3, 16, 16))
    np.testing.assert_allclose(thumbnail(stack), thumbnail(stack[1]))
    with pytest.raises(ValueError, match="thumbnail"):
        thumbnail(np.zeros(5))


def test_isotropic_stacks_get_a_larger_radius_than_anisotropic_ones():
    """The same generator, z spacing 1 vs 5 x the pixel size: neighbouring slices stay alike over more slices."""
    iso = generate_volume((16, 128, 128), setting="isotropic", seed=3)
    aniso = generate_volume((16, 128, 128), setting="anisotropic", seed=3)
    r_iso = estimate_z_radius(*_tiles(iso.image))
    r_aniso = estimate_z_radius(*_tiles(aniso.image))
    assert r_iso > r_aniso
    assert r_iso >= 2


def test_independent_slices_give_radius_zero_and_repeated_slices_the_maximum():
    rng = np.random.default_rng(1)
    independent = rng.random((10, 96, 96))
    assert estimate_z_radius(*_tiles(independent)) == 0
    one = rng.random((96, 96))
    repeated = np.stack([one + 0.01 * rng.random((96, 96)) for _ in range(10)])
    assert estimate_z_radius(*_tiles(repeated), max_radius=4) == 4


def test_a_single_slice_or_too_few_pairs_give_zero():
    rng = np.random.default_rng(2)
    thumbs, pos = _tiles(rng.random((1, 96, 96)))
    assert estimate_z_radius(thumbs, pos) == 0
    assert estimate_z_radius(thumbs[:1], pos[:1]) == 0


def test_resolve_neighbourhood_measures_auto_and_falls_back_without_features():
    rng = np.random.default_rng(3)
    one = rng.random((96, 96))
    thumbs, pos = _tiles(np.stack([one] * 6))
    sp = StackPositions.from_array(pos)
    assert resolve_neighbourhood(Neighbourhood(z_radius="auto"), thumbs, sp).z_radius == 5
    assert resolve_neighbourhood(Neighbourhood(z_radius="auto"), None, sp).z_radius == AUTO_FALLBACK_Z_RADIUS
    assert resolve_neighbourhood(Neighbourhood(z_radius=2), thumbs, sp).z_radius == 2
    with pytest.raises(ValueError, match="resolve"):
        stack_conflicts(sp, 0, sp, Neighbourhood(z_radius="auto"))
    with pytest.raises(ValueError, match="z_radius"):
        Neighbourhood(z_radius=-2)
    with pytest.raises(ValueError, match="z_radius"):
        Neighbourhood(z_radius="far")


def test_auto_radius_batch_takes_one_tile_per_repeated_column_and_reports_the_radius():
    """6 xy positions, each the same image on 8 slices: with the measured radius a batch holds one per position."""
    rng = np.random.default_rng(4)
    base = rng.random((64, 96))
    stack = np.stack([base + 0.01 * rng.random(base.shape) for _ in range(8)])
    thumbs, pos = _tiles(stack)
    scores = rng.random(len(pos))
    emb = rng.normal(size=(len(pos), 4))
    cfg = BatchConfig(method="top", neighbourhood=Neighbourhood(z_radius="auto"), feature_radius=0.0)
    sel = select_batch(scores, emb, pos, 6, config=cfg, z_features=thumbs)
    assert sel.z_radius == 7
    assert sel.relaxed == 0
    assert len({(pos[i, 2], pos[i, 3]) for i in sel.order}) == 6


def test_softrank_draws_in_proportion_to_inverse_rank():
    """Kirsch et al. 2023: P(first pick = rank r) = r^-1 / H_n."""
    n, draws = 5, 4000
    scores = np.array([5.0, 4, 3, 2, 1])
    first = np.array([np.argmax(softrank_keys(scores, seed)) for seed in range(draws)])
    expected = (1 / np.arange(1, n + 1)) / (1 / np.arange(1, n + 1)).sum()
    observed = np.bincount(first, minlength=n) / draws
    np.testing.assert_allclose(observed, expected, atol=0.03)
    np.testing.assert_array_equal(softrank_keys(scores, 7), softrank_keys(scores, 7))


def test_stochastic_batches_keep_the_rules_and_depend_on_the_seed():
    rng = np.random.default_rng(5)
    pos = np.array([[0, z, (g % 4) * 64, (g // 4) * 64, 64] for g in range(8) for z in range(4)])
    group = np.repeat(np.arange(8), 4)
    scores = rng.random(len(pos))
    emb = rng.normal(size=(len(pos), 3))
    cfg = BatchConfig(method="stochastic", neighbourhood=Neighbourhood(z_radius=3), feature_radius=0.0)
    orders = [select_batch(scores, emb, pos, 8, config=cfg, seed=s).order for s in range(6)]
    for order in orders:
        assert sorted(group[order].tolist()) == list(range(8))
    assert len({tuple(o.tolist()) for o in orders}) > 1
    np.testing.assert_array_equal(orders[0], select_batch(scores, emb, pos, 8, config=cfg, seed=0).order)
