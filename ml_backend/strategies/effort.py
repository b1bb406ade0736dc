"""Effort-aware selection (after Atzeni et al., Medical Image Analysis 2022) and the annotation-effort measure.

Annotation effort is measured as boundary length: the number of unit pixel edges between a foreground (class > 0)
and a background pixel among 4-neighbours, NOT counting the image frame. This is the same definition as
``ml_backend.training.metrics.boundary_length`` (an s x s square inside the tile costs 4 s), so the benchmark's
effort axis and this strategy's effort estimate are in the same unit.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
from pydantic import Field

from .base import (
    PoolBatch,
    Selection,
    Strategy,
    aggregate,
    as_float,
    hard_labels,
    ranked_selection,
    register_strategy,
)
from .params import StrategyParams
from .uncertainty import pixel_entropy

Gain = Literal["uncertainty", "dice"]
GAINS: tuple[str, ...] = get_args(Gain)


def boundary_lengths(masks: np.ndarray) -> np.ndarray:
    """(n, H, W) class maps -> (n,) float64 foreground boundary length in pixels (vectorised over the batch)."""
    m = np.asarray(masks)
    if m.ndim != 3:
        raise ValueError(f"boundary_lengths expects (n, H, W) masks, got shape {m.shape}")
    fg = m > 0
    vertical = np.count_nonzero(fg[:, 1:, :] != fg[:, :-1, :], axis=(1, 2))
    horizontal = np.count_nonzero(fg[:, :, 1:] != fg[:, :, :-1], axis=(1, 2))
    return (vertical + horizontal).astype(np.float64)


def annotation_effort(mask: np.ndarray) -> float:
    """Boundary length (pixels) an annotator traces to paint ``mask`` (H, W): the effort proxy of Atzeni et al.

    Pixels <= 0 (background, IGNORE) count as background. Use it on the TRUE mask of each selected tile to plot
    quality against effort in simulated active learning.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"annotation_effort expects a 2-D mask, got shape {m.shape}")
    return float(boundary_lengths(m[None])[0])


def soft_dice(probs: np.ndarray, smooth: float = 1.0, floor: float = 0.05) -> np.ndarray:
    """(n, C, H, W) -> (n,) estimated Dice of the predicted (argmax) mask, from the model's own probabilities.

    Per foreground class c (mean over c = 1..C-1), with m = [argmax = c] and p = p_c, the expected confusion counts
    if labels were drawn from p: TP = sum_m p, FP = sum_m (1 - p), FN = sum_(not m) p [p >= floor];
        D~ = (2 TP + s) / (2 TP + FP + FN + s)
    The floor treats pixels predicted background with p < floor as certain: a softmax's diffuse tail (p ~ 1e-3 over
    65k pixels) would otherwise add up to a phantom object and make every confidently empty tile look wrong.
    s = 1 gives a confidently empty tile D~ = 1 (no room for improvement).
    """
    p = as_float(probs)
    n = p.shape[0]
    pred = hard_labels(p).reshape(n, -1)
    dices = []
    for c in range(1, p.shape[1]):  # loop over classes only (C is small); pixels are vectorised
        pc = p[:, c].reshape(n, -1)
        mc = pred == c
        tp = np.where(mc, pc, 0.0).sum(axis=1, dtype=np.float64)
        fp = mc.sum(axis=1) - tp
        fn = np.where(~mc & (pc >= floor), pc, 0.0).sum(axis=1, dtype=np.float64)
        dices.append((2.0 * tp + smooth) / (2.0 * tp + fp + fn + smooth))
    return np.mean(dices, axis=0)


@register_strategy("effort_aware")
class EffortAwareStrategy(Strategy):
    """Gain per unit of annotation effort (after Atzeni et al. 2022, Eq. 7: argmax (1 - D~) / R).

        effort(x) = max(boundary_length(argmax_c p(x)), floor)       predicted-mask perimeter, pixels
        gain(x)   = agg_j H(p_j(x))        (gain="uncertainty", default; the entropy of ``entropy``)
                  = 1 - D~(x)              (gain="dice": room for improvement, D~ = ``soft_dice``)
        value(x)  = gain(x) / effort(x)

    The floor (``effort_floor`` pixels; default (H + W) / 4, i.e. the outline of a small object) keeps empty tiles
    from being free: without it a tile with nothing predicted would win with any gain. The summary also holds
    ``effort`` and ``gain`` per tile. Atzeni et al. select per region and subtract shared boundaries; tiles here are
    painted whole, so the whole predicted outline is the estimate. Forward passes: 1.
    """

    class Params(StrategyParams):
        gain: Gain = Field("uncertainty", description="expected gain: the tile's entropy, or 1 - estimated Dice")
        # a floor above any tile's outline only makes every effort equal; 1e6 pixel edges is far beyond that
        effort_floor: float | None = Field(
            None, gt=0.0, le=1e6, description="least effort of a tile, pixel edges (null: (H + W) / 4)"
        )

    summary_keys = ("value", "effort", "gain")
    config: Params

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self.gain = self.config.gain
        self.effort_floor = self.config.effort_floor

    def _summarize(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        p = as_float(batch.probs)
        h, w = p.shape[2:]
        floor = self.effort_floor if self.effort_floor is not None else (h + w) / 4.0
        effort = np.maximum(boundary_lengths(hard_labels(p)), floor)
        gain = aggregate(pixel_entropy(p), self.aggregation) if self.gain == "uncertainty" else 1.0 - soft_dice(p)
        return {"value": gain / effort, "effort": effort, "gain": gain}

    def _select(self, summary, k, *, labelled_embeddings, seed) -> Selection:
        return ranked_selection(summary["value"], k)
