"""``ProjectData`` (``ml_backend.active_learning.project``) for a Label Studio project, the one implementation the
product runs: the SDK client (``client``), the task list and latest annotations, the label config (``project``),
the model input through the media layer with 2.5D neighbours (``neighbours.load_context_image``), prediction import,
the project's model version, prediction hygiene (``hygiene``).

``ChunkInputs`` are the re-scoring chunks' loaders that ``jobs/`` hands to ``queue.rescoring`` (``queue/`` does not
import this package): what a chunk context holds for each task (its image URL and neighbour URLs), the model input
built from it, and the chunk's scoring (``loop.score_tiles``: summaries + brush masks).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ml_backend.config import Settings
from ml_backend.labelstudio.annotations import task_image_url
from ml_backend.labelstudio.client import (
    as_dict,
    call,
    connect,
    delete_version_predictions,
    latest_annotations,
    list_tasks,
    model_version_counts,
    paged,
    push_predictions,
    sdk_client,
    set_project_model_version,
)
from ml_backend.labelstudio.hygiene import prune_predictions
from ml_backend.labelstudio.loop import score_tiles
from ml_backend.labelstudio.neighbours import NeighbourIndex, context_urls, load_context_image
from ml_backend.labelstudio.project import project_label_config

log = logging.getLogger(__name__)

__all__ = ["LIST_IDS", "ChunkInputs", "LabelStudioProject", "ProjectOpener"]

LIST_IDS = 100  # task ids per Label Studio listing call in ``read_tasks(ids)`` (they go into the query string)


@dataclass
class LabelStudioProject:
    """One Label Studio project behind ``ProjectData``. ``ls`` None: connect with ``settings``. ``tasks`` /
    ``config`` given: used as read (a caller that already listed them); else read once on first use."""

    pid: int
    settings: Settings
    ls: Any = None
    listed: dict[int, dict] | None = None
    config: Any = None
    label_xml: str = ""
    _neighbours: NeighbourIndex | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.pid = int(self.pid)
        if self.ls is None:
            self.ls = connect(self.settings)

    # ----------------------------------------------------------------------------------------------- reading
    def tasks(self) -> dict[int, dict]:
        if self.listed is None:
            self.listed = self.read_tasks()
        return self.listed

    def read_tasks(self, ids: Sequence[int] | None = None, *, what: str = "reading tasks") -> dict[int, dict]:
        if ids is None:
            return {int(t["id"]): t for t in list_tasks(self.ls, self.pid)}
        wanted = [int(t) for t in ids]
        out: dict[int, dict] = {}
        for start in range(0, len(wanted), LIST_IDS):  # the ids travel in the URL: a bounded number per call
            part = wanted[start : start + LIST_IDS]
            query = json.dumps({"selectedItems": {"all": False, "included": part}})
            label = f"{what} {start}..{start + len(part) - 1} of project {self.pid}"
            out.update((int(t["id"]), t) for t in paged(self.ls, self.ls.tasks.list, project=self.pid, fields="all",
                                                        query=query, what=label))  # fmt: skip
        return out

    def record(self, *, retry: bool = True) -> dict:
        if not retry:
            return as_dict(self.ls.projects.get(id=self.pid))
        return as_dict(call(self.ls, self.ls.projects.get, id=self.pid, what=f"reading project {self.pid}"))

    def latest_annotations(self) -> dict[int, dict]:
        return {int(k): v for k, v in latest_annotations(list(self.tasks().values())).items()}

    def label_config(self) -> tuple[Any, str]:
        if self.config is None:
            self.config, self.label_xml = project_label_config(self.ls, self.pid, self.settings)
        return self.config, self.label_xml

    def neighbours(self) -> NeighbourIndex:
        """Every task's tile by stack, window and slice (2.5D context), built once."""
        if self._neighbours is None:
            self._neighbours = NeighbourIndex.from_tasks(self.tasks(), self.label_config()[0].image_key)
        return self._neighbours

    def model_input(self, task: dict, offsets: Sequence[int] = (0,)) -> np.ndarray:
        offs = tuple(int(o) for o in offsets)
        index = None if offs == (0,) else self.neighbours()
        return load_context_image(task, self.label_config()[0], self.settings, offs, index)

    # ---------------------------------------------------------------------------------------------- delivery
    def push_predictions(self, predictions: list[dict]) -> int:
        return push_predictions(self.ls, self.pid, predictions)

    def set_model_version(self, version: str) -> None:
        set_project_model_version(self.ls, self.pid, version)

    def model_version(self) -> str | None:
        return self.record().get("model_version")

    def prune(self, live: str, covered: Iterable[int], keep: int) -> Any:
        return prune_predictions(self.ls, self.pid, live, self.tasks(), covered, keep=keep)

    def delete_version(self, version: str) -> int:
        return delete_version_predictions(self.ls, self.pid, version)

    def counts(self, *, attempts: int | None = None, timeout: float | None = None) -> dict[str, int]:
        bounds: dict[str, Any] = {}
        if attempts is not None:
            bounds["attempts"] = int(attempts)
        if timeout is not None:
            bounds["timeout"] = float(timeout)
        return model_version_counts(self.ls, self.pid, **bounds)

    def chunk_inputs(self) -> ChunkInputs:
        """The re-scoring chunks' loaders for this project (the coordinator's: it also describes the tasks)."""
        return ChunkInputs(self.label_config()[0], self.settings, self.tasks())


class ProjectOpener:
    """``LabelStudioProject``s of any project over ONE shared SDK client, made on first use by the backend's one
    client factory with ``timeout`` and no check or retry of its own (the status page's: a slow or absent Label
    Studio never holds it)."""

    def __init__(self, settings: Settings, *, timeout: float) -> None:
        self.settings, self.timeout = settings, float(timeout)
        self._ls: Any = None
        self._lock = threading.Lock()

    def __call__(self, pid: int) -> LabelStudioProject:
        with self._lock:
            if self._ls is None:
                self._ls = sdk_client(self.settings, timeout=self.timeout)
        return LabelStudioProject(int(pid), self.settings, self._ls)


@dataclass
class ChunkInputs:
    """Re-scoring's loaders (``queue.rescoring.ChunkInputs``) for Label Studio tasks. ``tasks``: the project's task
    list, needed only by the coordinator (``describe``); a helper job builds one from the chunk context alone."""

    config: Any
    settings: Settings
    tasks: dict[int, dict] | None = None

    def describe(self, task_ids: list[int], offsets: Sequence[int]) -> tuple[dict, list[int]]:
        """(chunk-context entries, the ids that have an image): each task's image URL and, for offsets other than
        (0,), its neighbours' URLs per offset (found in the task list) so that a helper needs no listing."""
        tasks, config = self.tasks or {}, self.config
        urls: dict[str, str] = {}
        for tid in task_ids:
            try:
                urls[str(tid)] = task_image_url(tasks[tid], config)
            except ValueError as exc:
                log.warning("%s", exc)
        ids = [tid for tid in task_ids if str(tid) in urls]
        ctx: dict[str, Any] = {"urls": urls}
        offs = tuple(int(o) for o in offsets)
        if offs != (0,) and ids:
            index = NeighbourIndex.from_tasks(tasks, config.image_key)
            ctx["context_offsets"] = list(offs)
            ctx["neighbours"] = {
                str(tid): [context_urls(tasks[tid], offs, config.image_key, index)[o] for o in offs] for tid in ids
            }
        return ctx, ids

    def load(self, tid: int, ctx: dict, offsets: Sequence[int]) -> np.ndarray:
        """The model input of task ``tid`` from the chunk context: ``load_context_image`` with the stored URLs."""
        offs = tuple(int(o) for o in offsets)
        url = ctx["urls"][str(tid)]
        task = {"id": tid, "data": {self.config.image_key: url}}
        urls = None
        if offs != (0,):
            stored = dict(zip(ctx.get("context_offsets") or [], (ctx.get("neighbours") or {}).get(str(tid)) or [],
                              strict=False))  # fmt: skip
            urls = {o: (url if o == 0 else stored.get(o)) for o in offs}  # absent: the tile itself
        return load_context_image(task, self.config, self.settings, offs, urls=urls)

    def score(
        self, model: Any, images: list[np.ndarray], strategy: Any, *, ensemble: list[Any], seed: int
    ) -> tuple[dict[str, np.ndarray], list[list[dict]], np.ndarray]:
        return score_tiles(model, images, strategy, self.config, self.settings, ensemble=ensemble, seed=seed)
