"""Job status: a running job's progress (``job.meta``: phase, step, timings), the last job's summary per project,
and the queue state of a project (``ml-backend status``)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import redis
from rq.serializers import JSONSerializer

from .connection import get_connection, get_queue, redis_errors
from .keys import decode, dirty_key, last_job_key, pending_key
from .locks import running_job
from .scheduling import FAILURE_TTL_S

log = logging.getLogger(__name__)


class JobProgress:
    """Job progress into ``job.meta`` (visible to `cli status` and rq dashboards) and into the worker's log."""

    def __init__(self, job: Any, project_id: int) -> None:
        self.job, self.project_id = job, project_id
        self.timings: dict[str, float] = {}

    def update(self, **fields: Any) -> None:
        if self.job is None:
            return
        self.job.meta.update(fields)
        with contextlib.suppress(Exception):  # progress must never kill the training
            self.job.save_meta()

    def published(self, version: str, meta: dict) -> None:
        """The round's version is live: `cli status` shows it (and its metrics) while the pool is re-scored."""
        self.update(version=version, metrics=meta.get("metrics"))
        log.info(
            "project %s: promoted %s, val IoU %s", self.project_id, version, (meta.get("metrics") or {}).get("val_iou")
        )

    def train_step(self, info: dict) -> None:
        self.update(phase="train", progress=info, train=info)  # "train": its last step, kept after the phase
        val = info.get("val_iou")
        log.info(
            "project %s: step %s/%s loss %.4f val IoU %s",
            self.project_id, info.get("step"), info.get("steps"), info.get("loss") or float("nan"),
            "n/a" if val is None else f"{val:.4f}",
        )  # fmt: skip

    def phase_step(self, info: dict) -> None:
        """The running phase's own progress ({step, steps, unit, seconds, eta_s}), e.g. the score phase's tasks."""
        self.update(progress=info)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.update(phase=name, progress={})  # each phase shows its own progress, never the last phase's
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.timings[f"{name}_s"] = round(time.monotonic() - t0, 3)
            self.update(timings=self.timings)


def record_job(conn: redis.Redis, project_id: int, info: dict) -> None:
    """Last job's summary per project (for `ml_backend.cli status`)."""
    import json

    conn.set(last_job_key(project_id), json.dumps(info, default=str), ex=FAILURE_TTL_S)


def queue_state(project_id: int, settings: Any, connection: redis.Redis | None = None) -> dict:
    """Queued/running/failed training jobs of a project, the pending counter and the last job's summary."""
    import json

    from rq.job import Job

    conn = connection if connection is not None else get_connection(settings.redis_url, socket_timeout=2.0)
    queue = get_queue(settings, conn)
    prefix = f"train-p{project_id}-"
    with redis_errors(settings, consequence=""):
        queued = [j for j in queue.get_job_ids() if j.startswith(prefix)]
        scheduled = [j for j in queue.scheduled_job_registry.get_job_ids() if j.startswith(prefix)]
        started = [j for j in queue.started_job_registry.get_job_ids() if j.startswith(prefix)]
        failed_ids = [j for j in queue.failed_job_registry.get_job_ids() if j.startswith(prefix)]
        finished = [j for j in queue.finished_job_registry.get_job_ids() if j.startswith(prefix)]
        failed = []
        for job in Job.fetch_many(failed_ids[-5:], connection=conn, serializer=JSONSerializer):
            if job is None:
                continue
            exc = job.exc_info or ""
            failed.append({"id": job.id, "ended": str(job.ended_at), "error": exc.strip().splitlines()[-1:] or [""]})
        running_meta = None
        lock_holder = running_job(conn, project_id)
        if lock_holder:
            job = Job.fetch_many([lock_holder], connection=conn, serializer=JSONSerializer)[0]
            running_meta = job.get_meta(refresh=True) if job is not None else None
        last = decode(conn.get(last_job_key(project_id)))
        return {
            "queued": queued,
            "scheduled_retries": scheduled,
            "started": started,
            "running": lock_holder,
            "running_progress": running_meta,
            "failed": failed,
            "finished": finished[-5:],
            "pending_annotations": int(conn.scard(pending_key(project_id))),
            "threshold": int(settings.train_batch_size),
            "follow_up_flag": decode(conn.get(dirty_key(project_id))),
            "last_job": json.loads(last) if last else None,
        }
