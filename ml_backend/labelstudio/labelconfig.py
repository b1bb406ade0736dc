"""Read what the backend needs from a Label Studio label config: which brush tag, which image, which labels.

Nothing is hard-coded: `from_name`, `to_name`, the task data key of the image and the label names all come from the
project's config (parsed with label-studio-sdk's `LabelInterface`), so renaming a tag or a label in Label Studio
does not break pre-annotations or training.

Class indices: 0 = background; the foreground labels get 1, 2, ... in config order. A label named "Background"
(case-insensitive) makes the config *sparse*: annotators paint background explicitly and unpainted pixels are
unknown (ignored by the loss). Without it the config is *dense*: every unpainted pixel is background.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

__all__ = ["BACKGROUND_NAMES", "DISPLAY_ONLY_BRUSHES", "BrushConfig", "LabelConfigError", "parse_label_config"]

BACKGROUND_NAMES = frozenset({"background"})
# <BrushLabels> names that are display only (the model's uncertainty layer, ``labelstudio.overlays``): never the mask
# control, wherever they stand in the XML.
DISPLAY_ONLY_BRUSHES = frozenset({"uncertainty"})


class LabelConfigError(ValueError):
    """The label config cannot be used by this backend (no BrushLabels on an Image, bad XML, ...)."""


@dataclass(frozen=True)
class BrushConfig:
    """The brush-segmentation part of a label config."""

    from_name: str  # name of the <BrushLabels> control
    to_name: str  # name of the <Image> object it paints on
    image_key: str  # task data key of the image, e.g. "image" for value="$image"
    labels: tuple[str, ...]  # every label of the control, in config order (Background included when present)
    background_label: str | None  # the explicit background brush (sparse configs), else None
    mode: Literal["dense", "sparse"]
    # The XML this was parsed from: lets the overlay code (uncertainty layer, suggestion rectangle) find the
    # display-only controls from a BrushConfig alone. Not part of equality or repr.
    xml: str = field(default="", compare=False, repr=False)

    @property
    def foreground_labels(self) -> tuple[str, ...]:
        return tuple(label for label in self.labels if label != self.background_label)

    @property
    def num_classes(self) -> int:
        """Background + one class per foreground label (the model's output channels)."""
        return 1 + len(self.foreground_labels)

    def class_of(self, label: str) -> int:
        """Class index of a label name; ValueError for a label that is not in the config."""
        if label == self.background_label:
            return 0
        try:
            return 1 + self.foreground_labels.index(label)
        except ValueError:
            raise ValueError(
                f"label {label!r} is not in the {self.from_name!r} BrushLabels of the label config "
                f"(known: {', '.join(self.labels)})"
            ) from None

    def label_of(self, class_index: int) -> str:
        """Label name of a class index; class 0 has a name only in sparse configs (the background brush)."""
        idx = int(class_index)
        if idx == 0:
            if self.background_label is None:
                raise ValueError("class 0 (background) has no brush label in a dense config: it is left unpainted")
            return self.background_label
        if not 1 <= idx < self.num_classes:
            raise ValueError(f"class index {idx} is out of range for {self.num_classes} classes")
        return self.foreground_labels[idx - 1]


def parse_label_config(xml: str) -> BrushConfig:
    """The first `<BrushLabels>` control whose `toName` is an `<Image>` with a `$key` value, skipping display-only
    controls (``DISPLAY_ONLY_BRUSHES``: the uncertainty layer is never the mask, whatever the order of the XML).

    Cached by XML text (every /predict request carries the config). Raises LabelConfigError with what is missing.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("label config is empty: expected Label Studio XML with <BrushLabels> and <Image>")
    return _parse(xml)


@lru_cache(maxsize=64)
def _parse(xml: str) -> BrushConfig:
    from label_studio_sdk.label_interface import LabelInterface

    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises its own XML syntax errors and assorted ValueErrors
        raise LabelConfigError(f"label config is not valid Label Studio XML: {exc}") from exc
    all_brushes = [c for c in interface.controls if str(c.tag).lower() == "brushlabels"]
    brushes = [c for c in all_brushes if str(c.name) not in DISPLAY_ONLY_BRUSHES]
    if all_brushes and not brushes:
        raise LabelConfigError(
            f"the only <BrushLabels> is the display-only {str(all_brushes[0].name)!r} layer; add a <BrushLabels> for "
            "the mask (see label_config/dense_uncertainty.xml)"
        )
    if not brushes:
        tags = sorted({str(c.tag) for c in interface.controls}) or ["none"]
        raise LabelConfigError(
            "label config has no <BrushLabels> control (found controls: "
            f"{', '.join(tags)}); this backend predicts brush masks: use label_config/dense.xml or sparse.xml"
        )
    objects = {str(obj.name): obj for obj in interface.objects}
    problems = []
    for control in brushes:
        images = [
            objects[name]
            for name in control.to_name or []
            if name in objects and str(objects[name].tag).lower() == "image"
        ]
        if not images:
            problems.append(
                f"<BrushLabels name={control.name!r}> does not point to an <Image> (toName={control.to_name})"
            )
            continue
        image = images[0]
        value = str(image.value or "")
        if not value.startswith("$") or len(value) < 2:
            problems.append(f"<Image name={image.name!r}> has value={value!r}; expected a task field like '$image'")
            continue
        labels = tuple(str(label) for label in (control.labels or []))
        if not labels:
            problems.append(f"<BrushLabels name={control.name!r}> has no <Label> children")
            continue
        if len(set(labels)) != len(labels):
            problems.append(f"<BrushLabels name={control.name!r}> repeats a label: {labels}")
            continue
        background = next((label for label in labels if label.strip().lower() in BACKGROUND_NAMES), None)
        if background is not None and len(labels) == 1:
            problems.append(f"<BrushLabels name={control.name!r}> has only the background label, nothing to segment")
            continue
        return BrushConfig(
            from_name=str(control.name),
            to_name=str(image.name),
            image_key=value[1:],
            labels=labels,
            background_label=background,
            mode="sparse" if background is not None else "dense",
            xml=xml,
        )
    raise LabelConfigError("no usable <BrushLabels> in the label config: " + "; ".join(problems))
