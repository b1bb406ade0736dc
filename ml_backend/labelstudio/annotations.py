"""Label Studio annotations -> labelled tiles: the latest submitted annotation per task, decoded to a mask at its
image's size. One bad annotation is logged and skipped, never fatal to the batch.

Decoding goes through ``overlays.annotation_training_mask``: the uncertainty layer and the suggestion rectangle that
Label Studio copies from the prediction into the annotation are never labels, and with a sparse config the submitted
rectangle limits the labels to the box (pixels outside it are unknown to the loss)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ml_backend.active_learning.round import LabelledTile
from ml_backend.labelstudio.labelconfig import LabelConfigError
from ml_backend.labelstudio.overlays import OverlayConfig, annotation_training_mask, overlay_config_of
from ml_backend.training import IGNORE

log = logging.getLogger(__name__)


def annotation_signature(annotations: dict[int, dict]) -> str:
    """Fingerprint of the labelled set (task, annotation id, last update): equal => nothing new to learn."""
    items = sorted(
        (int(task_id), str(ann.get("id")), str(ann.get("updated_at") or ann.get("created_at") or ""))
        for task_id, ann in annotations.items()
    )
    return hashlib.sha1(json.dumps(items).encode()).hexdigest()


def task_image_url(task: dict, config: Any) -> str:
    """The image reference of a task under the label config's ``$key`` (clear error when missing)."""
    data = task.get("data") or {}
    url = data.get(config.image_key)
    if not url or not isinstance(url, str):
        raise ValueError(f"task {task.get('id')} has no image under data[{config.image_key!r}] (keys: {sorted(data)})")
    return url


def decode_annotations(
    tasks: dict[int, dict],
    annotations: dict[int, dict],
    config: Any,
    load_image: Callable[[dict], np.ndarray],
    *,
    workers: int = 8,
) -> tuple[list[LabelledTile], list[dict]]:
    """(usable tiles, skipped) from the latest annotation per task.

    ``load_image(task) -> float32 (H, W)`` (or (C, H, W) with 2.5D context). Each mask is decoded at the image's
    size, so an RLE of the wrong size, an unknown label or an undecodable RLE is an error for that task only: logged
    and listed in ``skipped``.
    Sparse configs need at least one painted pixel (a tile with only unknown pixels teaches nothing).
    """
    try:
        overlay = overlay_config_of(config)
    except LabelConfigError as exc:  # unusable display-only controls: decode the mask control alone
        log.warning("label config's overlay controls ignored for training: %s", exc)
        overlay = OverlayConfig(mask=config, controls={}, uncertainty=None, suggestion=None)

    def one(item: tuple[int, dict]) -> LabelledTile | dict:
        task_id, ann = item
        try:
            task = tasks.get(task_id)
            if task is None:
                raise ValueError("task no longer exists (deleted)")
            result = ann.get("result") or []
            if not isinstance(result, list):
                raise ValueError(f"annotation result must be a list, got {type(result).__name__}")
            image = load_image(task)
            mask = annotation_training_mask(result, overlay, image.shape[-2], image.shape[-1])  # (H, W) or (C, H, W)
            if not (mask != IGNORE).any():
                raise ValueError("annotation has no labelled pixel (sparse config: paint background too)")
            return LabelledTile(int(task_id), ann.get("id"), image, np.asarray(mask, dtype=np.int64))
        except Exception as exc:  # one bad task must not sink the batch
            log.warning("task %s annotation %s skipped: %s: %s", task_id, ann.get("id"), type(exc).__name__, exc)
            return {"task": int(task_id), "annotation": ann.get("id"), "error": f"{type(exc).__name__}: {exc}"}

    items = sorted(annotations.items())
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # image fetches are I/O bound
        results = list(pool.map(one, items))
    tiles = [r for r in results if isinstance(r, LabelledTile)]
    skipped = [r for r in results if isinstance(r, dict)]
    return tiles, skipped
