"""Annotators' masks placed on the stack: where a submitted annotation exists, it wins over the prediction.

Tasks come from Label Studio (the project's ``ProjectData``, ``labelstudio.project_data.LabelStudioProject.tasks``)
or from a file in Label Studio's JSON export format (a list of tasks with ``data`` and ``annotations``: the same
shape Label Studio's task list has). A tile knows where it came from because ``ml-backend import`` wrote it into
the task data: ``stack`` (the imported path, resolved), ``slice``, ``tile_x``, ``tile_y``, ``tile_width``,
``tile_height``. The latest submitted annotation of each task is decoded like training decodes it
(``overlays.annotation_training_mask``: display-only layers dropped; a sparse config leaves unpainted pixels unknown,
and only labelled pixels override the prediction).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.labelstudio.api import latest_annotations
from ml_backend.labelstudio.labelconfig import LabelConfigError
from ml_backend.labelstudio.overlays import OverlayConfig, annotation_training_mask, overlay_config_of
from ml_backend.labelstudio.rle import IGNORE

from .source import ExportInputError

log = logging.getLogger(__name__)

__all__ = ["Override", "apply_overrides", "load_tasks_file", "overrides_for_stack", "read_overrides",
           "write_overrides"]  # fmt: skip

_POSITION_KEYS = ("stack", "slice", "tile_x", "tile_y", "tile_width", "tile_height")


@dataclass(frozen=True)
class Override:
    """An annotated tile of slice ``z`` at (``y``, ``x``): ``mask`` int8 (h, w) classes, ``IGNORE`` = not labelled
    (int8: a fully annotated stack's masks stay an eighth of int64's size)."""

    task_id: int
    z: int
    y: int
    x: int
    mask: np.ndarray


def load_tasks_file(path: str | Path) -> list[dict]:
    """Tasks from a Label Studio JSON export (``[{"id", "data", "annotations": [...]}, ...]``)."""
    p = Path(path)
    try:
        tasks = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportInputError(f"cannot read annotations file {p}: {exc}") from exc
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise ExportInputError(f"{p} is not a Label Studio JSON export (expected a list of tasks)")
    return tasks


def overrides_for_stack(tasks: Iterable[dict], config: Any, stack_key: str, shape: tuple[int, int],
                        n_slices: int) -> tuple[list[Override], list[dict]]:  # fmt: skip
    """(overrides, skipped) of the tasks imported from ``stack_key``: one per task with a submitted annotation.

    A task of another stack is ignored; one of this stack whose annotation cannot be decoded, or whose tile leaves
    the slice, is skipped with the reason (the prediction stays there), never fatal to the export.
    """
    try:
        overlay = overlay_config_of(config)
    except LabelConfigError as exc:
        log.warning("label config's overlay controls ignored: %s", exc)
        overlay = OverlayConfig(mask=config, controls={}, uncertainty=None, suggestion=None)
    task_list = [t for t in tasks if str((t.get("data") or {}).get("stack")) == stack_key]
    by_id = {int(t["id"]): t for t in task_list if "id" in t}
    out: list[Override] = []
    skipped: list[dict] = []
    for task_id, ann in sorted(latest_annotations(task_list).items()):
        data = by_id[task_id].get("data") or {}
        try:
            z, y, x, w, h = (int(data[k]) for k in ("slice", "tile_y", "tile_x", "tile_width", "tile_height"))
            if not (0 <= z < n_slices and y >= 0 and x >= 0 and y + h <= shape[0] and x + w <= shape[1]):
                raise ValueError(f"tile z={z} y={y} x={x} {w}x{h} lies outside the {shape[1]}x{shape[0]}x{n_slices} "
                                 "stack")  # fmt: skip
            mask = annotation_training_mask(ann.get("result") or [], overlay, h, w)
            out.append(Override(task_id, z, y, x, np.asarray(mask, dtype=np.int8)))
        except Exception as exc:  # one bad annotation must not sink the export
            log.warning("task %s: annotation not used: %s: %s", task_id, type(exc).__name__, exc)
            skipped.append({"task": task_id, "error": f"{type(exc).__name__}: {exc}"})
    return out, skipped


def apply_overrides(classmap: np.ndarray, overrides: Iterable[Override]) -> int:
    """Write the labelled pixels of ``overrides`` (one slice's) into ``classmap`` in place; returns the number of
    distinct pixels set (tiles of a slice's last row/column overlap their neighbours)."""
    overrides = list(overrides)
    if not overrides:
        return 0
    covered = np.zeros(classmap.shape, dtype=bool)
    for o in overrides:
        h, w = o.mask.shape
        window = classmap[o.y : o.y + h, o.x : o.x + w]
        known = o.mask != IGNORE
        window[known] = o.mask[known]
        covered[o.y : o.y + h, o.x : o.x + w] |= known
    return int(covered.sum())


def write_overrides(path: Path, overrides: list[Override]) -> None:
    """One .npz for the chunk jobs (positions + masks); written atomically by the caller's directory rename."""
    arrays: dict[str, np.ndarray] = {
        "pos": np.array([[o.task_id, o.z, o.y, o.x] for o in overrides], dtype=np.int64).reshape(-1, 4)
    }
    for i, o in enumerate(overrides):
        arrays[f"m{i}"] = o.mask.astype(np.int8)
    np.savez_compressed(path, **arrays)


def read_overrides(path: Path, z0: int = 0, z1: int | None = None) -> dict[int, list[Override]]:
    """{slice: overrides} of slices z0..z1-1 from ``write_overrides``' file (empty when there is none); only those
    masks are read (an .npz is read member by member), so a chunk job holds its own slices' annotations only."""
    if not path.is_file():
        return {}
    out: dict[int, list[Override]] = {}
    with np.load(path, allow_pickle=False) as npz:
        for i, (tid, z, y, x) in enumerate(npz["pos"].tolist()):
            if z >= z0 and (z1 is None or z < z1):
                out.setdefault(z, []).append(Override(tid, z, y, x, npz[f"m{i}"].astype(np.int8)))
    return out
