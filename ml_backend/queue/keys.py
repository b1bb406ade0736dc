"""The Redis key layout of the backend, in one place: every key the webhook, the jobs and the status commands use.

Every key is built by a named function below; no other module spells a key. The strings are part of the deployed
state (a job queued by an older version reads them), so they never change.

Per project (``mlb:project:<id>:<name>``):

``pending``   set of task ids submitted since the last training job started reading annotations (the batch counter)
``queued``    id of the training job waiting in the queue (at most one per project)
``force``     id of the waiting job a START_TRAINING was coalesced into (it trains even with nothing new)
``lock``      the training lock: id of the job running now (TTL refreshed by a heartbeat)
``dirty``     follow-up flag set by a job that found another one running ("annotations" or "force")
``last_job``  JSON summary of the last training job (``ml-backend status``)
``rescore:<version>:ctx`` / ``:result:<chunk>`` / ``:claim:<chunk>``  the chunk-sharing protocol of re-scoring
``backlog:<version>:<task>``  the claim of one task of the /predict backlog

Global: ``mlb:projects`` (set of project ids seen by the webhook). RQ's own keys (``rq:*``) belong to RQ.
"""

from __future__ import annotations

import hashlib

PREFIX = "mlb:"  # every key of the backend starts with this


def _project(project_id: int | str, name: str) -> str:
    return f"{PREFIX}project:{project_id}:{name}"


def projects_key() -> str:
    """Set of the project ids seen by the webhook."""
    return f"{PREFIX}projects"


def pending_key(project_id: int | str) -> str:
    """Set of the submissions since the last training job read the annotations (the batch counter)."""
    return _project(project_id, "pending")


def queued_key(project_id: int | str) -> str:
    """Id of the project's training job waiting in the queue (the one waiting slot)."""
    return _project(project_id, "queued")


def force_key(project_id: int | str) -> str:
    """Id of the waiting job a START_TRAINING was coalesced into (it trains even with nothing new)."""
    return _project(project_id, "force")


def lock_key(project_id: int | str) -> str:
    """The training lock: id of the job running now."""
    return _project(project_id, "lock")


def dirty_key(project_id: int | str) -> str:
    """Follow-up flag left by a job that found another one running ("annotations" or "force")."""
    return _project(project_id, "dirty")


def last_job_key(project_id: int | str) -> str:
    """JSON summary of the project's last training job."""
    return _project(project_id, "last_job")


def _rescore(project_id: int | str, version: str, name: str) -> str:
    return _project(project_id, f"rescore:{version}:{name}")


def rescore_ctx_key(project_id: int | str, version: str) -> str:
    """Shared context of the re-scoring of ``version`` (strategy, image URLs, label config)."""
    return _rescore(project_id, version, "ctx")


def rescore_result_key(project_id: int | str, version: str, chunk: str) -> str:
    """Hash with the scores and masks of one chunk (``chunk_id``) of the re-scoring of ``version``."""
    return _rescore(project_id, version, f"result:{chunk}")


def rescore_claim_key(project_id: int | str, version: str, chunk: str) -> str:
    """Owner of one chunk (``chunk_id``) of the re-scoring of ``version`` while it is being scored."""
    return _rescore(project_id, version, f"claim:{chunk}")


def rescore_pattern(project_id: int | str) -> str:
    """Glob (KEYS/SCAN) matching every re-scoring key of the project, all versions."""
    return _project(project_id, "rescore:*")


def backlog_key(project_id: int | str, version: str, task_id: int) -> str:
    """The claim of one task of the /predict backlog of ``version``."""
    return _project(project_id, f"backlog:{version}:{int(task_id)}")


def project_pattern(project_id: int | str = "*") -> str:
    """Glob (KEYS/SCAN) matching every key of one project (every project by default)."""
    return _project(project_id, "*")


def all_pattern() -> str:
    """Glob (KEYS/SCAN) matching every key of the backend."""
    return f"{PREFIX}*"


def chunk_id(task_ids: list[int]) -> str:
    """Stable id of a chunk of the pool (the same task ids give the same chunk, whoever computes it)."""
    return hashlib.sha1(",".join(map(str, task_ids)).encode()).hexdigest()[:16]


def decode(value: bytes | str | None) -> str | None:
    """A Redis reply as text (None stays None)."""
    return value.decode() if isinstance(value, bytes) else value

