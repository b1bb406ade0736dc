"""The RQ worker class of the backend: a killed worker's job is re-queued within about a minute, and runs once.

Why not the stock ``rq.Worker`` settings: RQ marks a running job abandoned only when its heartbeat is older than the
monitoring interval plus a fixed 60 s, an idle worker looks for abandoned jobs only every ``worker_ttl - 15`` s
(405 s by default) once the 10-minute maintenance interval has passed, and an abandoned job's retry waits for its
backoff interval and for the scheduler (whose lock a killed worker may hold for another 61 s). Together that made a
``kill -9`` of a worker mid-training cost 13.5 minutes. Here (``Settings``):

* the job heartbeat is refreshed every ``WORKER_HEARTBEAT_S`` by the worker's main process (the training runs in a
  forked work horse, so a busy job never delays it) and expires ``WORKER_ABANDONED_AFTER_S`` after the last one;
* idle workers look for expired jobs every ``WORKER_MAINTENANCE_S`` (the CLI sets ``--maintenance-interval`` and
  ``--worker-ttl`` to match, see ``ml_backend.cli.worker_command``);
* an abandoned job with retries left is re-queued at once (its backoff interval is for errors the job raised, not for
  a dead worker), so neither the scheduler nor a backoff delays it;
* a work horse whose worker died stops itself: nobody refreshes its heartbeat any more, so its job is about to be
  re-run elsewhere and must not run twice at the same time.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from rq import Worker
from rq.exceptions import AbandonedJobError

log = logging.getLogger(__name__)

PARENT_POLL_S = 1.0


def _abandoned_after_s() -> tuple[int, int]:
    """(heartbeat, abandoned-after) seconds from Settings; read lazily so importing this module needs no env."""
    from ml_backend.config import get_settings

    settings = get_settings()
    return int(settings.worker_heartbeat_s), int(settings.worker_abandoned_after_s)


def requeue_abandoned_at_once(job: Any, exc_type: type[BaseException] | None, *_: Any) -> None:
    """Exception handler: an abandoned job's retry skips its backoff interval (and so the scheduler).

    RQ calls the worker's exception handlers for each abandoned job just before ``job.retry()``, which waits
    ``retry_intervals[len(intervals) - retries_left]``; that one slot is set to 0 on this job object, so the job is
    re-queued immediately and a later failure of the job itself still backs off as configured.
    """
    if exc_type is not AbandonedJobError or not job.retries_left or not job.retry_intervals:
        return
    intervals = list(job.retry_intervals)
    intervals[max(len(intervals) - int(job.retries_left), 0)] = 0  # the index Job.get_retry_interval reads next
    job.retry_intervals = intervals
    log.warning("job %s was abandoned by a dead worker: re-queued now (%s retries left)", job.id, job.retries_left)


class RecoveringWorker(Worker):
    """``rq.Worker`` with a configurable heartbeat grace, immediate re-queue of abandoned jobs, orphan-proof horses."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        heartbeat, abandoned_after = _abandoned_after_s()
        # The execution's TTL is min(remaining job time, monitoring interval) + grace (RQ's grace is a fixed 60 s).
        self.heartbeat_grace_s = max(1, abandoned_after - min(heartbeat, int(self.job_monitoring_interval)))
        self.push_exc_handler(requeue_abandoned_at_once)

    def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
        """How long the job's started-registry entry lives without a heartbeat (RQ's formula, our grace)."""
        interval = int(self.job_monitoring_interval)
        if job.timeout and job.timeout > 0:
            return int(max(1, min(job.timeout - working_time, interval))) + self.heartbeat_grace_s
        return interval + self.heartbeat_grace_s

    def main_work_horse(self, job: Any, queue: Any) -> None:
        """Run the job in the forked horse, which exits as soon as its worker process is gone."""
        parent = os.getppid()

        def watch() -> None:
            stop = threading.Event()
            while not stop.wait(PARENT_POLL_S):
                if os.getppid() != parent:
                    log.error("job %s: worker process %d died; stopping so the job is re-run once", job.id, parent)
                    os._exit(1)

        threading.Thread(target=watch, name="worker-watchdog", daemon=True).start()
        super().main_work_horse(job, queue)
