"""Redis and RQ: webhook triggering, scheduling, the training lock, job status and the re-scoring protocol.

One owner of the Redis key layout (``keys``). Modules:

* ``keys``: every key name; ``connection``: pooled clients with short timeouts, the RQ queue, ``QueueUnavailable``;
* ``triggering``: webhook events -> batch counter -> ``scheduling.schedule_training`` (one waiting job per project);
* ``locks``: the per-project training lock (redis-py ``Lock``) and its flags; ``coordination.run_exclusive``: the
  protocol around one training job; ``status``: job progress, last job, ``queue_state``;
* ``rescoring``: the pool's chunks shared between workers after a training.

Why the webhook path looks like it does (a few Redis round trips, Label Studio as the source of truth): see
``triggering``.
"""

from .connection import (
    _CONNECTIONS,
    SOCKET_TIMEOUT_S,
    QueueUnavailable,
    get_connection,
    get_queue,
    redact,
    redis_errors,
)
from .coordination import run_exclusive
from .keys import MAX_ID, PROJECTS_KEY, chunk_id, decode, key, rescore_key, valid_id
from .locks import (
    LOCK_TTL_S,
    LockHeartbeat,
    acquire_training_lock,
    mark_dirty,
    release_queued_slot,
    release_training_lock,
    running_job,
    take_dirty,
    take_force_flag,
    take_pending,
    training_lock,
)
from .scheduling import (
    CLAIM_ATTEMPTS,
    FAILURE_TTL_S,
    JOB_RETRY,
    QUEUED_TTL_S,
    RESCORE_FUNC,
    RESULT_TTL_S,
    TRAIN_FUNC,
    WAITING_STATUSES,
    schedule_training,
)
from .status import JobProgress, queue_state, record_job
from .triggering import (
    ANNOTATION_CREATED,
    ANNOTATION_DELETED,
    ANNOTATION_UPDATED,
    ANNOTATIONS_DELETED,
    HANDLED_EVENTS,
    START_TRAINING,
    handle_webhook,
    project_id_from_payload,
)

__all__ = [
    "ANNOTATIONS_DELETED",
    "ANNOTATION_CREATED",
    "ANNOTATION_DELETED",
    "ANNOTATION_UPDATED",
    "CLAIM_ATTEMPTS",
    "FAILURE_TTL_S",
    "HANDLED_EVENTS",
    "JOB_RETRY",
    "LOCK_TTL_S",
    "MAX_ID",
    "PROJECTS_KEY",
    "QUEUED_TTL_S",
    "RESCORE_FUNC",
    "RESULT_TTL_S",
    "SOCKET_TIMEOUT_S",
    "START_TRAINING",
    "TRAIN_FUNC",
    "WAITING_STATUSES",
    "_CONNECTIONS",
    "JobProgress",
    "LockHeartbeat",
    "QueueUnavailable",
    "acquire_training_lock",
    "chunk_id",
    "decode",
    "get_connection",
    "get_queue",
    "handle_webhook",
    "key",
    "mark_dirty",
    "project_id_from_payload",
    "queue_state",
    "record_job",
    "redact",
    "redis_errors",
    "release_queued_slot",
    "release_training_lock",
    "rescore_key",
    "run_exclusive",
    "running_job",
    "schedule_training",
    "take_dirty",
    "take_force_flag",
    "take_pending",
    "training_lock",
    "valid_id",
]
