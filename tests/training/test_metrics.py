"""Metric functions against hand-computed values."""

import numpy as np
import pytest

from ml_backend.training.metrics import IGNORE, boundary_length, confusion_counts, dice, iou


def test_iou_and_dice_hand_computed():
    pred = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])
    target = np.array([[0, 1, 1, 0], [0, 1, 1, 0]])
    # tp = 2, fp = 2, fn = 2 -> IoU 2/6, Dice 4/8
    assert confusion_counts(pred, target) == (2, 2, 2)
    assert iou(pred, target) == pytest.approx(1 / 3)
    assert dice(pred, target) == pytest.approx(0.5)


def test_ignore_pixels_are_excluded():
    pred = np.array([[1, 1, 1, 0]])
    target = np.array([[1, IGNORE, IGNORE, 0]])
    assert iou(pred, target) == 1.0  # the two false positives fall on unknown pixels
    assert dice(pred, target) == 1.0
    assert iou(pred, target, ignore=None) == pytest.approx(1 / 3)  # IGNORE as background when ignoring is off


def test_multiclass_counts_as_foreground_and_empty_cases():
    assert iou(np.array([[2, 0]]), np.array([[1, 0]])) == 1.0
    assert iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0  # nothing to find, nothing found
    assert iou(np.ones((3, 3)), np.zeros((3, 3))) == 0.0
    assert dice(np.zeros((3, 3)), np.ones((3, 3))) == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        iou(np.zeros((2, 2)), np.zeros((3, 3)))


def test_boundary_length_of_square_and_shapes():
    m = np.zeros((10, 10), np.uint8)
    m[2:6, 3:8] = 1  # 4 x 5 rectangle inside the image: perimeter 2 * (4 + 5)
    assert boundary_length(m) == 18.0
    sq = np.zeros((8, 8), np.int64)
    sq[1:4, 1:4] = 1
    assert boundary_length(sq) == 12.0  # 3x3 square: 4 * 3
    single = np.zeros((5, 5))
    single[2, 2] = 1
    assert boundary_length(single) == 4.0
    # Touching the image border: the frame is free, only the two inner sides count.
    corner = np.zeros((6, 6))
    corner[:3, :2] = 1
    assert boundary_length(corner) == 5.0
    assert boundary_length(np.ones((4, 4))) == 0.0
    assert boundary_length(np.zeros((4, 4))) == 0.0
    two = np.zeros((9, 9))
    two[1:3, 1:3] = 1
    two[5:8, 5:8] = 2
    assert boundary_length(two) == 8.0 + 12.0


def test_boundary_length_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        boundary_length(np.zeros((2, 3, 3)))
