"""In-memory stand-ins for the unit tests, so that the product's own plug-ins are what the tests run.

* ``FakeProject`` implements ``ml_backend.active_learning.project.ProjectData`` in memory: the tasks and their
  predictions, the latest annotations, the label config, model inputs from arrays, and the delivery side
  (pushed predictions land in the tasks, the model version is kept, pruning deletes older versions' predictions
  with Label Studio's rule, ``labelstudio.hygiene``). ``LabelStudioSink(FakeProject(...))`` is the job's sink.
* ``FakeChunkInputs``: re-scoring's loaders (``queue.rescoring.ChunkInputs``) over a ``FakeProject``, so that
  ``RedisPoolScorer`` runs against a real Redis without Label Studio or HTTP.
* ``train_round``: a version trained and published by the product's round (``product_plan``, ``AnnotatedTasks``,
  ``RegistryPublisher``, ``run_round``: the training job's pieces) on plain labelled tiles, without scoring.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from ml_backend.active_learning import LabelledSet, run_round
from ml_backend.active_learning.plan import product_plan
from ml_backend.active_learning.publisher import RegistryPublisher
from ml_backend.labelstudio.hygiene import PruneReport, deletable_predictions, kept_versions
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.loop import AnnotatedTasks, score_tiles


@dataclass
class FakeProject:
    """``ProjectData`` in memory. ``images[task id]``: the (H, W) float32 image of each task; a task's model input
    with offsets other than (0,) stacks the images of the tasks named in ``data["neighbours"][offset]`` (absent:
    the tile itself), like Label Studio's neighbours."""

    pid: int
    label_xml: str
    images: dict[int, np.ndarray]
    annotations: dict[int, dict] = field(default_factory=dict)
    settings: Any = None
    version: str | None = None
    title: str = "fake project"
    pushed: list[dict] = field(default_factory=list)
    _tasks: dict[int, dict] = field(default_factory=dict)
    _next_prediction: int = 1

    def __post_init__(self) -> None:
        for tid in sorted(self.images):
            self._tasks.setdefault(tid, {"id": tid, "data": {"image": f"fake://{tid}"}, "predictions": []})
        for tid, ann in self.annotations.items():
            self._tasks[tid]["annotations"] = [ann]

    def tasks(self) -> dict[int, dict]:
        return self._tasks

    def read_tasks(self, ids: Sequence[int] | None = None, *, what: str = "reading tasks") -> dict[int, dict]:
        wanted = sorted(self._tasks) if ids is None else [int(t) for t in ids]
        return {t: self._tasks[t] for t in wanted if t in self._tasks}

    def record(self, *, retry: bool = True) -> dict:
        labelled = sum(1 for t in self._tasks.values() if t.get("annotations"))
        return {"id": self.pid, "title": self.title, "task_number": len(self._tasks),
                "num_tasks_with_annotations": labelled, "model_version": self.version}  # fmt: skip

    def latest_annotations(self) -> dict[int, dict]:
        return dict(self.annotations)

    def label_config(self) -> tuple[Any, str]:
        return parse_label_config(self.label_xml), self.label_xml

    def model_input(self, task: dict, offsets: Sequence[int] = (0,)) -> np.ndarray:
        tid = int(task["id"])
        if tid not in self.images:
            raise FileNotFoundError(f"task {tid}: no image")
        centre = np.asarray(self.images[tid], dtype=np.float32)
        offs = tuple(int(o) for o in offsets)
        if offs == (0,):
            return centre
        near = (task.get("data") or {}).get("neighbours") or {}
        chans = [self.images.get(near.get(str(o)), centre) if o != 0 else centre for o in offs]
        return np.stack([np.asarray(c, dtype=np.float32) for c in chans])

    def push_predictions(self, predictions: list[dict]) -> int:
        for p in predictions:
            pred = {**p, "id": self._next_prediction}
            self._next_prediction += 1
            self._tasks[int(p["task"])]["predictions"].append(pred)
            self.pushed.append(pred)
        return len(predictions)

    def set_model_version(self, version: str) -> None:
        self.version = version

    def model_version(self) -> str | None:
        return self.version

    def delete_version(self, version: str) -> int:
        deleted = 0
        for task in self._tasks.values():
            kept = [p for p in task["predictions"] if p["model_version"] != version]
            deleted += len(task["predictions"]) - len(kept)
            task["predictions"] = kept
        return deleted

    def counts(self, *, attempts: int | None = None, timeout: float | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for task in self._tasks.values():
            for p in task["predictions"]:
                out[str(p["model_version"])] = out.get(str(p["model_version"]), 0) + 1
        return out

    def prune(self, live: str, covered: Iterable[int], keep: int) -> PruneReport:
        report = PruneReport()
        if keep <= 0:
            return report
        counts = self.counts()
        latest_first = sorted(counts, key=lambda v: max(p["id"] for t in self._tasks.values()
                                                        for p in t["predictions"] if p["model_version"] == v),
                              reverse=True)  # fmt: skip
        report.kept = kept_versions(live, latest_first, keep)
        old = [v for v in counts if v not in report.kept]
        for tid, pred_id, version in deletable_predictions(self._tasks, live, old, covered):
            preds = self._tasks[tid]["predictions"]
            self._tasks[tid]["predictions"] = [p for p in preds if p["id"] != pred_id]
            report.deleted_by_version[version] = report.deleted_by_version.get(version, 0) + 1
        return report


@dataclass
class FakeChunkInputs:
    """``queue.rescoring.ChunkInputs`` over a ``FakeProject``: the chunk context names the tasks, the model input is
    the project's, the scoring is the product's (``labelstudio.loop.score_tiles``)."""

    project: FakeProject
    settings: Any

    def describe(self, task_ids: list[int], offsets: Sequence[int]) -> tuple[dict, list[int]]:
        ids = [t for t in task_ids if t in self.project.images]
        return {"urls": {str(t): f"fake://{t}" for t in ids}}, ids

    def load(self, tid: int, ctx: dict, offsets: Sequence[int]) -> np.ndarray:
        return self.project.model_input(self.project.tasks()[tid], offsets)

    def score(self, model: Any, images: list[np.ndarray], strategy: Any, *, ensemble: list[Any], seed: int) -> Any:
        config, _ = self.project.label_config()
        return score_tiles(model, images, strategy, config, self.settings, ensemble=ensemble, seed=seed)


def train_round(
    registry: Any, tiles: list, config: Any, settings: Any, *, strategy: Any = None, extra_meta: dict | None = None,
    **plan: Any,
) -> SimpleNamespace:  # fmt: skip
    """Train and publish a version with the product's round (no scoring): ``version``, ``meta``, ``model``,
    ``ensemble`` (``plan``: ``product_plan``'s keywords, e.g. ``train_overrides``, ``progress``)."""
    plan_ = product_plan(registry, config, settings, strategy, score=False, **plan)
    publisher = RegistryPublisher(registry, config, settings, strategy, extra_meta)
    outcome = run_round(plan_, AnnotatedTasks(LabelledSet(tiles), []), publisher=publisher)
    return SimpleNamespace(version=outcome.version, meta=publisher.meta, model=outcome.trained.model,
                           ensemble=outcome.trained.ensemble)  # fmt: skip
