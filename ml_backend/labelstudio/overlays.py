"""Display-only results for the labelling page: the model's uncertainty layer and the suggested region to paint.

Why: an annotator who sees WHERE the model is unsure (the reason the tile was served first) and WHICH part of a
large tile is worth painting spends their time where it pays (issue 12). Both travel inside the prediction, as
results of two extra controls of the label config (``label_config/*_uncertainty.xml``)::

    <BrushLabels name="tag" toName="image">              the mask: the only control training reads
    <BrushLabels name="uncertainty" toName="image">      display only: brush RLE of thresholded uncertainty
    <RectangleLabels name="suggestion" toName="image">   display only: the sub-region worth painting

Guarantees:

* a result Label Studio would reject is never built: every item is checked against the parsed label config
  (control, object and label exist, type matches the control, RLE decodes to exactly W*H*4 values, rectangle
  inside 0..100 %) with ``validate_result`` before it is returned (``OverlayError`` otherwise);
* an annotation that still holds the uncertainty layer or the rectangle (Label Studio copies prediction regions
  into the annotation on submit) trains exactly as one without them: ``strip_non_label_results`` keeps only the
  mask control's brush regions (``rle.results_to_mask`` reads only that control as well).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from ml_backend.strategies.region import Rect, region_training_mask, suggest_region

from .labelconfig import BrushConfig, LabelConfigError, parse_label_config
from .rle import mask_to_results, results_to_mask

__all__ = [
    "SUGGESTION_CONTROL",
    "UNCERTAINTY_CONTROL",
    "ControlSpec",
    "OverlayConfig",
    "OverlayError",
    "PixelRect",
    "annotation_training_mask",
    "normalised_entropy",
    "overlay_config_of",
    "overlay_results",
    "parse_overlay_config",
    "prediction_results",
    "strip_non_label_results",
    "suggestion_rect_from_results",
    "suggestion_results",
    "uncertainty_results",
    "validate_result",
    "validate_results",
]

log = logging.getLogger(__name__)

UNCERTAINTY_CONTROL = "uncertainty"  # default name of the display-only <BrushLabels>
SUGGESTION_CONTROL = "suggestion"  # default name of the display-only <RectangleLabels>
_PERCENT_SLACK = 1e-6  # float rounding of x + width at the right edge
# Images up to this many pixels get their brush RLE fully decoded by validate_result; larger ones have the header's
# value count checked (the SDK's pure-Python decoder would cost seconds per tile in /predict; our RLE comes from the
# SDK's own encoder of an exactly H x W array, so the header check is what can go wrong).
FULL_DECODE_PIXELS = 128 * 128


class OverlayError(ValueError):
    """An overlay result cannot be built or would be rejected by Label Studio (reason in the message)."""


@dataclass(frozen=True)
class PixelRect(Rect):
    """A half-open pixel rectangle [x0, x1) x [y0, y1) on an image, checked before it becomes a result."""

    def check(self, height: int, width: int) -> None:
        """OverlayError unless the rectangle is non-empty and inside an image of this size."""
        if not (0 <= self.x0 < self.x1 <= width and 0 <= self.y0 < self.y1 <= height):
            raise OverlayError(f"rectangle {self} is empty or outside the {width}x{height} image")


@dataclass(frozen=True)
class ControlSpec:
    """One control tag of a label config, as far as result validation needs it."""

    name: str
    tag: str  # lower case, e.g. "brushlabels", "rectanglelabels"
    to_names: tuple[str, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class OverlayConfig:
    """The mask control (what training reads) plus the optional display-only controls of a label config."""

    mask: BrushConfig
    controls: dict[str, ControlSpec] = field(repr=False)
    uncertainty: ControlSpec | None
    suggestion: ControlSpec | None
    xml: str = field(repr=False, default="")

    @property
    def display_only(self) -> frozenset[str]:
        """from_names of the controls that are never training labels."""
        return frozenset(c.name for c in (self.uncertainty, self.suggestion) if c is not None)


def parse_overlay_config(
    xml: str,
    *,
    uncertainty_control: str = UNCERTAINTY_CONTROL,
    suggestion_control: str = SUGGESTION_CONTROL,
) -> OverlayConfig:
    """Parse a label config into the mask control and the display-only controls (absent ones are None).

    ``parse_label_config`` (and so training) never picks a brush named "uncertainty" as the mask, whatever the XML
    order; LabelConfigError when a custom ``uncertainty_control`` name is the mask control, or when a display-only
    control paints on another image than the mask.
    """
    return _parse_overlay(xml, uncertainty_control, suggestion_control)


@lru_cache(maxsize=64)
def _parse_overlay(xml: str, uncertainty_control: str, suggestion_control: str) -> OverlayConfig:
    mask = parse_label_config(xml)
    interface = _sdk_interface(xml)  # parse_label_config succeeded, so the XML parses
    controls = {
        str(c.name): ControlSpec(
            name=str(c.name),
            tag=str(c.tag).lower(),
            to_names=tuple(str(n) for n in (c.to_name or [])),
            labels=tuple(str(label) for label in (c.labels or [])),
        )
        for c in interface.controls
    }
    if mask.from_name == uncertainty_control:
        raise LabelConfigError(
            f"the mask control picked for training is <BrushLabels name={uncertainty_control!r}>, the display-only "
            "uncertainty layer: put the mask's <BrushLabels> before it in the label config"
        )
    uncertainty = controls.get(uncertainty_control)
    suggestion = controls.get(suggestion_control)
    for spec, tag in ((uncertainty, "brushlabels"), (suggestion, "rectanglelabels")):
        if spec is None:
            continue
        if spec.tag != tag:
            raise LabelConfigError(f"control {spec.name!r} is a <{spec.tag}>; the overlay needs a <{tag}> of that name")
        if mask.to_name not in spec.to_names:
            raise LabelConfigError(
                f"control {spec.name!r} paints on {list(spec.to_names)}, not on the mask's image {mask.to_name!r}"
            )
        if not spec.labels:
            raise LabelConfigError(f"control {spec.name!r} has no <Label>")
    return OverlayConfig(mask=mask, controls=controls, uncertainty=uncertainty, suggestion=suggestion, xml=xml)


def overlay_config_of(config: OverlayConfig | BrushConfig | str) -> OverlayConfig:
    """The overlay view of any config form: XML is parsed, a BrushConfig through the XML it was parsed from.

    A BrushConfig built by hand (no XML) has no display-only controls: mask only, no overlays.
    """
    if isinstance(config, OverlayConfig):
        return config
    if isinstance(config, str):
        return parse_overlay_config(config)
    if config.xml:
        return parse_overlay_config(config.xml)
    return OverlayConfig(mask=config, controls={}, uncertainty=None, suggestion=None)


def _as_overlay_config(config: OverlayConfig | BrushConfig | str) -> OverlayConfig:
    return overlay_config_of(config)


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """(C, H, W) softmax -> (H, W) float32 entropy divided by log C, so 0 = certain and 1 = uniform.

    The overlay thresholds are then comparable across configs with different numbers of classes.
    """
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim != 3 or p.shape[0] < 2:
        raise ValueError(f"probs must have shape (C>=2, H, W), got {p.shape}")
    ent = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=0)
    return np.clip(ent / np.float32(math.log(p.shape[0])), 0.0, 1.0).astype(np.float32)


def _new_id() -> str:
    return uuid.uuid4().hex[:10]


def uncertainty_results(
    uncertainty: np.ndarray,
    config: OverlayConfig | str,
    *,
    thresholds: Sequence[float] = (0.5,),
    min_pixels: int = 1,
    readonly: bool = True,
) -> list[dict]:
    """Brush results of the uncertainty layer: one region per level, level k = thresholds[k] <= u < thresholds[k+1].

    Level k is painted with the k-th label of the uncertainty control (config order), so a config with labels
    "Uncertain" and "Very uncertain" and thresholds (0.4, 0.7) shows two colours. Levels with fewer than
    ``min_pixels`` pixels are left out. ``readonly`` asks Label Studio not to let annotators edit the layer.
    Returns [] when the config has no uncertainty control. Every item is validated before it is returned.
    """
    from label_studio_sdk.converter.brush import mask2rle

    cfg = _as_overlay_config(config)
    if cfg.uncertainty is None:
        return []
    u = np.asarray(uncertainty, dtype=np.float64)
    if u.ndim != 2 or u.size == 0:
        raise OverlayError(f"uncertainty must be a non-empty (H, W) map, got shape {u.shape}")
    if not np.isfinite(u).all():
        raise OverlayError("uncertainty map holds NaN or infinite values")
    levels = [float(t) for t in thresholds]
    if not levels:
        raise OverlayError("at least one uncertainty threshold is needed")
    if any(not 0.0 < t <= 1.0 for t in levels) or levels != sorted(set(levels)):
        raise OverlayError(f"thresholds must be strictly increasing values in (0, 1], got {list(thresholds)}")
    if len(levels) > len(cfg.uncertainty.labels):
        raise OverlayError(
            f"{len(levels)} uncertainty levels but the {cfg.uncertainty.name!r} control has only "
            f"{len(cfg.uncertainty.labels)} label(s): {list(cfg.uncertainty.labels)}"
        )
    height, width = u.shape
    results = []
    for k, low in enumerate(levels):
        high = levels[k + 1] if k + 1 < len(levels) else math.inf
        band = (u >= low) & (u < high)
        if int(band.sum()) < max(1, int(min_pixels)):
            continue
        item: dict[str, Any] = {
            "id": _new_id(),
            "from_name": cfg.uncertainty.name,
            "to_name": cfg.mask.to_name,
            "type": "brushlabels",
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "readonly": bool(readonly),
            "value": {
                "format": "rle",
                "rle": [int(v) for v in mask2rle(band.astype(np.uint8) * 255)],
                "brushlabels": [cfg.uncertainty.labels[k]],
            },
        }
        validate_result(item, cfg, height, width)
        results.append(item)
    return results


def suggestion_results(
    rect: PixelRect,
    config: OverlayConfig | str,
    height: int,
    width: int,
    *,
    score: float | None = None,
) -> list[dict]:
    """The suggested region as one RectangleLabels result in percent coordinates ([] without a suggestion control).

    The annotator may move or resize it: training reads the rectangle of the submitted annotation
    (``suggestion_rect_from_results``), not the suggested one.
    """
    cfg = _as_overlay_config(config)
    if cfg.suggestion is None:
        return []
    rect.check(height, width)
    item: dict[str, Any] = {
        "id": _new_id(),
        "from_name": cfg.suggestion.name,
        "to_name": cfg.mask.to_name,
        "type": "rectanglelabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {
            "x": 100.0 * rect.x0 / width,
            "y": 100.0 * rect.y0 / height,
            "width": 100.0 * rect.width / width,
            "height": 100.0 * rect.height / height,
            "rotation": 0,
            "rectanglelabels": [cfg.suggestion.labels[0]],
        },
    }
    if score is not None:
        item["score"] = float(score)
    validate_result(item, cfg, height, width)
    return [item]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def validate_result(item: Any, config: OverlayConfig | str, height: int, width: int) -> None:
    """Raise OverlayError unless Label Studio would accept ``item`` as a region of this config on a W x H image.

    Checks Label Studio's own rules (label-studio-sdk ``LabelInterface.validate_region``: control and object exist,
    type matches the control, labels belong to it, rectangle inside 0..100 %) plus what it only notices when the
    editor renders the region: image size, brush RLE of exactly W*H*4 values (header always; fully decoded up to
    ``FULL_DECODE_PIXELS``), finite numbers.
    """
    from label_studio_sdk.converter.brush import decode_rle

    cfg = _as_overlay_config(config)
    if not isinstance(item, dict):
        raise OverlayError(f"a result must be an object, got {type(item).__name__}")
    spec = cfg.controls.get(str(item.get("from_name")))
    if spec is None:
        raise OverlayError(f"from_name {item.get('from_name')!r} is not a control of the label config")
    if item.get("to_name") not in spec.to_names:
        raise OverlayError(f"to_name {item.get('to_name')!r} is not an object of control {spec.name!r}")
    if str(item.get("type", "")).lower() != spec.tag:
        raise OverlayError(f"type {item.get('type')!r} does not match control {spec.name!r} (<{spec.tag}>)")
    if item.get("original_width") != width or item.get("original_height") != height:
        raise OverlayError(
            f"original size {item.get('original_width')}x{item.get('original_height')} is not the image's "
            f"{width}x{height}"
        )
    if "score" in item and not _finite(item["score"]):
        raise OverlayError(f"score {item['score']!r} is not a finite number")
    value = item.get("value")
    if not isinstance(value, dict):
        raise OverlayError("result has no 'value' object")
    labels = value.get(spec.tag)
    if not isinstance(labels, list) or not labels or any(label not in spec.labels for label in labels):
        raise OverlayError(f"labels {labels!r} are not labels of control {spec.name!r} ({list(spec.labels)})")
    if spec.tag == "brushlabels":
        if value.get("format") != "rle":
            raise OverlayError(f"brush format {value.get('format')!r}; only 'rle' is supported")
        rle = value.get("rle")
        if not isinstance(rle, list) or not rle or any(not isinstance(v, int) or not 0 <= v <= 255 for v in rle):
            raise OverlayError("brush RLE must be a non-empty list of byte values (0..255)")
        if len(rle) < 6:
            raise OverlayError("brush RLE is shorter than its header")
        declared = int.from_bytes(bytes(rle[:4]), "big")  # the header's value count, what the editor allocates
        if declared != width * height * 4:
            raise OverlayError(f"brush RLE declares {declared} values, expected {width * height * 4} (W*H*4)")
        if width * height <= FULL_DECODE_PIXELS:  # the SDK's decoder is pure Python: about 1 s per megapixel
            try:
                size = decode_rle(bytes(rle)).size
            except (ValueError, TypeError, IndexError) as exc:
                raise OverlayError(f"brush RLE does not decode: {exc}") from None
            if size != width * height * 4:
                raise OverlayError(f"brush RLE decodes to {size} values, expected {width * height * 4} (W*H*4)")
    elif spec.tag == "rectanglelabels":
        coords = [value.get(k) for k in ("x", "y", "width", "height")]
        if not all(_finite(c) for c in coords):
            raise OverlayError(f"rectangle coordinates must be finite numbers, got {coords}")
        x, y, w, h = (float(c) for c in coords)
        if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > 100 + _PERCENT_SLACK or y + h > 100 + _PERCENT_SLACK:
            raise OverlayError(f"rectangle x={x} y={y} width={w} height={h} is not inside the image (percent)")
        if value.get("rotation", 0) not in (0, 0.0):
            raise OverlayError("a rotated suggestion rectangle is not supported")
    errors = _sdk_interface(cfg.xml).validate_region(item, return_errors=True)
    if errors:
        raise OverlayError("Label Studio's validation rejects the result: " + "; ".join(map(str, errors)))


@lru_cache(maxsize=64)
def _sdk_interface(xml: str) -> Any:
    from label_studio_sdk.label_interface import LabelInterface

    return LabelInterface(xml)


def validate_results(results: Iterable[Any], config: OverlayConfig | str, height: int, width: int) -> list[dict]:
    """All items validated (``validate_result``); the first bad one raises OverlayError naming its index."""
    cfg = _as_overlay_config(config)
    out = []
    for i, item in enumerate(results):
        try:
            validate_result(item, cfg, height, width)
        except OverlayError as exc:
            raise OverlayError(f"result #{i}: {exc}") from None
        out.append(item)
    return out


def strip_non_label_results(results: Any, config: OverlayConfig | BrushConfig | str) -> list[dict]:
    """Only the brush regions of the mask control: the uncertainty layer, the rectangle and anything else go.

    An annotation submitted with the pre-annotated uncertainty layer and suggestion rectangle still in it then
    trains exactly as one without them. Non-list input gives [] (webhook payloads may lack the key).
    """
    if isinstance(config, str):
        mask = parse_label_config(config)
    elif isinstance(config, OverlayConfig):
        mask = config.mask
    else:
        mask = config
    if not isinstance(results, list):
        return []
    return [
        item
        for item in results
        if isinstance(item, dict)
        and item.get("from_name") == mask.from_name
        and str(item.get("type", "")).lower() == "brushlabels"
    ]


def suggestion_rect_from_results(
    results: Any, config: OverlayConfig | str, height: int, width: int
) -> PixelRect | None:
    """The pixel rectangle of the annotation's (last) suggestion region, clipped to the image; None without one.

    Percent coordinates are rounded outwards so that a rectangle built by ``suggestion_results`` comes back as the
    same pixels. A rectangle the annotator rotated cannot be mapped to pixels and raises OverlayError.
    """
    cfg = _as_overlay_config(config)
    if cfg.suggestion is None or not isinstance(results, list):
        return None
    found: PixelRect | None = None
    for item in results:
        if not isinstance(item, dict) or item.get("from_name") != cfg.suggestion.name:
            continue
        value = item.get("value") or {}
        coords = [value.get(k) for k in ("x", "y", "width", "height")]
        if not all(_finite(c) for c in coords):
            raise OverlayError(f"suggestion rectangle has non-numeric coordinates {coords}")
        if value.get("rotation", 0) not in (0, 0.0):
            raise OverlayError("the suggestion rectangle was rotated: cannot map it to pixels")
        x, y, w, h = (float(c) for c in coords)
        eps = 1e-6
        x0 = max(0, math.floor(x * width / 100.0 + eps))
        y0 = max(0, math.floor(y * height / 100.0 + eps))
        x1 = min(width, math.ceil((x + w) * width / 100.0 - eps))
        y1 = min(height, math.ceil((y + h) * height / 100.0 - eps))
        if x1 > x0 and y1 > y0:
            found = PixelRect(x0, y0, x1, y1)
    return found


def annotation_training_mask(
    results: Any,
    config: OverlayConfig | str,
    height: int,
    width: int,
    *,
    use_region: Literal["auto", "always", "never"] = "auto",
    unpainted_inside: Literal["keep", "background"] = "background",
) -> np.ndarray:
    """int64 (H, W) training mask of a submitted annotation: display-only layers dropped, suggestion box applied.

    The mask comes from the mask control only (``strip_non_label_results`` + ``rle.results_to_mask``), so the
    uncertainty layer and the rectangle never become labels. With ``use_region="auto"`` the annotation's suggestion
    rectangle (as submitted, possibly moved by the annotator) limits a SPARSE config's labels to the box: pixels
    outside are IGNORE, unpainted pixels inside are background (``unpainted_inside="background"``: the annotator
    traces the organelles in the box, the effort model of ``strategies.region``) or stay unknown ("keep"). Dense
    configs label the whole tile, so "auto" leaves them unchanged; "always"/"never" force the choice.
    Raises rle.AnnotationError / OverlayError for an annotation that cannot become a mask.
    """
    cfg = _as_overlay_config(config)
    if use_region not in ("auto", "always", "never"):
        raise ValueError(f"use_region must be 'auto', 'always' or 'never', got {use_region!r}")
    mask = results_to_mask(strip_non_label_results(results, cfg), cfg.mask, height, width)
    apply = use_region == "always" or (use_region == "auto" and cfg.mask.mode == "sparse")
    rect = suggestion_rect_from_results(results, cfg, height, width) if apply else None
    if rect is None:
        return mask
    return region_training_mask(mask, (rect.x0, rect.y0, rect.x1, rect.y1), unpainted_inside=unpainted_inside)


# --------------------------------------------------------------------------------------------------- one builder
_BAND = 512  # rows per band: full-size float temporaries of an 8624 x 8416 section would take gigabytes


def _classmap(probs: np.ndarray) -> np.ndarray:
    """(C, H, W) -> uint8 (H, W) argmax, in row bands."""
    classmap = np.empty(probs.shape[1:], dtype=np.uint8)
    for row in range(0, probs.shape[1], _BAND):
        classmap[row : row + _BAND] = probs[:, row : row + _BAND].argmax(axis=0)
    return classmap


def _entropy(probs: np.ndarray) -> np.ndarray:
    """``normalised_entropy`` in row bands (bounded temporaries on whole sections)."""
    out = np.empty(probs.shape[1:], dtype=np.float32)
    for row in range(0, probs.shape[1], _BAND):
        out[row : row + _BAND] = normalised_entropy(probs[:, row : row + _BAND])
    return out


def overlay_results(
    probs: np.ndarray,
    config: OverlayConfig | BrushConfig | str,
    settings: Any,
    *,
    uncertainty: np.ndarray | None = None,
) -> list[dict]:
    """The display-only results of one prediction: the uncertainty layer and, on large tiles, the suggested region.

    ``uncertainty`` defaults to the normalised entropy of ``probs``. Settings: ``uncertainty_levels``,
    ``uncertainty_min_pixels``, ``suggest_min_tile``, ``suggest_window``, ``suggest_stride``, ``suggest_region_cost``,
    ``suggest_max_pixels`` (``ml_backend.config``). Raises OverlayError (or ValueError from the region search);
    everything returned has passed ``validate_results``.
    """
    cfg = overlay_config_of(config)
    if cfg.uncertainty is None and cfg.suggestion is None:
        return []
    p = np.asarray(probs)
    if p.ndim != 3 or p.shape[0] < 2:
        raise OverlayError(f"probs must have shape (C>=2, H, W), got {p.shape}")
    height, width = p.shape[1:]
    u = _entropy(p) if uncertainty is None else np.asarray(uncertainty, dtype=np.float32)
    out: list[dict] = []
    if cfg.uncertainty is not None:
        out += uncertainty_results(
            u, cfg, thresholds=settings.uncertainty_levels, min_pixels=settings.uncertainty_min_pixels
        )
    min_tile = int(settings.suggest_min_tile)
    if cfg.suggestion is not None and max(height, width) > min_tile and height * width <= settings.suggest_max_pixels:
        region = suggest_region(
            p,
            u,
            window=int(settings.suggest_window),
            stride=int(settings.suggest_stride) or None,
            min_tile=min_tile,
            region_cost=float(settings.suggest_region_cost),
        )
        if region is not None:
            rect = PixelRect(region.x0, region.y0, region.x1, region.y1)
            out += suggestion_results(rect, cfg, height, width, score=region.score)
    return validate_results(out, cfg, height, width)


def prediction_results(
    probs: np.ndarray,
    config: OverlayConfig | BrushConfig | str,
    settings: Any,
    *,
    uncertainty: np.ndarray | None = None,
    label: str = "",
) -> list[dict]:
    """Every result of one pre-annotation: the mask regions, then the overlays when the config has their controls.

    The ONE builder of /predict and the re-scoring job, so a task shows the same layers whichever path predicted
    it. An overlay that cannot be built or would be rejected (OverlayError, a config whose display-only controls
    are unusable) is dropped with a warning: the mask is always sent. The mask regions carry the mean confidence of
    the predicted foreground as their score.
    """
    mask_config = config.mask if isinstance(config, OverlayConfig) else config
    if isinstance(mask_config, str):
        mask_config = parse_label_config(mask_config)
    classmap = _classmap(probs)
    foreground = classmap > 0
    confidence = None
    if foreground.any():
        total, count = 0.0, 0
        for row in range(0, probs.shape[1], _BAND):
            fg = foreground[row : row + _BAND]
            total += float(probs[:, row : row + _BAND].max(axis=0)[fg].sum())
            count += int(fg.sum())
        confidence = total / count
    results = mask_to_results(classmap, mask_config, score=confidence)
    try:
        return results + overlay_results(probs, config, settings, uncertainty=uncertainty)
    except (OverlayError, LabelConfigError, ValueError) as exc:
        log.warning("%sno uncertainty/suggestion overlay (mask sent alone): %s", f"{label}: " if label else "", exc)
        return results
