"""The Label Studio implementation's public functions for the tools (the quick start, the export, the benchmarks),
so that nothing outside ``labelstudio/`` imports the raw client (``client``: retries, raw requests; an
import-linter contract in ``pyproject.toml`` forbids it). The product's paths use ``ProjectData``
(``project_data.LabelStudioProject``), which the tools use too for one project's tasks, record, predictions and
counts.

- ``connect``: an SDK client for ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``, checked (whoami), with retries;
- ``as_dict``: an SDK model (or a dict) as a plain dict;
- ``list_tasks`` / ``latest_annotations``: every task of a project; the annotation to learn from per task;
- ``annotate``: submit an annotation (retried like every other call);
- ``ensure_local_storage``: a local-files storage on a project (idempotent).
"""

from __future__ import annotations

from typing import Any

from ml_backend.labelstudio.client import as_dict, call, connect, ensure_local_storage, latest_annotations, list_tasks
from ml_backend.labelstudio.errors import LabelStudioAuthError, LabelStudioError, LabelStudioUnavailable
from ml_backend.labelstudio.project_data import LabelStudioProject

__all__ = [
    "LabelStudioAuthError",
    "LabelStudioError",
    "LabelStudioProject",
    "LabelStudioUnavailable",
    "annotate",
    "as_dict",
    "connect",
    "ensure_local_storage",
    "latest_annotations",
    "list_tasks",
]


def annotate(ls: Any, task_id: int, result: list[dict]) -> Any:
    """Submit an annotation of ``task_id`` with ``result`` (Label Studio's brush results), as an annotator would."""
    return call(ls, ls.annotations.create, id=task_id, result=result, what=f"annotating task {task_id}")
