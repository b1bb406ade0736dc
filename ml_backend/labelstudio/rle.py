"""Brush masks <-> Label Studio results, through label-studio-sdk's RLE codec (the one Label Studio's editor uses).

Label Studio stores a brush region as RLE of a flat RGBA buffer (H * W * 4 bytes); the mask is the alpha channel.
Encoding uses `label_studio_sdk.converter.brush.mask2rle` (alpha 255 where painted); decoding uses `decode_rle` and
thresholds alpha at 128, so anti-aliased stroke edges with faint alpha do not count as painted.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from .labelconfig import BrushConfig

__all__ = ["IGNORE", "AnnotationError", "decode_region", "mask_to_results", "results_to_mask"]

IGNORE = -1  # unknown pixel (sparse configs: unpainted); the same value as ml_backend.training.IGNORE
ALPHA_THRESHOLD = 128


class AnnotationError(ValueError):
    """An annotation that cannot become a mask (wrong size, unknown label, undecodable RLE)."""


def mask_to_results(
    classmap: np.ndarray,
    config: BrushConfig,
    *,
    score: float | None = None,
    include_background: bool = False,
) -> list[dict]:
    """One `brushlabels` result per non-empty foreground class of an (H, W) class-index map.

    Background is left unpainted (dense: that is its meaning; sparse: annotators confirm background themselves)
    unless `include_background` and the config has a background brush.
    """
    from label_studio_sdk.converter.brush import mask2rle

    cm = np.asarray(classmap)
    if cm.ndim != 2 or cm.size == 0:
        raise ValueError(f"classmap must be a non-empty (H, W) array, got shape {cm.shape}")
    height, width = cm.shape
    classes = list(range(1, config.num_classes))
    if include_background and config.background_label is not None:
        classes.append(0)
    results = []
    for cls in classes:
        painted = cm == cls
        if not painted.any():
            continue
        item: dict[str, Any] = {
            "id": uuid.uuid4().hex[:10],
            "from_name": config.from_name,
            "to_name": config.to_name,
            "type": "brushlabels",
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "value": {
                "format": "rle",
                "rle": [int(v) for v in mask2rle(painted.astype(np.uint8) * 255)],
                "brushlabels": [config.label_of(cls)],
            },
        }
        if score is not None:
            item["score"] = float(score)
        results.append(item)
    return results


def decode_region(rle: Any, height: int, width: int) -> np.ndarray:
    """Boolean (H, W) mask of one RLE region; AnnotationError when it is not RLE of an H x W RGBA buffer."""
    from label_studio_sdk.converter.brush import decode_rle

    if not isinstance(rle, (list, tuple)) or not rle:
        raise AnnotationError(f"brush region has no RLE data (got {type(rle).__name__})")
    try:
        data = bytes(rle)  # ValueError/TypeError for values outside 0..255 or non-integers
        flat = decode_rle(data)
    except (ValueError, TypeError, IndexError) as exc:
        raise AnnotationError(f"brush RLE cannot be decoded: {exc}") from exc
    expected = height * width * 4
    if flat.size != expected:
        raise AnnotationError(
            f"brush RLE holds {flat.size} values, expected {expected} for a {width}x{height} image "
            "(the annotation was drawn on an image of another size)"
        )
    return flat.reshape(height, width, 4)[:, :, 3] >= ALPHA_THRESHOLD


def results_to_mask(results: list[dict], config: BrushConfig, height: int, width: int) -> np.ndarray:
    """int64 (H, W) class map of an annotation's results for this config's brush control.

    Dense configs start from background (0), sparse configs from unknown (IGNORE). Background strokes are applied
    first and foreground strokes over them, so a foreground stroke wins where both were painted. Results of other
    controls (choices, other tags) are ignored. Raises AnnotationError for a region drawn on an image of another
    size, a label that is not in the config, a region without label, or RLE that does not decode.
    """
    if height <= 0 or width <= 0:
        raise AnnotationError(f"image size must be positive, got {width}x{height}")
    if results is None:
        results = []
    if not isinstance(results, list):
        raise AnnotationError(f"annotation result must be a list, got {type(results).__name__}")
    mask = np.full((height, width), 0 if config.mode == "dense" else IGNORE, dtype=np.int64)
    layers: list[tuple[int, np.ndarray]] = []
    for i, item in enumerate(results):
        if not isinstance(item, dict):
            raise AnnotationError(f"result #{i} is {type(item).__name__}, expected an object")
        if item.get("from_name") != config.from_name or str(item.get("type", "")).lower() != "brushlabels":
            continue
        ow, oh = item.get("original_width"), item.get("original_height")
        if (ow is not None and int(ow) != width) or (oh is not None and int(oh) != height):
            raise AnnotationError(f"result #{i} was drawn on a {ow}x{oh} image but the task image is {width}x{height}")
        value = item.get("value") or {}
        labels = value.get("brushlabels") or item.get("brushlabels") or []
        if not labels:
            raise AnnotationError(f"result #{i} is a brush region without a label")
        try:
            classes = {config.class_of(str(label)) for label in labels}
        except ValueError as exc:
            raise AnnotationError(f"result #{i}: {exc}") from None
        if len(classes) != 1:
            raise AnnotationError(f"result #{i} carries several labels {labels}; one label per brush region")
        fmt = value.get("format", "rle")
        if fmt != "rle":
            raise AnnotationError(f"result #{i} has brush format {fmt!r}; only 'rle' is supported")
        rle = value.get("rle", item.get("rle"))
        try:
            region = decode_region(rle, height, width)
        except AnnotationError as exc:
            raise AnnotationError(f"result #{i}: {exc}") from None
        layers.append((classes.pop(), region))
    # background first, then foreground classes in order: foreground wins on overlap
    for cls, region in sorted(layers, key=lambda layer: layer[0]):
        mask[region] = cls
    return mask
