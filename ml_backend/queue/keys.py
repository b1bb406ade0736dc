"""The Redis key layout of the backend, in one place: every key the webhook, the jobs and the status commands use.

Per project (``mlb:project:<id>:<name>``):

``pending``   set of task ids submitted since the last training job started reading annotations (the batch counter)
``queued``    id of the training job waiting in the queue (at most one per project)
``force``     id of the waiting job a START_TRAINING was coalesced into (it trains even with nothing new)
``lock``      the training lock: id of the job running now (TTL refreshed by a heartbeat)
``dirty``     follow-up flag set by a job that found another one running ("annotations" or "force")
``last_job``  JSON summary of the last training job (``ml-backend status``)
``rescore:<version>:ctx`` / ``:result:<chunk>`` / ``:claim:<chunk>``  the chunk-sharing protocol of re-scoring

Global: ``mlb:projects`` (set of project ids seen by the webhook). RQ's own keys (``rq:*``) belong to RQ.
"""

from __future__ import annotations

import hashlib
from typing import Any

MAX_ID = 2**31 - 1  # Label Studio's ids are positive 32-bit integers: anything else cannot name a project or task
PROJECTS_KEY = "mlb:projects"


def key(project_id: int | str, name: str) -> str:
    return f"mlb:project:{project_id}:{name}"


def rescore_key(pid: int, version: str, name: str) -> str:
    """A key of the re-scoring of ``version`` (its context, a chunk's result or claim)."""
    return key(pid, f"rescore:{version}:{name}")


def chunk_id(task_ids: list[int]) -> str:
    """Stable id of a chunk of the pool (the same task ids give the same chunk, whoever computes it)."""
    return hashlib.sha1(",".join(map(str, task_ids)).encode()).hexdigest()[:16]


def decode(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def valid_id(value: Any) -> bool:
    """A Label Studio id: an int (not bool) in 1..MAX_ID."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID
