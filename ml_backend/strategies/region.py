"""Effort-aware region suggestion: which sub-rectangle of a large tile is most worth painting.

After Atzeni et al., "Deep active learning for suggestive segmentation of biomedical image stacks via optimisation
of Dice scores and traced boundary length", Medical Image Analysis (2022)
(``shared/papers/atzeni-effort-aware-active-learning-histology.txt``). Their query (Eq. 7) picks the region that
maximises expected gain per unit of annotation effort,

    argmax_{n,c} (1 - D~_nc) / R_nc,

where 1 - D~ is the room for improvement of the segmentation (Eq. 6) and R the boundary length still to trace
(Eq. 5, Section 2.2: "we choose to use the structure boundary length as a proxy" for delineation time). Their
regions are whole structures on a slice; here a region is a fixed-size window inside one tile (sliding windows of a
configurable size and stride), and for window w

    gain(w)   = sum over w of the per-pixel uncertainty (the strategy's map, in [0, 1]) or, without one, of the
                expected error 1 - max_c p_c (the expected number of wrongly predicted pixels: the pixel-level room
                for improvement, computable before any label of the tile exists, unlike D~)
    effort(w) = predicted boundary length inside w + region_cost
    score(w)  = gain(w) / effort(w)

The boundary length is the project's effort unit (``ml_backend.training.metrics.boundary_length``): unit pixel edges
between differently predicted classes, both pixels inside the window (edges on the window frame are not traced: a
stroke that overshoots the rectangle is ignored by the loss, as one overshooting the tile frame is clipped). With
several classes, a boundary shared by two organelles counts once, as Atzeni et al. subtract shared boundaries.
``region_cost`` is a constant per suggested region (finding the rectangle, checking its background), in the same
pixel-edge unit; it keeps a window with no predicted boundary at all from winning on a trace of uncertainty.

With the sparse label config, painting inside the rectangle is enough: ``region_training_mask`` marks the pixels
outside it ``IGNORE`` so the loss never sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ml_backend.data.masks import IGNORE

__all__ = [
    "DEFAULT_REGION_COST",
    "RegionSuggestion",
    "boundary_edge_maps",
    "expected_error",
    "region_training_mask",
    "suggest_region",
    "window_positions",
]

DEFAULT_REGION_COST = 64.0  # pixel edges: about the outline of a 16-pixel-wide mitochondrion


@dataclass(frozen=True)
class Rect:
    """A half-open pixel rectangle [x0, x1) x [y0, y1) on an (H, W) image."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, cols) slices for indexing an (H, W) array."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


@dataclass(frozen=True)
class RegionSuggestion(Rect):
    """The suggested window with its gain, effort and score."""

    gain: float
    effort: float  # predicted boundary length inside the window + region_cost
    score: float  # gain / effort


def _hard_labels(probs: np.ndarray) -> np.ndarray:
    """(H, W) foreground probability or (C, H, W) softmax -> (H, W) predicted class map."""
    p = np.asarray(probs)
    if p.ndim == 2:
        return (p >= 0.5).astype(np.int64)
    return np.argmax(p, axis=0).astype(np.int64)


def _check_probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 3 and p.shape[0] < 2:
        raise ValueError(f"class probabilities must have C >= 2 channels, got shape {p.shape}")
    if p.ndim not in (2, 3) or p.shape[-1] == 0 or p.shape[-2] == 0:
        raise ValueError(f"probs must be an (H, W) foreground probability or a (C, H, W) softmax, got {p.shape}")
    if not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("probabilities must be finite values in [0, 1]")
    return p


def expected_error(probs: np.ndarray) -> np.ndarray:
    """(H, W) probability that the predicted class of each pixel is wrong: 1 - max_c p_c."""
    p = _check_probs(probs)
    if p.ndim == 2:
        return np.minimum(p, 1.0 - p)
    return 1.0 - p.max(axis=0)


def boundary_edge_maps(classmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit edges between differently labelled 4-neighbours: vertical (H-1, W) and horizontal (H, W-1) 0/1 maps.

    For a binary map, their total is ``ml_backend.training.metrics.boundary_length``.
    """
    m = np.asarray(classmap)
    if m.ndim != 2:
        raise ValueError(f"boundary_edge_maps expects an (H, W) class map, got shape {m.shape}")
    return (m[1:, :] != m[:-1, :]).astype(np.float64), (m[:, 1:] != m[:, :-1]).astype(np.float64)


def _integral(a: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column: window sums in O(1)."""
    out = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(a, axis=0), axis=1, out=out[1:, 1:])
    return out


def _window_sums(table: np.ndarray, ys: np.ndarray, xs: np.ndarray, wh: int, ww: int) -> np.ndarray:
    """(len(ys), len(xs)) sums of the table's source array over windows [y, y+wh) x [x, x+ww)."""
    y0, x0 = ys[:, None], xs[None, :]
    y1, x1 = y0 + wh, x0 + ww
    return table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]


def window_positions(length: int, window: int, stride: int) -> np.ndarray:
    """Window starts 0, stride, 2*stride, ... and always the last position (length - window): full coverage."""
    if window > length:
        raise ValueError(f"window {window} is larger than the tile side {length}")
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return np.asarray(starts, dtype=np.int64)


def _pair(value: int | tuple[int, int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or any(int(v) < 1 for v in pair):
        raise ValueError(f"{what} must be a positive int or (height, width), got {value!r}")
    return int(pair[0]), int(pair[1])


def suggest_region(
    probs: np.ndarray,
    uncertainty: np.ndarray | None = None,
    *,
    window: int | tuple[int, int] = 256,
    stride: int | tuple[int, int] | None = None,
    min_tile: int = 384,
    region_cost: float = DEFAULT_REGION_COST,
    gain: Literal["auto", "uncertainty", "expected_error"] = "auto",
) -> RegionSuggestion | None:
    """The window of a tile that maximises gain / (boundary length inside + region_cost), or None.

    ``probs``: (H, W) foreground probability or (C, H, W) softmax of the current model. ``uncertainty``: optional
    (H, W) per-pixel uncertainty in [0, 1] (e.g. normalised entropy); gain "auto" uses it when given, else the
    expected error. Tiles whose sides are both <= ``min_tile`` get no suggestion (painting the whole tile is
    cheap); the window is clipped to the tile. ``stride`` defaults to a quarter of the window. Ties go to the
    first window in row-major order. None also when no window has any gain (the model is certain everywhere).
    """
    p = _check_probs(probs)
    height, width = p.shape[-2:]
    if region_cost < 0 or not np.isfinite(region_cost):
        raise ValueError(f"region_cost must be a finite value >= 0, got {region_cost}")
    if max(height, width) <= int(min_tile):
        return None
    wh, ww = _pair(window, "window")
    wh, ww = min(wh, height), min(ww, width)
    sh, sw = _pair(stride, "stride") if stride is not None else (max(1, wh // 4), max(1, ww // 4))
    if gain == "auto":
        gain = "uncertainty" if uncertainty is not None else "expected_error"
    if gain == "uncertainty":
        if uncertainty is None:
            raise ValueError("gain='uncertainty' needs an uncertainty map")
        g = np.asarray(uncertainty, dtype=np.float64)
        if g.shape != (height, width):
            raise ValueError(f"uncertainty has shape {g.shape}, expected {(height, width)} like probs")
        if not np.isfinite(g).all() or g.min() < 0.0:
            raise ValueError("uncertainty must hold finite values >= 0")
    elif gain == "expected_error":
        g = expected_error(p)
    else:
        raise ValueError(f"gain must be 'auto', 'uncertainty' or 'expected_error', got {gain!r}")

    vertical, horizontal = boundary_edge_maps(_hard_labels(p))
    ys, xs = window_positions(height, wh, sh), window_positions(width, ww, sw)
    gains = _window_sums(_integral(g), ys, xs, wh, ww)
    # an edge is inside the window when both of its pixels are: vertical edge (i, j) joins rows i and i+1, so a
    # window of wh rows holds wh-1 of them (and likewise for horizontal edges)
    edges = _window_sums(_integral(vertical), ys, xs, wh - 1, ww) + _window_sums(
        _integral(horizontal), ys, xs, wh, ww - 1
    )
    efforts = edges + float(region_cost)
    if not (gains > 0).any():
        return None
    # effort 0 (region_cost 0, no boundary) with some gain: free information, infinitely good
    scores = np.where(efforts > 0, gains / np.where(efforts > 0, efforts, 1.0), np.inf)
    scores = np.where(gains > 0, scores, -np.inf)
    iy, ix = np.unravel_index(int(np.argmax(scores)), scores.shape)
    y0, x0 = int(ys[iy]), int(xs[ix])
    return RegionSuggestion(
        x0=x0,
        y0=y0,
        x1=x0 + ww,
        y1=y0 + wh,
        gain=float(gains[iy, ix]),
        effort=float(efforts[iy, ix]),
        score=float(scores[iy, ix]),
    )


def region_training_mask(
    mask: np.ndarray,
    region: RegionSuggestion | tuple[int, int, int, int] | None,
    *,
    unpainted_inside: Literal["keep", "background"] = "keep",
) -> np.ndarray:
    """The training mask of a region-labelled tile: pixels outside the rectangle become ``IGNORE``.

    ``mask``: (H, W) int class map of the annotation (``rle.results_to_mask``: dense configs give 0 for unpainted
    pixels, sparse configs IGNORE). ``region``: the rectangle (a RegionSuggestion, any object with x0/y0/x1/y1, or
    an (x0, y0, x1, y1) tuple; half-open pixels); None leaves the mask unchanged (a whole tile was labelled).
    ``unpainted_inside="background"`` turns IGNORE inside the rectangle into background (0), for a protocol where
    annotators paint only the organelles inside the box. Returns a new int64 array.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    out = m.astype(np.int64, copy=True)
    if region is None:
        return out
    if isinstance(region, tuple):
        x0, y0, x1, y1 = (int(v) for v in region)
    else:
        x0, y0, x1, y1 = int(region.x0), int(region.y0), int(region.x1), int(region.y1)
    height, width = out.shape
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"region ({x0}, {y0}, {x1}, {y1}) is empty or outside the {width}x{height} mask")
    if unpainted_inside not in ("keep", "background"):
        raise ValueError(f"unpainted_inside must be 'keep' or 'background', got {unpainted_inside!r}")
    inside = out[y0:y1, x0:x1].copy()
    if unpainted_inside == "background":
        inside[inside == IGNORE] = 0
    out[:] = IGNORE
    out[y0:y1, x0:x1] = inside
    return out
