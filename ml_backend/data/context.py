"""2.5D context: a tile plus the same xy window on neighbouring slices, as extra input channels.

Why: annotators decide what is a mitochondrion by looking at neighbouring sections (a dark body that continues
across sections is an organelle, a vesicle or a membrane fold is not), and the model can use the same cue when it
gets slices z + offset (default z-1, z, z+1) as channels of one input (``UNet(in_channels=len(offsets))``).

Two gaps need a rule, and the model must never see a hole:

* **Edge of the stack** (z + offset < 0 or >= number of slices): the nearest existing slice is replicated, i.e.
  the index is clamped into the stack (for z = 0 and offset -1 that is the centre slice itself). This is what
  ``numpy.pad(mode="edge")`` does along z, and it keeps the channel a real image of the same stack.
* **Missing neighbour** (a slice inside the stack's range that is absent from the import, e.g. a damaged section
  left out, or a project that imported every other slice): the centre slice is replicated. A farther slice would
  claim a continuity the data does not show; the centre says "no extra information" (the same input the model gets
  on a single-slice stack, so the model degrades to 2-D instead of failing).

Which rule was used for every channel is returned as well (``ContextTile.filled``), so tests and callers can see it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# the offsets parser lives in config (the CONTEXT_OFFSETS validator needs it; config is the bottom layer)
from ml_backend.config import DEFAULT_OFFSETS, parse_offsets, resolve_offsets

__all__ = [
    "ContextTile",
    "SliceReader",
    "as_channels",
    "context_batch",
    "model_offsets",
    "parse_offsets",
    "read_context",
    "resolve_offsets",
    "slice_reader",
    "spatial_shape",
]


@dataclass(frozen=True)
class SliceReader:
    """A stack seen slice by slice: ``n_slices`` in the stack's z range, ``read(z)`` the (H, W) image of slice z or
    None when that slice is absent. Build one with ``slice_reader`` from an array, a mapping or a callable."""

    n_slices: int
    read: Callable[[int], np.ndarray | None]


def slice_reader(
    stack: np.ndarray | Mapping[int, np.ndarray] | Sequence[np.ndarray | None] | SliceReader,
    n_slices: int | None = None,
    present: Sequence[bool] | np.ndarray | None = None,
) -> SliceReader:
    """A ``SliceReader`` for a (Z, H, W) array (``present``: optional (Z,) bool of imported slices), a mapping
    {z: image} (missing keys are absent slices; ``n_slices`` defaults to max key + 1) or a list with None holes."""
    if isinstance(stack, SliceReader):
        return stack
    if isinstance(stack, np.ndarray):
        if stack.ndim != 3:
            raise ValueError(f"a stack array must be (Z, H, W), got {stack.shape}")
        z = stack.shape[0]
        mask = np.ones(z, dtype=bool) if present is None else np.asarray(present, dtype=bool)
        if mask.shape != (z,):
            raise ValueError(f"present must have shape ({z},), got {mask.shape}")
        return SliceReader(z, lambda k: stack[k] if mask[k] else None)
    if isinstance(stack, Mapping):
        if not stack and n_slices is None:
            raise ValueError("an empty mapping needs n_slices")
        n = n_slices if n_slices is not None else max(int(k) for k in stack) + 1
        return SliceReader(n, lambda k: stack.get(k))
    items = list(stack)
    return SliceReader(len(items) if n_slices is None else n_slices, lambda k: items[k] if k < len(items) else None)


@dataclass(frozen=True)
class ContextTile:
    """``image`` (C, h, w) channels in ``offsets`` order; ``source_z`` the slice each channel was read from;
    ``filled`` per channel: "" (the neighbour itself), "edge" (clamped into the stack) or "missing" (centre)."""

    image: np.ndarray
    offsets: tuple[int, ...]
    source_z: tuple[int, ...]
    filled: tuple[str, ...]


def read_context(
    stack: np.ndarray | Mapping[int, np.ndarray] | Sequence[np.ndarray | None] | SliceReader,
    z: int,
    y: int,
    x: int,
    size: int | tuple[int, int],
    offsets: Sequence[int] = DEFAULT_OFFSETS,
) -> ContextTile:
    """The tile at (z, y, x) of ``size`` on slices z + offset, stacked as channels (edge/missing rules above).

    Raises ValueError when the centre slice itself is absent or the window leaves the image.
    """
    reader = slice_reader(stack)
    offs = resolve_offsets(offsets)
    h, w = (size, size) if isinstance(size, int) else size
    if not 0 <= z < reader.n_slices:
        raise ValueError(f"slice {z} outside the stack (0..{reader.n_slices - 1})")
    centre = reader.read(z)
    if centre is None:
        raise ValueError(f"the tile's own slice {z} is absent")
    centre = np.asarray(centre)
    if y < 0 or x < 0 or h < 1 or w < 1 or y + h > centre.shape[0] or x + w > centre.shape[1]:
        raise ValueError(f"window y={y} x={x} {h}x{w} leaves slice {z} of shape {centre.shape}")
    channels, source, filled = [], [], []
    for o in offs:
        k = min(max(z + o, 0), reader.n_slices - 1)
        how = "" if k == z + o else "edge"
        img = centre if k == z else reader.read(k)
        if img is None:
            k, img, how = z, centre, "missing"
        img = np.asarray(img)
        if img.shape[:2] != centre.shape[:2]:
            raise ValueError(f"slice {k} has shape {img.shape}, slice {z} has {centre.shape}; a stack needs one shape")
        channels.append(img[y : y + h, x : x + w])
        source.append(k)
        filled.append(how)
    return ContextTile(np.stack(channels), offs, tuple(source), tuple(filled))


def context_batch(
    stack: np.ndarray | Mapping[int, np.ndarray] | Sequence[np.ndarray | None] | SliceReader,
    positions: np.ndarray,
    size: int,
    offsets: Sequence[int] = DEFAULT_OFFSETS,
) -> np.ndarray:
    """(N, C, size, size) context tiles for (N, 3) positions [z, y, x] of one stack (e.g. a benchmark pool)."""
    reader = slice_reader(stack)
    pos = np.asarray(positions, dtype=np.int64)
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"positions must be (N, 3) [z, y, x], got {pos.shape}")
    offs = resolve_offsets(offsets)
    if len(pos) == 0:
        return np.zeros((0, len(offs), size, size), dtype=np.float32)
    return np.stack([read_context(reader, int(z), int(y), int(x), size, offs).image for z, y, x in pos])


def model_offsets(model: object) -> tuple[int, ...]:
    """The slice offsets a model (or its hparams dict) was built for: ``hparams["context_offsets"]`` when recorded,
    else (0,) for a
    one-channel model (every model before 2.5D context) or a centred range for an unrecorded C-channel one."""
    hp = model if isinstance(model, Mapping) else getattr(model, "hparams", None) or {}
    recorded = hp.get("context_offsets")
    if recorded:
        return resolve_offsets(recorded)
    c = int(hp.get("in_channels", 1))
    return tuple(range(-(c // 2), c - c // 2))


def spatial_shape(image: np.ndarray) -> tuple[int, int]:
    """(H, W) of a model input: an (H, W) image or a (C, H, W) context tile."""
    shape = np.shape(image)
    if len(shape) not in (2, 3):
        raise ValueError(f"expected an (H, W) image or a (C, H, W) context tile, got shape {shape}")
    return int(shape[-2]), int(shape[-1])


def as_channels(image: np.ndarray) -> np.ndarray:
    """(C, H, W) view of a model input ((H, W) becomes (1, H, W)), so one code path feeds any channel count."""
    arr = np.asarray(image)
    spatial_shape(arr)
    return arr[None] if arr.ndim == 2 else arr
