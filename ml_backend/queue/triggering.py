"""Webhook triggering: Label Studio's events -> the batch counter -> a (coalesced) training job.

Why it looks like this: Label Studio posts webhooks synchronously with a 1 s timeout, so ``handle_webhook`` does only
a few Redis round trips (no Label Studio calls, no torch import) and never trains. Redis holds, per project:

``pending``  set of task ids submitted since the last training job started reading annotations (the batch counter;
             a set so re-saving one task many times counts once)
``queued``   id of the training job waiting in the queue (at most one per project): SET in the same MULTI/EXEC that
             creates and enqueues the RQ job, under WATCH of this key, so a concurrent webhook either sees the job
             or retries; it never sees a claimed slot without its job
``lock``     id of the training job running now (SET NX + TTL refreshed by a heartbeat, so a killed worker frees it)
``dirty``    set by a job that found another one running: the running job schedules exactly one follow-up when
             it finishes

Events that arrive during a training fill ``pending`` and enqueue one follow-up job (the ``queued`` slot is free
again once a job starts); more events coalesce into it. Label Studio stays the source of truth: a job re-reads every
annotation, so webhooks missed while Redis or the backend was down are covered by the next trigger.
"""

from __future__ import annotations

import uuid
from typing import Any

from ml_backend.ids import MAX_ID, parse_project_ref

from .connection import get_connection, redis_errors
from .keys import pending_key, projects_key
from .scheduling import schedule_training

ANNOTATION_CREATED = "ANNOTATION_CREATED"
ANNOTATION_UPDATED = "ANNOTATION_UPDATED"
ANNOTATION_DELETED = "ANNOTATION_DELETED"
ANNOTATIONS_DELETED = "ANNOTATIONS_DELETED"  # bulk deletion from the Data Manager
START_TRAINING = "START_TRAINING"
HANDLED_EVENTS = (ANNOTATION_CREATED, ANNOTATION_UPDATED, ANNOTATION_DELETED, ANNOTATIONS_DELETED, START_TRAINING)


def _as_int(value: Any) -> int | None:
    """Project/task ids arrive as ints, strings or '<id>.<timestamp>' (the /setup form): ``ml_backend.ids``'
    ``parse_project_ref`` (bounded before any conversion), None instead of its ValueError."""
    try:
        return parse_project_ref(value)
    except ValueError:
        return None


def _raw_project_given(payload: dict) -> bool:
    """Whether the payload names a project at all (so an invalid one is reported as such, not as missing)."""
    project = payload.get("project")
    if isinstance(project, dict):
        return project.get("id") is not None
    if project is not None:
        return True
    holders = (payload.get("annotation"), payload.get("task"))
    return any(isinstance(h, dict) and h.get("project") is not None for h in holders)


def project_id_from_payload(payload: dict) -> int | None:
    """The project id from whichever of project / annotation / task carries it (every key is optional)."""
    project = payload.get("project")
    if isinstance(project, dict):
        pid = _as_int(project.get("id"))
        if pid is not None:
            return pid
    else:
        pid = _as_int(project)
        if pid is not None:
            return pid
    for holder in ("annotation", "task"):
        obj = payload.get(holder)
        if isinstance(obj, dict):
            pid = _as_int(obj.get("project"))
            if pid is not None:
                return pid
    return None


def _submission_key(payload: dict) -> str:
    """What counts as one submission: the task (re-saving a task counts once), else the annotation, else the event."""
    annotation = payload.get("annotation") if isinstance(payload.get("annotation"), dict) else {}
    task = payload.get("task") if isinstance(payload.get("task"), dict) else {}
    task_id = _as_int(task.get("id")) if task else None
    if task_id is None:
        task_id = _as_int(annotation.get("task")) if annotation else None
    if task_id is not None:
        return f"t{task_id}"
    ann_id = _as_int(annotation.get("id")) if annotation else None
    return f"a{ann_id}" if ann_id is not None else f"e{uuid.uuid4().hex}"


def handle_webhook(payload: Any, settings: Any) -> dict:
    """React to one Label Studio webhook in a few Redis operations; returns a JSON-able summary.

    ``status`` is one of: ``ignored`` (unknown event or no project id), ``counted`` (annotation counted, batch not
    complete), ``queued`` (a training job was enqueued), ``coalesced`` (a job is already waiting), ``acknowledged``
    (deletion: nothing to schedule, the next training re-reads Label Studio). Raises QueueUnavailable when Redis
    cannot be reached.
    """
    if not isinstance(payload, dict):
        return {"status": "ignored", "reason": f"payload is {type(payload).__name__}, expected a JSON object"}
    action = str(payload.get("action") or "").strip().upper()
    if action not in HANDLED_EVENTS:
        return {"status": "ignored", "action": action or None, "reason": "event not used by this backend"}
    pid = project_id_from_payload(payload)
    if pid is None:
        if _raw_project_given(payload):  # negative, zero, huge or not a number: no Redis key is ever created for it
            return {"status": "ignored", "action": action, "reason": f"project id is not an integer in 1..{MAX_ID}"}
        return {"status": "ignored", "action": action, "reason": "no project id in the payload"}
    conn = get_connection(settings.redis_url)
    result: dict[str, Any] = {"action": action, "project": pid}
    with redis_errors(settings):
        if action == START_TRAINING:
            conn.sadd(projects_key(), pid)
            result.update(schedule_training(pid, settings, reason="START_TRAINING", force=True, connection=conn))
            return result
        if action in (ANNOTATION_DELETED, ANNOTATIONS_DELETED):
            conn.sadd(projects_key(), pid)
            result.update(status="acknowledged", reason="deletions are picked up by the next training")
            return result
        annotation = payload.get("annotation") if isinstance(payload.get("annotation"), dict) else {}
        if annotation.get("was_cancelled"):
            result.update(status="ignored", reason="skipped task (was_cancelled)")
            return result
        pipe = conn.pipeline(transaction=True)
        pipe.sadd(pending_key(pid), _submission_key(payload))
        pipe.scard(pending_key(pid))
        pipe.sadd(projects_key(), pid)
        pending = int(pipe.execute()[1])
        threshold = max(1, int(settings.train_batch_size))
        result.update(pending=pending, threshold=threshold)
        if pending < threshold:
            result["status"] = "counted"
            return result
        result.update(schedule_training(pid, settings, reason=f"{pending} new annotations", connection=conn))
        return result
