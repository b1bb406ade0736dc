"""Read EM stacks: multi-page TIFF files or folders of PNG/TIFF slices, 8- or 16-bit, with optional masks.

Slices keep their raw dtype (normalisation happens at inference/training time) and carry their source file and
index so imported tasks can point back to where a tile came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from ml_backend.imaging import ImageDecodeError, decode_image, to_greyscale

__all__ = ["IMAGE_SUFFIXES", "Slice", "read_labelled_stack", "read_stack"]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
_TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class Slice:
    """One 2-D section: ``source`` file, ``index`` within the stack (page or position in the folder), raw image."""

    source: str
    index: int
    image: np.ndarray


def _natural_key(path: Path) -> list[int | str]:
    """Sort "2.png" before "10.png" (folders of slices are rarely zero-padded consistently)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def _slice_files(folder: Path) -> list[Path]:
    files = sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        ),
        key=_natural_key,
    )
    if not files:
        raise ValueError(f"no image slices ({', '.join(IMAGE_SUFFIXES)}) in folder {folder}")
    return files


def _read_tiff_stack(path: Path) -> list[Slice]:
    """All 2-D planes of the first series (ImageJ/OME hyperstacks included); RGB samples stay per plane."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            data = series.asarray()
            axes = series.axes
    except Exception as exc:  # tifffile raises several types on malformed files
        raise ImageDecodeError(f"cannot read TIFF stack {path}: {exc}") from exc
    if "S" in axes and data.shape[axes.index("S")] in (3, 4):  # colour samples (contiguous or planar): (H, W, S)
        data = np.moveaxis(data, axes.index("S"), -1)
        planes = data.reshape(-1, *data.shape[-3:])
    else:
        planes = data.reshape(-1, *data.shape[-2:])
    return [Slice(str(path), i, np.ascontiguousarray(p)) for i, p in enumerate(planes)]


def read_stack(path: str | Path) -> list[Slice]:
    """Slices of a multi-page TIFF file, a single image file, or a folder of PNG/TIFF slices (natural sort order)."""
    path = Path(path)
    if path.is_dir():
        out = []
        for i, f in enumerate(_slice_files(path)):
            try:
                out.append(Slice(str(f), i, decode_image(f.read_bytes())))
            except ImageDecodeError as exc:
                raise ImageDecodeError(f"{f}: {exc}") from exc
        return out
    if not path.exists():
        raise FileNotFoundError(f"stack not found: {path}")
    if path.suffix.lower() in _TIFF_SUFFIXES:
        return _read_tiff_stack(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [Slice(str(path), 0, decode_image(path.read_bytes()))]
    raise ValueError(f"unsupported stack {path}: expected a folder or a {', '.join(IMAGE_SUFFIXES)} file")


def _pair(images: list[Slice], masks: list[Slice]) -> list[tuple[Slice, Slice]]:
    """Pair by file stem when both sides are folders with the same stems, else by order (same count required)."""
    img_stems = [Path(s.source).stem for s in images]
    mask_stems = [Path(s.source).stem for s in masks]
    folder_based = len(set(img_stems)) == len(images) and len(set(mask_stems)) == len(masks)
    if folder_based and set(img_stems) == set(mask_stems):
        by_stem = {Path(m.source).stem: m for m in masks}
        return [(s, by_stem[Path(s.source).stem]) for s in images]
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} image slices but {len(masks)} mask slices; they must correspond one to one")
    return list(zip(images, masks, strict=True))


def read_labelled_stack(
    images_path: str | Path, masks_path: str | Path, threshold: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """(Z, H, W) raw images and (Z, H, W) uint8 {0,1} masks; anti-aliased masks are foreground at >= ``threshold``.

    Masks that are already binary (bool, or max <= 1) are taken as they are, whatever the threshold.
    """
    pairs = _pair(read_stack(images_path), read_stack(masks_path))
    raws, binaries = [], []
    for img, mask in pairs:
        m = mask.image
        if m.ndim == 3:
            m = to_greyscale(m)
        if img.image.shape[:2] != m.shape:
            raise ValueError(
                f"mask {mask.source} has shape {m.shape}, image {img.source} has {img.image.shape[:2]}; they must match"
            )
        binary = m > 0 if m.dtype == bool or m.max() <= 1 else m >= threshold
        raws.append(img.image)
        binaries.append(binary.astype(np.uint8))
    shapes = {r.shape for r in raws}
    if len(shapes) > 1:
        raise ValueError(f"slices of {images_path} differ in shape {sorted(shapes)}; a stack needs one shape")
    return np.stack(raws), np.stack(binaries)
