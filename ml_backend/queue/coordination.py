"""The coordination around one training job: queued slot, per-project lock + heartbeat, follow-up flag, job record.

Separate from the training itself so that the protocol is tested with a real Redis and no Label Studio.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from ml_backend.active_learning.project import ProjectNotFound
from ml_backend.config import Settings
from ml_backend.ids import MAX_ID, is_id

from .connection import get_connection
from .keys import queued_key
from .locks import (
    LockHeartbeat,
    acquire_training_lock,
    mark_dirty,
    release_queued_slot,
    release_training_lock,
    running_job,
    take_dirty,
    take_force_flag,
)
from .scheduling import QUEUED_TTL_S, schedule_training
from .status import JobProgress, record_job

log = logging.getLogger(__name__)


def redis_for_job(job: Any, settings: Settings):
    if job is not None:
        return job.connection
    return get_connection(settings.redis_url, socket_timeout=10.0)


def run_exclusive(
    pid: int,
    settings: Settings,
    job: Any,
    body: Callable[[bool, JobProgress, Any, str], dict],
    *,
    force: bool,
    reason: str,
    conn: Any = None,
    job_id: str | None = None,
) -> dict:
    """The coordination around one training: queued slot, per-project lock + heartbeat, follow-up flag.

    A job that finds another training of the project running marks the follow-up flag and returns "deferred"; the
    running job, when it ends (success or failure), schedules exactly one follow-up if the flag is set. Separate
    from the training itself so the protocol is tested with a real Redis and no Label Studio.
    """
    job_id = job_id or (job.id if job is not None else f"local-{uuid.uuid4().hex[:12]}")
    if not is_id(pid):
        if job is not None:
            job.retries_left = 0
        raise ProjectNotFound(f"project id must be an integer in 1..{MAX_ID}, got {pid!r}")
    conn = conn if conn is not None else redis_for_job(job, settings)
    release_queued_slot(conn, pid, job_id)
    force = force or take_force_flag(conn, pid, job_id)
    while not acquire_training_lock(conn, pid, job_id):
        other = running_job(conn, pid)
        mark_dirty(conn, pid, force=force)
        if running_job(conn, pid) is not None:
            log.info("project %s: training %s is running; %s becomes its follow-up", pid, other, job_id)
            return {"status": "deferred", "project": pid, "running": other}
        take_dirty(conn, pid)  # the other job ended between our two looks: nobody will read the flag, run now
    progress = JobProgress(job, pid)
    summary: dict[str, Any] = {"project": pid, "job": job_id, "reason": reason, "force": force}
    try:
        with LockHeartbeat(conn, pid, job_id):
            summary.update(body(force, progress, conn, job_id))
        summary["timings"] = progress.timings
        record_job(conn, pid, {**summary, "finished": time.time()})
        return summary
    except Exception as exc:
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}", timings=progress.timings)
        if isinstance(exc, ProjectNotFound) and job is not None:
            job.retries_left = 0  # RQ reads this when the job raises: straight to the failed registry, no retry
        with contextlib.suppress(Exception):
            record_job(conn, pid, {**summary, "finished": time.time()})
            if job is not None and (job.retries_left or 0) > 0:
                conn.set(queued_key(pid), job_id, nx=True, ex=QUEUED_TTL_S)  # new events join the retry
        log.error("project %s: training job %s failed: %s", pid, job_id, summary["error"])
        raise
    finally:
        release_training_lock(conn, pid, job_id)
        follow = take_dirty(conn, pid)
        if follow:
            try:
                out = schedule_training(
                    pid, settings, reason="follow-up of events during training", force=follow == "force",
                    connection=conn,
                )  # fmt: skip
                log.info("project %s: follow-up training %s (%s)", pid, out.get("job_id"), out.get("status"))
            except Exception as exc:  # the next webhook or START_TRAINING re-reads everything anyway
                log.error("project %s: could not schedule the follow-up training: %s", pid, exc)
