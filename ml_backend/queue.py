"""Webhook triggering and coalescing of training jobs on Redis/RQ.

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

import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry
from rq import Queue, Retry
from rq.serializers import JSONSerializer

log = logging.getLogger(__name__)

ANNOTATION_CREATED = "ANNOTATION_CREATED"
ANNOTATION_UPDATED = "ANNOTATION_UPDATED"
ANNOTATION_DELETED = "ANNOTATION_DELETED"
ANNOTATIONS_DELETED = "ANNOTATIONS_DELETED"  # bulk deletion from the Data Manager
START_TRAINING = "START_TRAINING"
HANDLED_EVENTS = (ANNOTATION_CREATED, ANNOTATION_UPDATED, ANNOTATION_DELETED, ANNOTATIONS_DELETED, START_TRAINING)

TRAIN_FUNC = "ml_backend.jobs.train_project"
RESCORE_FUNC = "ml_backend.jobs.rescore_chunk"
JOB_RETRY = {"max": 3, "interval": [10, 30, 60]}
QUEUED_TTL_S = 7 * 24 * 3600  # a forgotten slot (job deleted by hand) frees itself; also checked against RQ's status
LOCK_TTL_S = 60  # training lock lifetime without heartbeat: a killed worker blocks its project at most this long
# (its own re-run, same job id, re-enters at once; other jobs of the project wait at most this long)
RESULT_TTL_S = 7 * 24 * 3600
FAILURE_TTL_S = 30 * 24 * 3600
WAITING_STATUSES = {"queued", "deferred", "scheduled"}
CLAIM_ATTEMPTS = 50  # WATCH retries under contention (each a few ms); 1,000 webhooks from 8 threads need a handful
SOCKET_TIMEOUT_S = 0.5  # the webhook must answer within Label Studio's 1 s even when Redis is gone
MAX_ID = 2**31 - 1  # Label Studio's ids are positive 32-bit integers: anything else cannot name a project or task


class QueueUnavailable(RuntimeError):
    """Redis cannot be reached: the webhook answers 503 at once; the next trigger re-reads Label Studio."""


# ---------------------------------------------------------------------- connections
_CONNECTIONS: dict[tuple[str, float], redis.Redis] = {}
_CONN_GUARD = threading.Lock()


def get_connection(redis_url: str, *, socket_timeout: float = SOCKET_TIMEOUT_S) -> redis.Redis:
    """A pooled client with short timeouts and no retries (fail fast; the caller decides what to do)."""
    key = (redis_url, socket_timeout)
    with _CONN_GUARD:
        conn = _CONNECTIONS.get(key)
        if conn is None:
            conn = redis.Redis.from_url(
                redis_url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=RedisRetry(NoBackoff(), 0),
                health_check_interval=30,
            )
            _CONNECTIONS[key] = conn
        return conn


def redact(url: str) -> str:
    """The Redis URL without a password, for error messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def get_queue(settings: Any, connection: redis.Redis | None = None) -> Queue:
    """The backend's RQ queue, with the JSON serializer (job arguments are plain JSON, never pickles)."""
    conn = connection if connection is not None else get_connection(settings.redis_url)
    return Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)


_LOST_EVENT = "; the event was not queued, the next training trigger re-reads all annotations from Label Studio"


@contextlib.contextmanager
def _redis_errors(settings: Any, consequence: str = _LOST_EVENT) -> Iterator[None]:
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise QueueUnavailable(
            f"Redis at {redact(settings.redis_url)} is unreachable ({type(exc).__name__}: {exc}){consequence}"
        ) from exc
    except redis.exceptions.RedisError as exc:
        raise QueueUnavailable(f"Redis at {redact(settings.redis_url)} refused the operation: {exc}") from exc


# ---------------------------------------------------------------------- keys
def key(project_id: int | str, name: str) -> str:
    return f"mlb:project:{project_id}:{name}"


PROJECTS_KEY = "mlb:projects"


def _decode(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


# ---------------------------------------------------------------------- payload parsing
def _as_int(value: Any) -> int | None:
    """Project/task ids arrive as ints, strings or '<id>.<timestamp>' (the /setup form); None unless 1..MAX_ID."""
    if isinstance(value, bool) or value is None:
        return None
    number: int | None = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        head = value.strip()[:32].split(".", 1)[0]  # bounded before int(): a 5,000-digit string is not an id
        number = int(head) if head.isascii() and head.isdigit() and len(head) <= 10 else None
    return number if number is not None and valid_id(number) else None


def valid_id(value: Any) -> bool:
    """A Label Studio id: an int (not bool) in 1..MAX_ID."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID


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


# ---------------------------------------------------------------------- webhook
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
    with _redis_errors(settings):
        if action == START_TRAINING:
            conn.sadd(PROJECTS_KEY, pid)
            result.update(schedule_training(pid, settings, reason="START_TRAINING", force=True, connection=conn))
            return result
        if action in (ANNOTATION_DELETED, ANNOTATIONS_DELETED):
            conn.sadd(PROJECTS_KEY, pid)
            result.update(status="acknowledged", reason="deletions are picked up by the next training")
            return result
        annotation = payload.get("annotation") if isinstance(payload.get("annotation"), dict) else {}
        if annotation.get("was_cancelled"):
            result.update(status="ignored", reason="skipped task (was_cancelled)")
            return result
        pipe = conn.pipeline(transaction=True)
        pipe.sadd(key(pid, "pending"), _submission_key(payload))
        pipe.scard(key(pid, "pending"))
        pipe.sadd(PROJECTS_KEY, pid)
        pending = int(pipe.execute()[1])
        threshold = max(1, int(settings.train_batch_size))
        result.update(pending=pending, threshold=threshold)
        if pending < threshold:
            result["status"] = "counted"
            return result
        result.update(schedule_training(pid, settings, reason=f"{pending} new annotations", connection=conn))
        return result


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
    if not valid_id(project_id):
        raise ValueError(f"project id must be an integer in 1..{MAX_ID}, got {project_id!r}")
    conn = connection if connection is not None else get_connection(settings.redis_url)
    qkey = key(project_id, "queued")
    with _redis_errors(settings):
        for _attempt in range(CLAIM_ATTEMPTS):
            with conn.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(qkey)
                    existing = _decode(pipe.get(qkey))
                    if existing and _job_status(pipe, existing) in WAITING_STATUSES:
                        if force:  # only while the slot still names that job (it may start meanwhile)
                            pipe.multi()
                            pipe.set(key(project_id, "force"), existing, ex=QUEUED_TTL_S)
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

    return _decode(conn.hget(Job.key_for(job_id), "status"))


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


# ---------------------------------------------------------------------- job side (used by ml_backend.jobs)
def take_pending(conn: redis.Redis, project_id: int) -> int:
    """Reset the batch counter as the job starts reading Label Studio; returns how many submissions it held."""
    pipe = conn.pipeline(transaction=True)
    pipe.scard(key(project_id, "pending"))
    pipe.delete(key(project_id, "pending"))
    return int(pipe.execute()[0])


def release_queued_slot(conn: redis.Redis, project_id: int, job_id: str) -> bool:
    """Free the ``queued`` slot if this job holds it (a job that started is no longer waiting)."""
    script = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
    return bool(conn.eval(script, 1, key(project_id, "queued"), job_id))


def take_force_flag(conn: redis.Redis, project_id: int, job_id: str) -> bool:
    """Whether a START_TRAINING was coalesced into this job."""
    script = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
    return bool(conn.eval(script, 1, key(project_id, "force"), job_id))


def acquire_training_lock(conn: redis.Redis, project_id: int, job_id: str, ttl: int = LOCK_TTL_S) -> bool:
    """One training per project at a time, across all workers (a re-run of the same job id re-enters)."""
    lkey = key(project_id, "lock")
    if conn.set(lkey, job_id, nx=True, ex=ttl):
        return True
    return _decode(conn.get(lkey)) == job_id and bool(conn.expire(lkey, ttl))


def release_training_lock(conn: redis.Redis, project_id: int, job_id: str) -> bool:
    script = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
    return bool(conn.eval(script, 1, key(project_id, "lock"), job_id))


def running_job(conn: redis.Redis, project_id: int) -> str | None:
    return _decode(conn.get(key(project_id, "lock")))


def mark_dirty(conn: redis.Redis, project_id: int, *, force: bool) -> None:
    """Ask the running job for one follow-up; "force" (a START_TRAINING) wins over "annotations"."""
    if force:
        conn.set(key(project_id, "dirty"), "force", ex=QUEUED_TTL_S)
    else:
        conn.set(key(project_id, "dirty"), "annotations", nx=True, ex=QUEUED_TTL_S)


def take_dirty(conn: redis.Redis, project_id: int) -> str | None:
    """Read-and-clear the follow-up flag (GETDEL: exactly one finishing job sees it)."""
    return _decode(conn.getdel(key(project_id, "dirty")))


class LockHeartbeat:
    """Keeps the training lock alive from a daemon thread while the job runs (it expires if the worker dies)."""

    def __init__(self, conn: redis.Redis, project_id: int, job_id: str, ttl: int = LOCK_TTL_S) -> None:
        self.conn, self.project_id, self.job_id, self.ttl = conn, project_id, job_id, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lock-heartbeat-{project_id}", daemon=True)
        self.lost = False

    def _run(self) -> None:
        lkey = key(self.project_id, "lock")
        script = (
            "if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('expire', KEYS[1], ARGV[2]) else return 0 end"
        )
        while not self._stop.wait(self.ttl / 4):
            try:
                if not self.conn.eval(script, 1, lkey, self.job_id, self.ttl):
                    self.lost = True
                    log.error("project %s: training lock lost (expired or taken over)", self.project_id)
            except redis.exceptions.RedisError as exc:  # keep training; the lock may expire, logged
                log.warning("project %s: lock heartbeat failed: %s", self.project_id, exc)

    def __enter__(self) -> LockHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def record_job(conn: redis.Redis, project_id: int, info: dict) -> None:
    """Last job's summary per project (for `ml_backend.cli status`)."""
    import json

    conn.set(key(project_id, "last_job"), json.dumps(info, default=str), ex=FAILURE_TTL_S)


# ---------------------------------------------------------------------- visibility
def queue_state(project_id: int, settings: Any, connection: redis.Redis | None = None) -> dict:
    """Queued/running/failed training jobs of a project, the pending counter and the last job's summary."""
    import json

    from rq.job import Job

    conn = connection if connection is not None else get_connection(settings.redis_url, socket_timeout=2.0)
    queue = get_queue(settings, conn)
    prefix = f"train-p{project_id}-"
    with _redis_errors(settings, consequence=""):
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
        last = _decode(conn.get(key(project_id, "last_job")))
        return {
            "queued": queued,
            "scheduled_retries": scheduled,
            "started": started,
            "running": lock_holder,
            "running_progress": running_meta,
            "failed": failed,
            "finished": finished[-5:],
            "pending_annotations": int(conn.scard(key(project_id, "pending"))),
            "threshold": int(settings.train_batch_size),
            "follow_up_flag": _decode(conn.get(key(project_id, "dirty"))),
            "last_job": json.loads(last) if last else None,
        }
