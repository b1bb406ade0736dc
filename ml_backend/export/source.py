"""A stack to export, read one slice at a time (bounded memory) and checked before anything is written.

Inputs are the importer's: a multi-page TIFF, a single image, or a folder of PNG/TIFF slices (natural sort order,
``data.stacks``). Why a separate reader: ``data.stacks.read_stack`` loads the whole stack, which an export of a
stack larger than memory cannot do. Every slice's size is read from its header up front, so slices of different
sizes or an unreadable header are refused before the export writes a byte; a slice whose pixels fail to decode
later raises ``ExportInputError`` naming the file.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from ml_backend.data.stacks import _TIFF_SUFFIXES, IMAGE_SUFFIXES, _slice_files
from ml_backend.imaging import ImageDecodeError, decode_image, normalize

__all__ = ["ExportInputError", "StackSource", "open_stack"]


class ExportInputError(ValueError):
    """Input the export cannot use (message says which file and why); nothing is written."""


def _header_shape(path: Path) -> tuple[int, int]:
    """(H, W) of one image file from its header alone (no pixel decoding)."""
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                shape = tif.pages[0].shape
                planar = len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4)
                return (int(shape[1]), int(shape[2])) if planar else (int(shape[0]), int(shape[1]))
        with Image.open(path) as im:
            return int(im.height), int(im.width)
    except Exception as exc:  # decoders raise many types for bad files
        raise ExportInputError(f"unreadable slice {path}: {type(exc).__name__}: {exc}") from exc


@dataclass
class StackSource:
    """``n_slices`` slices of one (H, W) ``shape``; ``read(z)`` the raw slice, ``normalised(z)`` the model input
    (per-slice robust normalisation, as ``imaging.load_image`` does for a task image), cached for 2.5D context."""

    path: Path
    shape: tuple[int, int]
    files: list[Path]  # one per slice (folder), or [path] for a TIFF stack / single image
    n_slices: int
    _cache: collections.OrderedDict = field(default_factory=collections.OrderedDict, repr=False)
    cache_slices: int = 4

    @property
    def key(self) -> str:
        """The importer's ``stack`` value for this input (tasks' ``data.stack``): the resolved path."""
        return str(self.path)

    def slice_name(self, z: int) -> str:
        return str(self.files[z]) if len(self.files) == self.n_slices and len(self.files) > 1 else f"{self.path}#{z}"

    def read(self, z: int) -> np.ndarray:
        if not 0 <= z < self.n_slices:
            raise IndexError(f"slice {z} outside 0..{self.n_slices - 1}")
        try:
            if self.path.is_dir():
                arr = decode_image(self.files[z].read_bytes())
            elif self.path.suffix.lower() in _TIFF_SUFFIXES:
                with tifffile.TiffFile(self.path) as tif:
                    arr = tif.series[0].pages[z].asarray()
                if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
                    arr = np.moveaxis(arr, 0, -1)
            else:
                arr = decode_image(self.path.read_bytes())
        except (ImageDecodeError, OSError, ValueError, RuntimeError) as exc:
            raise ExportInputError(f"unreadable slice {self.slice_name(z)}: {exc}") from exc
        if tuple(arr.shape[:2]) != self.shape:
            raise ExportInputError(f"slice {self.slice_name(z)} is {arr.shape[:2]}, the stack is {self.shape}")
        return arr

    def normalised(self, z: int) -> np.ndarray:
        """float32 (H, W) in [0, 1]; the last ``cache_slices`` are kept (neighbours are read up to C times)."""
        if z in self._cache:
            self._cache.move_to_end(z)
            return self._cache[z]
        img = normalize(self.read(z))
        self._cache[z] = img
        while len(self._cache) > self.cache_slices:
            self._cache.popitem(last=False)
        return img


def open_stack(path: str | Path) -> StackSource:
    """Check a stack (every slice's size, from headers) and return its reader; ``ExportInputError`` otherwise."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise ExportInputError(f"stack not found: {p}")
    if p.is_dir():
        try:
            files = _slice_files(p)
        except ValueError as exc:
            raise ExportInputError(str(exc)) from exc
        shapes: dict[tuple[int, int], list[Path]] = {}
        for f in files:
            shapes.setdefault(_header_shape(f), []).append(f)
        if len(shapes) > 1:
            detail = "; ".join(f"{s[1]}x{s[0]}: {len(fs)} slice(s), e.g. {fs[0].name}" for s, fs in shapes.items())
            raise ExportInputError(f"slices of {p} differ in size ({detail}); a stack needs one size")
        return StackSource(p, next(iter(shapes)), files, len(files))
    suffix = p.suffix.lower()
    if suffix in _TIFF_SUFFIXES:
        try:
            with tifffile.TiffFile(p) as tif:
                series = tif.series[0]
                pages = len(series.pages)
                page_shapes = {tuple(pg.shape) for pg in tif.pages}
                n_pages = len(tif.pages)
                shape = tuple(series.pages[0].shape)
        except Exception as exc:  # tifffile raises several types on malformed files
            raise ExportInputError(f"cannot read TIFF stack {p}: {type(exc).__name__}: {exc}") from exc
        if len(page_shapes) > 1 or pages != n_pages:
            raise ExportInputError(
                f"pages of {p} differ in size ({', '.join(str(s) for s in sorted(page_shapes))}); a stack needs one "
                "size"
            )
        planar = len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4)
        hw = (int(shape[1]), int(shape[2])) if planar else (int(shape[0]), int(shape[1]))
        return StackSource(p, hw, [p], pages)
    if suffix in IMAGE_SUFFIXES:
        return StackSource(p, _header_shape(p), [p], 1)
    raise ExportInputError(f"unsupported stack {p}: expected a folder or a {', '.join(IMAGE_SUFFIXES)} file")
