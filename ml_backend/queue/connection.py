"""Redis connections (pooled, short timeouts, no retries: the webhook must answer within Label Studio's 1 s), the
backend's RQ queue (JSON serializer: job arguments are never pickles), and Redis errors as ``QueueUnavailable``."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry
from rq import Queue
from rq.serializers import JSONSerializer

SOCKET_TIMEOUT_S = 0.5  # the webhook must answer within Label Studio's 1 s even when Redis is gone


class QueueUnavailable(RuntimeError):
    """Redis cannot be reached: the webhook answers 503 at once; the next trigger re-reads Label Studio."""


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
def redis_errors(settings: Any, consequence: str = _LOST_EVENT) -> Iterator[None]:
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise QueueUnavailable(
            f"Redis at {redact(settings.redis_url)} is unreachable ({type(exc).__name__}: {exc}){consequence}"
        ) from exc
    except redis.exceptions.RedisError as exc:
        raise QueueUnavailable(f"Redis at {redact(settings.redis_url)} refused the operation: {exc}") from exc
