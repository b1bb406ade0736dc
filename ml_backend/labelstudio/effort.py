"""Which pre-annotation a submitted annotation was made from, and how much the annotator changed it (issue 17.6).

The training job calls ``measure_annotations`` on what it re-read from Label Studio, before its sink prunes old
predictions, and stores the records with ``store.effort.EffortLog``; ``active_learning.effort`` holds the measure.

Which prediction was served (Label Studio 1.23.2):

1. ``annotation["parent_prediction"]``: the prediction the annotation was created from. The labelling page sets it
   when the annotator starts from a prediction, the API accepts it on ``POST /api/tasks/<id>/annotations/``, and
   the task listing returns it. It becomes null when that prediction is deleted (``on_delete=SET_NULL``).
2. Otherwise the task's newest prediction created before the annotation: the prediction of the project's
   ``model_version`` at that time, since every round uploads a version's predictions and only then makes it the
   project's version (``loop.LabelStudioSink``). Label Studio keeps the same thing in the annotation's hidden
   ``prediction`` field ("prediction viewed at the time of annotation"), which its API does not return.
3. Neither: nothing was served (the task was labelled before any prediction, or its prediction is gone): the
   annotation is recorded as skipped with that reason.

Every problem (no prediction, a region of another size, an unknown label, undecodable RLE) skips that annotation
with a reason; none stops the job.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

from ml_backend.active_learning.effort import edit_effort

from .labelconfig import BrushConfig, LabelConfigError
from .overlays import OverlayConfig, overlay_config_of, strip_non_label_results
from .rle import AnnotationError, results_to_mask

__all__ = ["measure_annotation", "measure_annotations", "served_prediction"]

log = logging.getLogger(__name__)


def _time(value: Any) -> datetime | None:
    """Label Studio's ISO timestamps ("...Z" or "+00:00") as aware datetimes; None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def served_prediction(task: Mapping, annotation: Mapping) -> tuple[dict | None, str]:
    """(the prediction the annotation was made from, how it was found) or (None, why none was)."""
    preds = [p for p in task.get("predictions") or [] if isinstance(p, Mapping)]
    parent = annotation.get("parent_prediction")
    if isinstance(parent, Mapping):  # an expanded object instead of an id
        parent = parent.get("id")
    if parent is not None:
        for pred in preds:
            if str(pred.get("id")) == str(parent):
                return dict(pred), "parent_prediction"
    created = _time(annotation.get("created_at"))
    if created is None:
        return None, "no prediction served: the annotation has no readable created_at to date it"
    before = [(t, int(p.get("id") or 0), p) for p in preds if (t := _time(p.get("created_at"))) and t <= created]
    if before:
        return dict(max(before, key=lambda item: item[:2])[2]), "newest_before"
    if parent is not None:
        return None, f"no prediction served: its parent prediction {parent} is no longer on the task"
    if preds:
        return None, "no prediction served: the task's predictions were all created after the annotation"
    return None, "no prediction served: the task holds no prediction"


def _brush_size(results: Any, overlay: OverlayConfig) -> tuple[int, int] | None:
    """(height, width) the mask control's regions were drawn on, from their original_height / original_width."""
    for item in strip_non_label_results(results, overlay):
        h, w = item.get("original_height"), item.get("original_width")
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            return h, w
    return None


def _decode(results: list, overlay: OverlayConfig, height: int, width: int, what: str) -> Any:
    """The mask control's class map of ``results``; errors say whether the annotation or the prediction is at fault."""
    try:
        return results_to_mask(strip_non_label_results(results, overlay), overlay.mask, height, width)
    except AnnotationError as exc:
        raise AnnotationError(f"{what}: {exc}") from None


def measure_annotation(
    task: Mapping, annotation: Mapping, overlay: OverlayConfig, size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The effort record of one annotation: how it was served, from which version, and ``EditEffort.as_dict()``;
    or the same keys with ``skipped`` (the reason) instead of the figures. ``size``: the task image's (H, W) when
    known (the masks are decoded at it, so a region drawn on another size is refused), else the regions' own."""
    record: dict[str, Any] = {
        "annotation": annotation.get("id"),
        "updated_at": str(annotation.get("updated_at") or annotation.get("created_at") or ""),
        "created_at": annotation.get("created_at"),
        "task": task.get("id"),
        "model_version": None,
        "prediction": None,
        "served_by": None,
    }
    pred, how = served_prediction(task, annotation)
    if pred is None:
        return {**record, "skipped": how}
    record.update(model_version=pred.get("model_version"), prediction=pred.get("id"), served_by=how)
    try:
        ann_results, pred_results = annotation.get("result"), pred.get("result")
        if ann_results is None:
            ann_results = []
        if not isinstance(ann_results, list) or not isinstance(pred_results, list):
            raise ValueError("annotation and prediction results must be lists")
        drawn, offered = _brush_size(ann_results, overlay), _brush_size(pred_results, overlay)
        if size is None and drawn and offered and drawn != offered:
            raise ValueError(f"the annotation was drawn on a {drawn[1]}x{drawn[0]} image, the served prediction on "
                             f"{offered[1]}x{offered[0]}: not comparable")  # fmt: skip
        height, width = size or drawn or offered or (0, 0)
        if not height:
            raise ValueError("neither the annotation nor the prediction has a brush region and the image size is "
                             "unknown")  # fmt: skip
        served = _decode(pred_results, overlay, height, width, "served prediction")
        annotated = _decode(ann_results, overlay, height, width, "annotation")
    except ValueError as exc:  # AnnotationError too: wrong size, unknown label, undecodable RLE
        return {**record, "skipped": f"{type(exc).__name__}: {exc}"}
    return {**record, **edit_effort(served, annotated).as_dict()}


def measure_annotations(
    tasks: Mapping[int, Mapping],
    annotations: Mapping[int, Mapping],
    config: BrushConfig | OverlayConfig | str,
    *,
    sizes: Mapping[int, tuple[int, int]] | None = None,
    audit: Collection[int] = (),
    measured: Collection[tuple[str, str]] = (),
) -> list[dict]:
    """Effort records of the annotations (``{task id: annotation}``) whose (id, updated_at) is not in ``measured``.

    ``sizes``: {task id: (H, W)} of the decoded task images; ``audit``: the audit tasks (served without a mask on
    purpose), flagged so the per-version means leave them out.
    """
    try:
        overlay = overlay_config_of(config)
    except LabelConfigError as exc:  # unusable display-only controls: compare the mask control alone
        log.warning("label config's overlay controls ignored for the effort measure: %s", exc)
        mask = config.mask if isinstance(config, OverlayConfig) else config
        if isinstance(mask, str):
            raise
        overlay = OverlayConfig(mask=mask, controls={}, uncertainty=None, suggestion=None)
    done = set(measured)
    audit_ids = {int(t) for t in audit}
    out = []
    for task_id, ann in sorted(annotations.items()):
        key = (str(ann.get("id")), str(ann.get("updated_at") or ann.get("created_at") or ""))
        if key in done or ann.get("id") is None:
            continue
        task = tasks.get(task_id)
        if task is None:
            continue  # deleted since: nothing served to compare with
        rec = measure_annotation(task, ann, overlay, (sizes or {}).get(int(task_id)))
        rec["audit"] = int(task_id) in audit_ids
        if rec.get("skipped"):
            log.info("task %s annotation %s: effort not measured: %s", task_id, ann.get("id"), rec["skipped"])
        out.append(rec)
    return out
