"""One interface to a labelling project (``ProjectData``), beside the round's plug-in protocols.

Everything the jobs read from or write to the project goes through it: the tasks, their latest annotations, the
label config, THE task -> model-input loader (``model_input``: the task's image and, for a 2.5D model, its
neighbouring slices as channels, fetched under the media policy), and the delivery side (predictions in bulk, the
project's model version, pruning old versions' predictions, prediction counts per version).

Implemented once for Label Studio (``ml_backend.labelstudio.project_data.LabelStudioProject``); the unit tests
implement it in memory (``tests/fakes.py``: ``FakeProject``) so that the product's own sink and scorer run there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ml_backend.active_learning.round import TrainingError


class ProjectNotFound(TrainingError):
    """The labelling project does not exist (Label Studio answers 404, or the id is out of range): no retry can
    help, so the job fails at once instead of being retried (``run_exclusive`` sets ``retries_left = 0``)."""


@runtime_checkable
class ProjectData(Protocol):
    pid: int

    def tasks(self) -> dict[int, dict]:
        """Every task of the project by id (``{"id", "data", "predictions", "annotations"}``), read once."""
        ...

    def read_tasks(self, ids: Sequence[int] | None = None, *, what: str = "reading tasks") -> dict[int, dict]:
        """A fresh read (nothing cached) of the tasks ``ids`` (None: every task) by id; ids that are gone are
        absent. ``what`` names the read in errors (e.g. "reading backlog tasks")."""
        ...

    def record(self, *, retry: bool = True) -> dict:
        """The project's own record (``title``, ``task_number``, ``num_tasks_with_annotations``, ``model_version``,
        ...). ``retry=False``: one request, errors as they come (a caller that bounds its own time)."""
        ...

    def latest_annotations(self) -> dict[int, dict]:
        """The latest submitted annotation per annotated task id."""
        ...

    def label_config(self) -> tuple[Any, str]:
        """(parsed label config, XML)."""
        ...

    def model_input(self, task: dict, offsets: Sequence[int] = (0,)) -> np.ndarray:
        """THE model input of a task: float32 (H, W) for offsets (0,), else (C, H, W) with the slices z + offset
        (a neighbour that cannot be had is the tile itself). Errors of the task's own image propagate."""
        ...

    def push_predictions(self, predictions: list[dict]) -> int:
        """Import ``[{task, result, score, model_version}]`` in bulk; returns how many were sent."""
        ...

    def set_model_version(self, version: str) -> None:
        """Make ``version`` the project's model version (the queue orders by its predictions' scores)."""
        ...

    def model_version(self) -> str | None:
        """The project's model version now."""
        ...

    def prune(self, live: str, covered: Iterable[int], keep: int) -> Any:
        """Delete older versions' predictions on tasks that hold one of ``live`` (the ``keep`` latest kept)."""
        ...

    def delete_version(self, version: str) -> int:
        """Delete every prediction of ``version`` in the project; returns how many were deleted."""
        ...

    def counts(self, *, attempts: int | None = None, timeout: float | None = None) -> dict[str, int]:
        """``{model_version: number of predictions}``. ``attempts`` / ``timeout``: bounds for a caller that bounds
        its own time (the status page: one attempt, 5 s); None: the implementation's defaults."""
        ...
