"""The per-project training lock and the small flags around it (batch counter, queued slot, force, follow-up).

The lock is redis-py's ``Lock`` (SET NX PX with a token; release and extension are its own compare-and-act Lua
scripts) with the job id as token, so a re-run of the same job (RQ retry, recovery) re-enters, and a killed worker
frees its project after ``LOCK_TTL_S``. The queued slot and the force flag are compare-and-delete on plain keys
(not locks: nobody waits on them), kept as one short script each.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from redis.lock import Lock

from .keys import decode, dirty_key, force_key, lock_key, pending_key, queued_key
from .scheduling import QUEUED_TTL_S

log = logging.getLogger(__name__)

LOCK_TTL_S = 60  # training lock lifetime without heartbeat: a killed worker blocks its project at most this long
# (its own re-run, same job id, re-enters at once; other jobs of the project wait at most this long)

_COMPARE_AND_DELETE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
)


def take_pending(conn: redis.Redis, project_id: int) -> int:
    """Reset the batch counter as the job starts reading Label Studio; returns how many submissions it held."""
    pipe = conn.pipeline(transaction=True)
    pipe.scard(pending_key(project_id))
    pipe.delete(pending_key(project_id))
    return int(pipe.execute()[0])


def _compare_and_delete(conn: redis.Redis, name: str, value: str) -> bool:
    return bool(conn.eval(_COMPARE_AND_DELETE, 1, name, value))


def release_queued_slot(conn: redis.Redis, project_id: int, job_id: str) -> bool:
    """Free the ``queued`` slot if this job holds it (a job that started is no longer waiting)."""
    return _compare_and_delete(conn, queued_key(project_id), job_id)


def take_force_flag(conn: redis.Redis, project_id: int, job_id: str) -> bool:
    """Whether a START_TRAINING was coalesced into this job."""
    return _compare_and_delete(conn, force_key(project_id), job_id)


def training_lock(conn: redis.Redis, project_id: int, job_id: str, ttl: int = LOCK_TTL_S) -> Lock:
    """The project's training lock as a redis-py Lock whose token is ``job_id`` (usable from any thread)."""
    lock = Lock(conn, lock_key(project_id), timeout=ttl, thread_local=False)
    lock.local.token = job_id.encode()
    return lock


def acquire_training_lock(conn: redis.Redis, project_id: int, job_id: str, ttl: int = LOCK_TTL_S) -> bool:
    """One training per project at a time, across all workers (a re-run of the same job id re-enters)."""
    lock = training_lock(conn, project_id, job_id, ttl)
    if lock.acquire(blocking=False, token=job_id):
        return True
    try:
        return bool(lock.reacquire())  # held by this very job id (a retry or recovery of it): extend and re-enter
    except redis.exceptions.LockError:
        return False


def release_training_lock(conn: redis.Redis, project_id: int, job_id: str) -> bool:
    try:
        training_lock(conn, project_id, job_id).release()
        return True
    except redis.exceptions.LockError:  # not held (expired) or held by another job: nothing to release
        return False


def running_job(conn: redis.Redis, project_id: int) -> str | None:
    return decode(conn.get(lock_key(project_id)))


def mark_dirty(conn: redis.Redis, project_id: int, *, force: bool) -> None:
    """Ask the running job for one follow-up; "force" (a START_TRAINING) wins over "annotations"."""
    if force:
        conn.set(dirty_key(project_id), "force", ex=QUEUED_TTL_S)
    else:
        conn.set(dirty_key(project_id), "annotations", nx=True, ex=QUEUED_TTL_S)


def take_dirty(conn: redis.Redis, project_id: int) -> str | None:
    """Read-and-clear the follow-up flag (GETDEL: exactly one finishing job sees it)."""
    return decode(conn.getdel(dirty_key(project_id)))


class LockHeartbeat:
    """Keeps the training lock alive from a daemon thread while the job runs (it expires if the worker dies)."""

    def __init__(self, conn: redis.Redis, project_id: int, job_id: str, ttl: int = LOCK_TTL_S) -> None:
        self.lock, self.project_id, self.ttl = training_lock(conn, project_id, job_id, ttl), project_id, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lock-heartbeat-{project_id}", daemon=True)
        self.lost = False

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.lock.reacquire()
            except redis.exceptions.LockError:
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
