"""Scheduling training jobs: at most one waiting job per project, claimed and enqueued in one Redis transaction.

The RQ job functions are named by dotted path (``TRAIN_FUNC``, ``RESCORE_FUNC``); they stay importable under these
names (``ml_backend.jobs``), so a job queued by an older version of the backend still resolves.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from typing import Any

import redis
from rq import Retry

from ml_backend.ids import MAX_ID, is_id

from .connection import QueueUnavailable, get_connection, get_queue, redis_errors
from .keys import decode, force_key, queued_key

log = logging.getLogger(__name__)

TRAIN_FUNC = "ml_backend.jobs.train_project"
RESCORE_FUNC = "ml_backend.jobs.rescore_chunk"
JOB_RETRY = {"max": 3, "interval": [10, 30, 60]}
QUEUED_TTL_S = 7 * 24 * 3600  # a forgotten slot (job deleted by hand) frees itself; also checked against RQ's status
RESULT_TTL_S = 7 * 24 * 3600
FAILURE_TTL_S = 30 * 24 * 3600
WAITING_STATUSES = {"queued", "deferred", "scheduled"}
CLAIM_ATTEMPTS = 50  # WATCH retries under contention (each a few ms); 1,000 webhooks from 8 threads need a handful


def schedule_training(
    project_id: int,
    settings: Any,
    *,
    reason: str,
    force: bool = False,
    connection: redis.Redis | None = None,
) -> dict:
    """Enqueue ``train_project`` unless one is already waiting for this project (then: coalesced).

    ``force`` (START_TRAINING) trains even when Label Studio holds nothing new. A waiting job that is not forced is
    upgraded to forced, so a click on "Start training" is never swallowed by a coalesced annotation trigger.
    """
    if not is_id(project_id):
        raise ValueError(f"project id must be an integer in 1..{MAX_ID}, got {project_id!r}")
    conn = connection if connection is not None else get_connection(settings.redis_url)
    qkey = queued_key(project_id)
    with redis_errors(settings):
        for _attempt in range(CLAIM_ATTEMPTS):
            with conn.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(qkey)
                    existing = decode(pipe.get(qkey))
                    if existing and _job_status(pipe, existing) in WAITING_STATUSES:
                        if force:  # only while the slot still names that job (it may start meanwhile)
                            pipe.multi()
                            pipe.set(force_key(project_id), existing, ex=QUEUED_TTL_S)
                            pipe.execute()
                        else:
                            pipe.unwatch()
                        return {"status": "coalesced", "job_id": existing}
                    # Claim and enqueue in ONE transaction: the slot is never visible without its RQ job.
                    job_id = f"train-p{project_id}-{uuid.uuid4().hex[:12]}"
                    pipe.multi()
                    _enqueue_train(project_id, job_id, settings, conn, pipe, reason=reason, force=force)
                    pipe.set(qkey, job_id, ex=QUEUED_TTL_S)
                    pipe.execute()
                except redis.exceptions.WatchError:
                    time.sleep(random.uniform(0, 0.002))  # another webhook changed the slot: look again
                    continue
            log.info("project %s: queued training job %s (%s)", project_id, job_id, reason)
            return {"status": "queued", "job_id": job_id}
    raise QueueUnavailable(f"project {project_id}: could not take the training slot (Redis contention)")


def _job_status(conn: Any, job_id: str) -> str | None:
    """RQ's status of a job, straight from its hash (no payload deserialisation)."""
    from rq.job import Job

    return decode(conn.hget(Job.key_for(job_id), "status"))


def _enqueue_train(
    project_id: int, job_id: str, settings: Any, conn: redis.Redis, pipe: Any, *, reason: str, force: bool
) -> Any:
    """Buffer the creation and enqueueing of the RQ job on ``pipe`` (a MULTI pipeline: nothing runs until EXEC)."""
    queue = get_queue(settings, conn)
    timeout = int(2 * float(settings.train_time_budget_s) + 3600)  # training budget + reading + re-scoring
    return queue.enqueue_call(
        TRAIN_FUNC,
        pipeline=pipe,
        kwargs={"project_id": int(project_id), "force": bool(force), "reason": str(reason)},
        job_id=job_id,
        timeout=timeout,
        result_ttl=RESULT_TTL_S,
        failure_ttl=FAILURE_TTL_S,
        retry=Retry(**JOB_RETRY),
        description=f"train project {project_id} ({reason})",
        meta={"project": int(project_id), "reason": reason, "force": bool(force), "enqueued": time.time()},
    )


PRETRAIN_FUNC = "ml_backend.jobs.pretrain_project"


def schedule_pretraining(project_id: int, settings: Any, *, connection: redis.Redis | None = None) -> dict:
    """Enqueue the project's cold start (``ml_backend.jobs.pretrain_project``: self-supervised pretraining, then the
    coverage-ordered first queue) after an import; one job id per project, so repeated imports while it waits do not
    queue it twice. Returns {"status": "queued" | "already-queued" | "disabled", "job_id"}."""
    if not is_id(project_id):
        raise ValueError(f"project id must be an integer in 1..{MAX_ID}, got {project_id!r}")
    if not getattr(settings, "pretrain", False):
        return {"status": "disabled"}
    job_id = f"pretrain-{int(project_id)}"
    with redis_errors(settings, "; pretraining was not queued (run `ml-backend import` again or train without it)"):
        conn = connection if connection is not None else get_connection(settings.redis_url)
        status = _job_status(conn, job_id)
        if status in WAITING_STATUSES or status == "started":
            return {"status": "already-queued", "job_id": job_id}
        get_queue(settings, conn).enqueue_call(
            PRETRAIN_FUNC,
            kwargs={"project_id": int(project_id)},
            job_id=job_id,
            timeout=int(2 * float(settings.pretrain_time_budget_s) + 1800),  # budget + reading + the first queue
            result_ttl=RESULT_TTL_S,
            failure_ttl=FAILURE_TTL_S,
            retry=Retry(**JOB_RETRY),  # a killed worker: the retry resumes from the checkpoint
            description=f"pretrain project {project_id} (cold start)",
            meta={"project": int(project_id), "reason": "pretrain", "enqueued": time.time()},
        )
    log.info("project %s: pretraining job %s queued", project_id, job_id)
    return {"status": "queued", "job_id": job_id}
