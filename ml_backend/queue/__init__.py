"""Redis and RQ: webhook triggering, scheduling, the training lock, job status and the re-scoring protocol.

One owner of the Redis key layout (``keys``: a named function per key). Modules:

* ``keys``: every key name; ``connection``: pooled clients with short timeouts, the RQ queue, ``QueueUnavailable``;
* ``triggering``: webhook events -> batch counter -> ``scheduling.schedule_training`` (one waiting job per project);
* ``locks``: the per-project training lock (redis-py ``Lock``) and its flags; ``coordination.run_exclusive``: the
  protocol around one training job; ``status``: job progress, last job, ``queue_state``;
* ``rescoring``: the pool's chunks shared between workers after a training.

Why the webhook path looks like it does (a few Redis round trips, Label Studio as the source of truth): see
``triggering``.

This package re-exports only the public API other packages use; everything else is imported from its module.
"""

from ml_backend.ids import MAX_ID

from .connection import QueueUnavailable, get_connection, get_queue, redact
from .coordination import run_exclusive
from .locks import (
    LOCK_TTL_S,
    LockHeartbeat,
    acquire_training_lock,
    release_queued_slot,
    release_training_lock,
    running_job,
    take_force_flag,
    take_pending,
)
from .scheduling import JOB_RETRY, schedule_training
from .status import queue_state
from .triggering import handle_webhook, project_id_from_payload

__all__ = [
    "JOB_RETRY",
    "LOCK_TTL_S",
    "MAX_ID",
    "LockHeartbeat",
    "QueueUnavailable",
    "acquire_training_lock",
    "get_connection",
    "get_queue",
    "handle_webhook",
    "project_id_from_payload",
    "queue_state",
    "redact",
    "release_queued_slot",
    "release_training_lock",
    "run_exclusive",
    "running_job",
    "schedule_training",
    "take_force_flag",
    "take_pending",
]
