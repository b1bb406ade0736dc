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

Redis outages. Stock RQ quits its main loop on any Redis error outside its blocking dequeue (a heartbeat during a job,
the registry clean-up, the state updates), so a worker died within seconds of a Redis restart. Here every Redis call
of the main loop that can fail is retried, not the loop as a whole (re-running ``execute_job`` could run a job twice):

* idle: waiting for Redis with capped exponential backoff (``WORKER_REDIS_RETRY_MAX_S``, ``RedisBackoff``), a warning
  per try, and back to the same loop once it answers PING;
* busy: the work horse keeps running (training needs no Redis); the missed heartbeats are skipped and resumed once
  Redis is back, then the horse records its result itself. A job whose end could not be recorded stays in the
  started registry (with the append-only file) and is re-queued by the abandoned-job logic above;
* after every outage (and at every heartbeat, one cheap round trip) the worker checks that it is still registered
  (``rq:workers``, its hash): a Redis restarted without its data, or an outage longer than the worker's TTL, lost
  that; it registers again, re-subscribes to its command channel and restarts its scheduler at the next maintenance;
* ``WORKER_REDIS_GIVE_UP_S`` > 0: after that long unreachable the worker exits with code 3 (``RedisGaveUp``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from rq import Worker, worker_registration
from rq.exceptions import AbandonedJobError

from ml_backend.config import get_settings

log = logging.getLogger(__name__)

PARENT_POLL_S = 1.0
FIRST_RETRY_S = 1.0
GAVE_UP_EXIT_CODE = 3
# What an unreachable Redis raises (refused, reset, closed by the server, timed out): redis-py maps socket errors to
# these two (neither is a subclass of the other).
REDIS_DOWN: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

T = TypeVar("T")


class RedisGaveUp(SystemExit):
    """Redis was unreachable for longer than WORKER_REDIS_GIVE_UP_S: the worker exits (code 3).

    A SystemExit so that RQ's work loop re-raises it (it swallows other exceptions and exits 0), after its teardown.
    """

    def __init__(self) -> None:
        super().__init__(GAVE_UP_EXIT_CODE)


def _redis_retry_settings() -> tuple[float, float]:
    """(longest wait between tries, give up after; 0 = never) from Settings."""
    settings = get_settings()
    return float(settings.worker_redis_retry_max_s), float(settings.worker_redis_give_up_s)


class RedisBackoff:
    """One Redis outage: when it started, the next wait (1 s, doubling, capped) and the give-up deadline."""

    def __init__(self, retry_max_s: float, give_up_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_max_s = retry_max_s
        self.give_up_s = give_up_s
        self.clock = clock
        self.since: float | None = None
        self.next_wait_s = min(FIRST_RETRY_S, retry_max_s)

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, *, escalate: bool = True) -> float:
        """Note a failed call; return how long to wait before the next one (doubled for the try after that unless
        ``escalate`` is False: a call on its own schedule, like a running job's heartbeat, waits for nothing).
        Raises RedisGaveUp once the outage is older than the give-up limit."""
        now = self.clock()
        if self.since is None:
            self.since = now
        if self.give_up_s and now - self.since >= self.give_up_s:
            raise RedisGaveUp()
        wait = self.next_wait_s
        if escalate:
            self.next_wait_s = min(self.next_wait_s * 2, self.retry_max_s)
        return wait

    def recovered(self) -> float | None:
        """Note a successful call; return the outage's length in seconds if one just ended, else None."""
        if self.since is None:
            return None
        lasted = self.clock() - self.since
        self.since = None
        self.next_wait_s = min(FIRST_RETRY_S, self.retry_max_s)
        return lasted


def wait_until_reachable(conn: redis.Redis, backoff: RedisBackoff, logger: logging.Logger, what: str) -> None:
    """Block until ``conn`` answers PING, trying with ``backoff`` and a warning per failed try."""
    while True:
        try:
            conn.ping()
        except REDIS_DOWN as exc:
            wait = backoff.failed()
            logger.warning("%s: Redis unreachable (%s); next try in %.0f s", what, exc, wait)
            time.sleep(wait)
            continue
        lasted = backoff.recovered()
        if lasted is not None:
            logger.warning("%s: Redis is back after %.0f s", what, lasted)
        return


def _abandoned_after_s() -> tuple[int, int]:
    """(heartbeat, abandoned-after) seconds from Settings; read lazily so importing this module needs no env."""
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
    """``rq.Worker`` with a configurable heartbeat grace, immediate re-queue of abandoned jobs, orphan-proof horses,
    and a main loop that waits out Redis outages instead of quitting (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        heartbeat, abandoned_after = _abandoned_after_s()
        # The execution's TTL is min(remaining job time, monitoring interval) + grace (RQ's grace is a fixed 60 s).
        self.heartbeat_grace_s = max(1, abandoned_after - min(heartbeat, int(self.job_monitoring_interval)))
        self.push_exc_handler(requeue_abandoned_at_once)
        retry_max_s, give_up_s = _redis_retry_settings()
        self.redis_backoff = RedisBackoff(retry_max_s, give_up_s)
        self.max_connection_wait_time = retry_max_s  # the cap of RQ's own retry inside its blocking dequeue

    # ------------------------------------------------------------------ Redis outages
    def _note_outage(self, exc: BaseException, *, escalate: bool = True) -> float:
        """Log a failed Redis call (the first of an outage says what the worker does meanwhile); return the wait."""
        first = not self.redis_backoff.down
        wait = self.redis_backoff.failed(escalate=escalate)
        if first:
            give_up = self.redis_backoff.give_up_s
            self.log.warning(
                "Worker %s: Redis unreachable (%s): waiting for it (backoff up to %.0f s, %s)%s",
                self.name,
                exc,
                self.redis_backoff.retry_max_s,
                f"giving up after {give_up:.0f} s" if give_up else "never giving up",
                "; the running job goes on" if self.horse_pid else "",
            )
        return wait

    def wait_for_redis(self, exc: BaseException) -> None:
        """Block (capped exponential backoff) until Redis answers, then make sure this worker is registered."""
        try:
            time.sleep(self._note_outage(exc))
            wait_until_reachable(self.connection, self.redis_backoff, self.log, f"Worker {self.name}")
        except RedisGaveUp:
            self._log_give_up()
            raise
        self._after_outage()

    def _log_give_up(self) -> None:
        give_up = self.redis_backoff.give_up_s
        self.log.error("Worker %s: Redis unreachable for %.0f s (WORKER_REDIS_GIVE_UP_S): giving up, exit code %d",
                       self.name, give_up, GAVE_UP_EXIT_CODE)  # fmt: skip

    def _after_outage(self) -> None:
        """Redis answers: log the end of an outage, register again if it lost us, re-subscribe a dead channel."""
        lasted = self.redis_backoff.recovered()
        if lasted is not None:
            self.log.warning("Worker %s: Redis is back after %.0f s of outage", self.name, lasted)
        self.ensure_registered()
        thread = getattr(self, "pubsub_thread", None)
        if thread is not None and not thread.is_alive():
            with contextlib.suppress(*REDIS_DOWN):
                self.subscribe()

    def ensure_registered(self) -> None:
        """Register again (hash, ``rq:workers`` sets, state) if Redis lost this worker: restarted without its data,
        or unreachable for longer than the worker's TTL. Monitoring (``rq info``, ``cli status``) sees it again."""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.sismember(self.redis_workers_keys, self.key)
            pipe.hexists(self.key, "birth")
            listed, born = pipe.execute()
        if listed and born:
            return
        self.log.warning("Worker %s: its registration was lost in Redis (restarted without data?): registering again",
                         self.name)  # fmt: skip
        with self.connection.pipeline() as pipe:
            pipe.hset(self.key, mapping=self.serialize())
            pipe.hset(self.key, "state", self.get_state())
            worker_registration.register(self, pipe)
            pipe.expire(self.key, self.worker_ttl + 60)
            pipe.execute()

    def _retrying(self, call: Callable[[], T]) -> T:
        """``call()``, retried after waiting for Redis: only for calls that are safe to repeat."""
        while True:
            try:
                return call()
            except REDIS_DOWN as exc:
                self.wait_for_redis(exc)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """The worker's heartbeat; on its own connection it waits out an outage and checks the registration.

        RQ's blocking dequeue retries its own connection errors but calls this first on every try, so an idle worker
        waits here (with the give-up limit) and re-registers before it dequeues again.
        """
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
            return

        beat_once = super().heartbeat

        def beat() -> None:
            beat_once(timeout)
            self.ensure_registered()

        self._retrying(beat)

    def maintain_heartbeats(self, job: Any, execution: Any) -> None:
        """The job's heartbeat while its horse runs: a failed one is skipped (the horse keeps working, the next try
        comes one monitoring interval later); the first after an outage re-registers the worker."""
        try:
            super().maintain_heartbeats(job, execution)
            if self.redis_backoff.down:
                self._after_outage()
            else:
                self.ensure_registered()
        except REDIS_DOWN as exc:
            try:
                self._note_outage(exc, escalate=False)
            except RedisGaveUp:
                self._log_give_up()  # the horse stops itself once this process is gone; the job is abandoned
                raise
            self.log.debug("Worker %s: job %s: heartbeat skipped, Redis unreachable (%s)", self.name, job.id, exc)

    def execute_job(self, job: Any, queue: Any) -> None:
        """Run one job; if Redis fails while its start or end is recorded, the job is left to the abandoned-job
        recovery (its execution stays in the started registry) and the worker waits for Redis instead of quitting.
        Never re-run here: the horse may have done the work already."""
        try:
            super().execute_job(job, queue)
        except REDIS_DOWN as exc:
            self.log.warning(
                "Worker %s: job %s: Redis unreachable while recording its start or end (%s); if it is not recorded "
                "once Redis is back, it is re-queued as abandoned (AOF) or lost with Redis' data (no persistence)",
                self.name, job.id, exc,
            )  # fmt: skip
            self.wait_for_redis(exc)

    def check_for_suspension(self, burst: bool) -> None:
        """``rq suspend`` check, retried after an outage (RQ calls it outside any retry)."""
        check = super().check_for_suspension
        self._retrying(lambda: check(burst))

    def run_maintenance_tasks(self) -> None:
        """Registry clean-up (and the scheduler's restart if it died, e.g. in an outage), retried after an outage."""
        self._retrying(super().run_maintenance_tasks)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """RQ's dequeue; its first call (the IDLE state) is outside RQ's own retry, so this retries the whole call
        (nothing was dequeued when that fails)."""
        dequeue = super().dequeue_job_and_maintain_ttl
        return self._retrying(lambda: dequeue(timeout, max_idle_time))

    def set_shutdown_requested_date(self) -> None:
        """Called from the SIGTERM handler: an outage must not turn a warm shutdown into an exception mid-job."""
        try:
            super().set_shutdown_requested_date()
        except REDIS_DOWN as exc:
            self.log.warning("Worker %s: shutdown request not recorded in Redis (%s)", self.name, exc)

    def teardown(self) -> None:
        """RQ's teardown (stop the scheduler, register death, unsubscribe); with Redis down the death is not
        recorded: the worker's key expires after its TTL."""
        try:
            super().teardown()
        except REDIS_DOWN as exc:
            self.log.warning("Worker %s: could not register its death, Redis unreachable (%s)", self.name, exc)
            with contextlib.suppress(Exception):
                self.unsubscribe()

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
