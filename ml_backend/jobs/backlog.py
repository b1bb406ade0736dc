"""RQ entry point ``predict_backlog``: finish the tasks a large /predict did not get done by its deadline (issue 16).

Label Studio's "Retrieve predictions" sends every selected task in one request; what the backend has not done by
PREDICT_DEADLINE_S is answered with an empty list (nothing stored, asked again next time) and queued in chunks
(``queue.rescoring.enqueue_backlog``). Each job:

1. stops when ``version`` is no longer the live one: the training that replaced it delivers predictions of the new
   version to every unlabelled task, and Label Studio asks for the new version's anyway;
2. re-reads its tasks from Label Studio (the source of truth: data, and predictions already there), skipping tasks
   that were deleted or that already hold a prediction of ``version`` (another request, a retried job);
3. predicts them with THE /predict pipeline (``labelstudio.prediction.predict_tasks``: same masks, overlays and queue
   scores as the tasks answered in the request, so the queue order mixes them fairly), without the request deadline;
4. pushes them through the training's sink (``labelstudio.loop.LabelStudioSink``: bulk import, never twice for a
   version, then the project's model_version and prediction hygiene).

Tasks not delivered (their own image failed, or the job failed) lose their claim, so the next /predict queues them
again; RQ retries a failed job (10, 30, 60 s).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ml_backend.active_learning import ScoredPool
from ml_backend.active_learning.selection import Ranking
from ml_backend.config import Settings, get_settings, torch_device
from ml_backend.inference.scoring import PoolScores
from ml_backend.labelstudio.loop import LabelStudioSink, _holds_prediction
from ml_backend.labelstudio.prediction import predict_tasks
from ml_backend.labelstudio.project import stored_label_config
from ml_backend.labelstudio.project_data import LabelStudioProject
from ml_backend.queue.coordination import redis_for_job
from ml_backend.queue.rescoring import BACKLOG_JOB_TIMEOUT_S, release_backlog
from ml_backend.store.projects import ProjectStore
from ml_backend.store.registry import ModelRegistry

from .logs import ensure_logging
from .train import project_strategy

log = logging.getLogger(__name__)

DEADLINE_MARGIN_S = 120  # the chunk's own deadline ends this long before RQ's job timeout


def predict_backlog(project_id: int, version: str, task_ids: list[int]) -> dict:
    """RQ entry point: predict ``task_ids`` of project ``project_id`` with ``version`` and push them to Label Studio."""
    from rq import get_current_job

    ensure_logging()
    settings = get_settings()
    pid = int(project_id)
    ids = [int(t) for t in task_ids]
    conn = redis_for_job(get_current_job(), settings)
    try:
        summary = finish_backlog(pid, str(version), ids, settings)
    except BaseException:
        release_backlog(conn, pid, str(version), ids)
        raise
    if summary.get("not_delivered"):
        release_backlog(conn, pid, str(version), summary["not_delivered"])
    return summary


def finish_backlog(pid: int, version: str, ids: list[int], settings: Settings, *, ls: Any = None) -> dict:
    """Steps 1-4 of the module docstring; returns a JSON summary (``not_delivered``: ids whose claim to drop)."""
    live = ModelRegistry(settings.model_dir, pid).current_version()
    if live != version:
        log.info("project %s: %d backlog task(s) of %s dropped: %s is live now", pid, len(ids), version, live)
        return {"status": "superseded", "project": pid, "version": version, "live": live, "tasks": len(ids)}
    project = LabelStudioProject(pid, settings, ls)  # ProjectData (connects when ``ls`` is None)
    listed = project.read_tasks(ids, what="reading backlog tasks")  # by id, a bounded number per call
    todo = [listed[t] for t in ids if t in listed and not _holds_prediction(listed[t], version)]
    summary: dict[str, Any] = {"status": "done", "project": pid, "version": version, "tasks": len(ids),
                               "gone": sum(t not in listed for t in ids), "held": len(ids) - len(todo)}  # fmt: skip
    summary["held"] -= summary["gone"]
    if not todo:
        return summary
    store = ProjectStore(settings.model_dir)
    config, _xml = stored_label_config(store, str(pid))  # the label config /setup and /predict stored
    model, meta = ModelRegistry(settings.model_dir, pid).load(version, map_location=torch_device(settings.device))
    deadline = time.monotonic() + BACKLOG_JOB_TIMEOUT_S - DEADLINE_MARGIN_S
    outcome = predict_tasks(todo, config, (model, meta), project_strategy(pid, settings), settings, deadline=deadline)
    done = [(int(todo[i]["id"]), r) for i, r in enumerate(outcome.results) if isinstance(r, dict)]
    scored = ScoredPool(
        [tid for tid, _ in done], PoolScores({}, np.zeros(len(done), dtype=np.int64)), [r["result"] for _, r in done]
    )
    ranking = Ranking(scored.ids, [], np.asarray([float(r["score"]) for _, r in done], dtype=np.float64))
    project.listed, project.config = listed, config  # the sink reads these tasks and the stored label config
    delivered = LabelStudioSink(project).put(version, scored, ranking) if done else 0
    failed = [int(todo[i]["id"]) for i, r in enumerate(outcome.results) if not isinstance(r, dict)]
    for err in outcome.errors:
        log.warning("project %s: backlog task %s not predicted: %s", pid, err.get("task"), err.get("reason"))
    summary.update(delivered=delivered, failed=len(failed), not_delivered=failed)
    log.info("project %s: %d backlog prediction(s) of %s delivered (%d failed, %d already held, %d gone)",
             pid, delivered, version, len(failed), summary["held"], summary["gone"])  # fmt: skip
    return summary
