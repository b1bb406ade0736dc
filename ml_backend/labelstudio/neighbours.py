"""2.5D context for Label Studio tasks: the task holding the same tile window on slice z + offset, and the model
input built from it.

Why here: the model reads neighbouring slices as extra channels (``CONTEXT_OFFSETS``, ``ml_backend.data.context``),
but a task only holds its own tile. The importer writes where each tile comes from (``source``/``stack``,
``slice``, ``tile_x``, ``tile_y``, ``tile_width``, ``tile_height``) and the URLs of the tiles on slices z-1 and z+1
(``<image key>_prev`` / ``<image key>_next``, which ``label_config/dense_25d.xml`` shows the annotator). From that:

* ``NeighbourIndex.from_tasks`` indexes a project's task list by (stack, window) and slice, so a job finds the tile
  at any offset;
* ``context_urls`` gives, per offset, the URL to read: the importer's ``_prev``/``_next`` for -1/+1 when present
  (written from the whole stack), else the index, with ``data.context``'s rules (z + offset clamped into the
  stack's slice range; an absent slice gives None = the tile itself);
* ``load_context_image`` fetches them through ``labelstudio.media`` (same validation, allow-list and bounds as the
  tile's own image) and stacks (C, H, W). A neighbour that is missing, fails to fetch, or has another size is
  replaced by the tile itself (logged): a missing neighbour never fails a task. The tile's own image failing
  fails the task as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ml_backend.labelstudio.media import fetch_image

log = logging.getLogger(__name__)

__all__ = [
    "NeighbourIndex",
    "context_urls",
    "load_context_image",
    "neighbour_keys",
    "stack_window",
    "stack_context_images",
]

MAX_NEIGHBOUR_URL_CHARS = 8192  # a task data value longer than this is not a URL we fetch


def neighbour_keys(image_key: str) -> dict[int, str]:
    """Task data keys of the tiles on slices z-1 and z+1 written at import: {-1: "<key>_prev", 1: "<key>_next"}."""
    return {-1: f"{image_key}_prev", 1: f"{image_key}_next"}


def stack_window(data: Mapping[str, Any]) -> tuple[tuple[str, int, int, int, int], int] | None:
    """((stack, y, x, h, w), z) of a task from the importer's task data; None when it does not say where it is.

    The stack is ``stack`` (the imported path, one per multi-page TIFF or folder of slices) or, for tasks imported
    before that key existed, ``source`` (the same for every slice of a multi-page TIFF).
    """
    try:
        stack = str(data.get("stack") or data["source"])
        z, y, x = int(data["slice"]), int(data["tile_y"]), int(data["tile_x"])
        h, w = int(data["tile_height"]), int(data["tile_width"])
    except (KeyError, TypeError, ValueError):
        return None
    if z < 0 or h < 1 or w < 1:
        return None
    return (stack, y, x, h, w), z


@dataclass
class NeighbourIndex:
    """URLs of a project's tiles by (stack, window) and slice; ``n_slices[stack]``: highest slice seen + 1."""

    image_key: str = "image"
    slices: dict[tuple[str, int, int, int, int], dict[int, str]] = field(default_factory=dict)
    n_slices: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_tasks(cls, tasks: Iterable[dict] | Mapping[Any, dict], image_key: str) -> NeighbourIndex:
        """Index of ``tasks`` (task dicts, or a {id: task} mapping); tasks without a position are left out."""
        index = cls(image_key)
        for task in tasks.values() if isinstance(tasks, Mapping) else tasks:
            data = (task or {}).get("data") if isinstance(task, dict) else None
            if not isinstance(data, dict):
                continue
            url = data.get(image_key)
            where = stack_window(data)
            if not isinstance(url, str) or not url or where is None:
                continue
            key, z = where
            index.slices.setdefault(key, {}).setdefault(z, url)
            index.n_slices[key[0]] = max(index.n_slices.get(key[0], 0), z + 1)
        return index

    def url(self, data: Mapping[str, Any], offset: int) -> str | None:
        """The tile at z + offset (clamped into the stack), or None when that slice is absent from the index."""
        where = stack_window(data)
        if where is None:
            return None
        key, z = where
        n = self.n_slices.get(key[0], 0)
        if n == 0:
            return None
        k = min(max(z + int(offset), 0), n - 1)  # data.context: edges replicate the nearest slice
        return self.slices.get(key, {}).get(k)


def _valid_url(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() and len(value) <= MAX_NEIGHBOUR_URL_CHARS else None


def context_urls(
    task: Mapping[str, Any], offsets: Sequence[int], image_key: str, index: NeighbourIndex | None = None
) -> dict[int, str | None]:
    """{offset: URL} of the tile window on slice z + offset for every offset; None: use the tile itself.

    Offset 0 is the task's own image. -1/+1 come from the importer's ``<key>_prev``/``<key>_next`` when present,
    other offsets (and tasks imported without those keys) from ``index``; without either the tile itself is used.
    """
    data = task.get("data") or {}
    keys = neighbour_keys(image_key)
    out: dict[int, str | None] = {}
    for o in offsets:
        o = int(o)
        if o == 0:
            out[o] = _valid_url(data.get(image_key))
            continue
        url = _valid_url(data.get(keys[o])) if o in keys else None
        if url is None and index is not None:
            url = _valid_url(index.url(data, o))
        out[o] = url
    return out


def stack_context_images(
    centre: np.ndarray,
    urls: Mapping[int, str | None],
    offsets: Sequence[int],
    fetch: Callable[[str], np.ndarray],
    *,
    label: str = "task",
) -> np.ndarray:
    """(C, H, W) float32: ``centre`` at offset 0, each other offset's image from ``fetch(url)``; a neighbour that is
    absent, fails or has another shape is the centre (``data.context``'s "missing" rule)."""
    centre = np.asarray(centre, dtype=np.float32)
    own = urls.get(0)
    channels = []
    for o in offsets:
        o = int(o)
        img = None
        url = urls.get(o)
        if o != 0 and url and url != own:
            try:
                img = np.asarray(fetch(url), dtype=np.float32)
            except Exception as exc:  # a neighbour is context, never a reason to fail the task
                log.warning("%s: neighbour at offset %+d unavailable, the tile itself is used: %s: %s", label, o,
                            type(exc).__name__, exc)  # fmt: skip
                img = None
            if img is not None and img.shape != centre.shape:
                log.warning("%s: neighbour at offset %+d has shape %s, the tile %s: the tile itself is used", label,
                            o, img.shape, centre.shape)  # fmt: skip
                img = None
        channels.append(centre if img is None else img)
    return np.stack(channels)


def load_context_image(
    task: dict,
    config: Any,
    settings: Any,
    offsets: Sequence[int],
    index: NeighbourIndex | None = None,
    *,
    centre: np.ndarray | None = None,
    urls: Mapping[int, str | None] | None = None,
) -> np.ndarray:
    """THE model input of a task (``labelstudio.project_data.LabelStudioProject.model_input`` and every loader of
    the training job, the cold start, re-scoring chunks and ``/predict``): its normalised (H, W) image for offsets
    (0,), else (C, H, W) with the neighbouring slices (``context_urls``, or ``urls`` when the caller already
    resolved them, as a re-scoring chunk does), all fetched through ``labelstudio.media``. ``centre``: the task's
    image when the caller already has it. Errors of the task's own image propagate (the task fails as without
    context)."""
    from ml_backend.labelstudio.tasks import load_task_image  # local: tasks loads torch; `ml-backend import` imports us

    offs = tuple(int(o) for o in offsets)
    image = load_task_image(task, config, settings) if centre is None else centre
    if offs == (0,):
        return image
    if urls is None:
        urls = context_urls(task, offs, config.image_key, index)
    return stack_context_images(
        image, urls, offs, lambda url: fetch_image(url, settings), label=f"task {task.get('id')}"
    )
