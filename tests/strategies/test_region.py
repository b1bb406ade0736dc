"""Effort-aware region suggestion (ml_backend.strategies.region) on hand-built probability/uncertainty maps."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.strategies.region import (
    RegionSuggestion,
    boundary_edge_maps,
    expected_error,
    region_training_mask,
    suggest_region,
    window_positions,
)
from ml_backend.training import IGNORE, boundary_length


def _probs(fg: np.ndarray, confident: float = 0.98) -> np.ndarray:
    """(2, H, W) softmax that predicts ``fg`` with the given confidence everywhere."""
    p1 = np.where(fg, confident, 1.0 - confident)
    return np.stack([1.0 - p1, p1]).astype(np.float64)


def test_rectangle_lands_on_the_uncertain_blob():
    h, w = 512, 640
    fg = np.zeros((h, w), bool)
    fg[60:90, 60:90] = True  # a certain object elsewhere
    probs = _probs(fg)
    yy, xx = np.mgrid[:h, :w]
    blob = (yy - 380) ** 2 + (xx - 450) ** 2 < 40**2
    probs[1][blob] = 0.5  # the model hesitates on a blob centred at (x=450, y=380)
    probs[0][blob] = 0.5
    s = suggest_region(probs, window=128, stride=16, min_tile=256)
    assert s is not None
    assert s.x0 <= 450 - 40 and s.x1 >= 450 + 40 and s.y0 <= 380 - 40 and s.y1 >= 380 + 40
    assert (s.width, s.height) == (128, 128)
    # the same with an explicit uncertainty map
    u = np.zeros((h, w))
    u[blob] = 1.0
    s2 = suggest_region(_probs(fg), u, window=128, stride=16, min_tile=256)
    assert s2 is not None and s2.x0 <= 410 and s2.x1 >= 490 and s2.y0 <= 340 and s2.y1 >= 420
    assert s2.gain == pytest.approx(float(blob.sum()))


def test_same_uncertainty_short_boundary_beats_long_boundary():
    """Two windows hold the same uncertainty; the one whose predicted objects are cheap to trace wins."""
    h, w = 256, 512
    fg = np.zeros((h, w), bool)
    # left half: many small objects (long total boundary); right half: one compact object (short boundary)
    for y in range(40, 200, 16):
        for x in range(40, 200, 16):
            fg[y : y + 8, x : x + 8] = True
    fg[80:160, 330:410] = True
    u = np.zeros((h, w))
    u[100:140, 100:140] = 1.0  # same total uncertainty in both halves
    u[100:140, 350:390] = 1.0
    s = suggest_region(_probs(fg), u, window=256, stride=256, min_tile=128, region_cost=10.0)
    assert s is not None and s.x0 == 256, s
    left_edges = boundary_length(fg[:, :256].astype(int))
    right_edges = boundary_length(fg[:, 256:].astype(int))
    assert left_edges > 4 * right_edges
    assert s.effort == pytest.approx(right_edges + 10.0)
    assert s.score == pytest.approx(s.gain / s.effort)


def test_more_gain_wins_at_equal_effort():
    fg = np.zeros((200, 400), bool)
    u = np.zeros((200, 400))
    u[:, :200] = 0.2
    u[:, 200:] = 0.3
    s = suggest_region(_probs(fg), u, window=200, stride=200, min_tile=100)
    assert s is not None and s.x0 == 200


def test_small_tiles_get_no_suggestion():
    fg = np.zeros((256, 256), bool)
    u = np.ones((256, 256))
    assert suggest_region(_probs(fg), u, window=64, min_tile=256) is None
    assert suggest_region(_probs(fg), u, window=64, min_tile=255) is not None


def test_no_suggestion_when_the_model_is_certain_everywhere():
    fg = np.zeros((400, 400), bool)
    fg[100:200, 100:200] = True
    p = np.stack([~fg, fg]).astype(np.float64)  # exactly 0/1 probabilities
    assert suggest_region(p, window=100, min_tile=200) is None


def test_window_is_clipped_to_the_tile_and_stays_inside():
    rng = np.random.default_rng(0)
    p1 = rng.random((300, 900))
    probs = np.stack([1 - p1, p1])
    s = suggest_region(probs, window=(512, 256), min_tile=256)
    assert s is not None
    assert s.height == 300 and s.width == 256
    assert 0 <= s.x0 < s.x1 <= 900 and 0 <= s.y0 < s.y1 <= 300


def test_effort_matches_a_brute_force_window_count():
    rng = np.random.default_rng(3)
    labels = (rng.random((64, 96)) > 0.7).astype(int)
    probs = _probs(labels.astype(bool), confident=0.9)
    u = rng.random((64, 96))
    s = suggest_region(probs, u, window=(24, 32), stride=(8, 8), min_tile=32, region_cost=5.0)
    assert s is not None
    best = None
    for y in window_positions(64, 24, 8):
        for x in window_positions(96, 32, 8):
            crop = labels[y : y + 24, x : x + 32]
            effort = boundary_length(crop) + 5.0
            score = u[y : y + 24, x : x + 32].sum() / effort
            if best is None or score > best[0] + 1e-12:
                best = (score, x, y, effort)
    assert (s.x0, s.y0) == (best[1], best[2])
    assert s.effort == pytest.approx(best[3])


def test_multiclass_boundaries_count_once():
    cm = np.zeros((10, 10), int)
    cm[2:5, 2:8] = 1
    cm[5:8, 2:8] = 2  # shares a 6-pixel boundary with class 1
    v, hz = boundary_edge_maps(cm)
    assert v.sum() + hz.sum() == 4 * 6 + 2 * 3 + 2 * 3 - 6


def test_expected_error_forms():
    p1 = np.array([[0.1, 0.5], [0.9, 1.0]])
    np.testing.assert_allclose(expected_error(p1), [[0.1, 0.5], [0.1, 0.0]])
    np.testing.assert_allclose(expected_error(np.stack([1 - p1, p1])), [[0.1, 0.5], [0.1, 0.0]])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"probs": np.full((1, 10, 10), 0.5)},
        {"probs": np.full((10, 10), 1.5)},
        {"probs": np.full((10, 10), np.nan)},
        {"probs": np.full((600, 600), 0.5), "uncertainty": np.ones((5, 5))},
        {"probs": np.full((600, 600), 0.5), "region_cost": -1.0},
        {"probs": np.full((600, 600), 0.5), "gain": "uncertainty"},
    ],
)
def test_bad_input_is_refused(kwargs):
    with pytest.raises(ValueError):
        suggest_region(**kwargs)


def test_region_training_mask_ignores_outside():
    mask = np.zeros((8, 10), np.int64)
    mask[2:4, 3:5] = 1
    region = RegionSuggestion(x0=2, y0=1, x1=6, y1=5, gain=1.0, effort=1.0, score=1.0)
    out = region_training_mask(mask, region)
    assert (out[1:5, 2:6] == mask[1:5, 2:6]).all()
    outside = np.ones_like(mask, bool)
    outside[1:5, 2:6] = False
    assert (out[outside] == IGNORE).all()
    assert mask.max() == 1 and (mask >= 0).all()  # input untouched
    # sparse annotation: unpainted inside may become background on request
    sparse = np.full((8, 10), IGNORE, np.int64)
    sparse[2, 3] = 1
    kept = region_training_mask(sparse, (2, 1, 6, 5))
    assert (kept[1:5, 2:6] == IGNORE).sum() == 15
    filled = region_training_mask(sparse, (2, 1, 6, 5), unpainted_inside="background")
    assert filled[2, 3] == 1 and (filled[1:5, 2:6] == 0).sum() == 15 and (filled[0] == IGNORE).all()
    assert (region_training_mask(mask, None) == mask).all()
    with pytest.raises(ValueError):
        region_training_mask(mask, (5, 1, 5, 4))
    with pytest.raises(ValueError):
        region_training_mask(mask, (0, 0, 11, 4))
