"""Segmentation metrics shared by training (validation), the benchmark and the registry metadata.

All metrics are binary "foreground vs background": class 0 is background, every class > 0 counts as foreground, so
the same numbers are reported for one- and multi-label brush configs. Pixels whose target is ``IGNORE`` (unpainted in
the sparse config) are excluded, because nothing is known about them.
"""

from __future__ import annotations

import numpy as np

from ml_backend.data.masks import IGNORE  # mask value for unknown pixels (sparse label config: unpainted)


def _binary_pair(pred: np.ndarray, target: np.ndarray, ignore: int | None) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} differs from target shape {target.shape}")
    known = np.ones(target.shape, dtype=bool) if ignore is None else target != ignore
    return (pred > 0) & known, (target > 0) & known


def confusion_counts(pred: np.ndarray, target: np.ndarray, ignore: int | None = IGNORE) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of the foreground, over known pixels.

    Exposed so that callers can sum counts over many tiles and compute one global score (far less noisy than a mean
    of per-tile scores when most tiles hold little foreground).
    """
    p, t = _binary_pair(pred, target, ignore)
    tp = int(np.count_nonzero(p & t))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp


def iou_from_counts(tp: int, fp: int, fn: int) -> float:
    """Jaccard index; 1.0 when prediction and target are both empty (nothing to find, nothing found)."""
    denom = tp + fp + fn
    return 1.0 if denom == 0 else tp / denom


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """Dice / F1; 1.0 when both are empty."""
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom


def iou(pred: np.ndarray, target: np.ndarray, ignore: int | None = IGNORE) -> float:
    """Foreground intersection over union (Jaccard) of a predicted class map against a target mask."""
    return iou_from_counts(*confusion_counts(pred, target, ignore))


def dice(pred: np.ndarray, target: np.ndarray, ignore: int | None = IGNORE) -> float:
    """Foreground Dice coefficient of a predicted class map against a target mask."""
    return dice_from_counts(*confusion_counts(pred, target, ignore))


def boundary_length(mask: np.ndarray) -> float:
    """Length in pixels of the foreground outline an annotator would trace (the effort proxy of Atzeni et al.).

    Counted as the number of unit pixel edges between a foreground and a background pixel (4-neighbours): an s x s
    square inside the image has length 4*s. Edges on the image frame are NOT counted, since a brush stroke that
    overshoots the tile border is clipped for free; so a tile that is entirely foreground (or empty) costs 0.
    Pixels marked ``IGNORE`` count as background (they are not painted).
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"boundary_length expects a 2-D mask, got shape {m.shape}")
    fg = m > 0
    vertical = np.count_nonzero(fg[1:, :] != fg[:-1, :])
    horizontal = np.count_nonzero(fg[:, 1:] != fg[:, :-1])
    return float(vertical + horizontal)
