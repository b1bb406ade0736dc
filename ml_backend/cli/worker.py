"""``ml-backend worker``: the RQ worker of this backend (JSON serializer, scheduler, crash-recovery timing)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from ml_backend.config import ConfigError, Settings

WORKER_CLASS = "ml_backend.worker.RecoveringWorker"
log = logging.getLogger(__name__)


def worker_command(settings: Settings, *, burst: bool = False, name: str | None = None, extra: list[str] | None = None):
    """The `rq worker` command line for this backend: JSON serializer (no pickles), the backend's queue, the
    scheduler (needed for retries with backoff intervals) and the crash-recovery timing of ``ml_backend.worker``.

    An idle RQ worker wakes every ``worker_ttl - 15`` s and then cleans the registries (re-queues abandoned jobs) if
    ``maintenance_interval`` has passed: both are derived from WORKER_MAINTENANCE_S so a dead worker's job is found
    within WORKER_ABANDONED_AFTER_S + WORKER_MAINTENANCE_S.
    """
    heartbeat, abandoned, maintenance = (
        settings.worker_heartbeat_s,
        settings.worker_abandoned_after_s,
        settings.worker_maintenance_s,
    )
    if abandoned <= heartbeat:
        raise ConfigError(
            f"WORKER_ABANDONED_AFTER_S={abandoned} must exceed WORKER_HEARTBEAT_S={heartbeat} (a healthy job would "
            "look abandoned between two heartbeats)"
        )
    rq_bin = shutil.which("rq", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    base = [rq_bin] if rq_bin else [sys.executable, "-m", "rq.cli"]
    cmd = [*base, "worker", "--serializer", "rq.serializers.JSONSerializer", "--with-scheduler"]
    cmd += ["--worker-class", WORKER_CLASS, "--job-monitoring-interval", str(heartbeat)]
    cmd += ["--maintenance-interval", str(max(1, maintenance - 1)), "--worker-ttl", str(maintenance + 15)]
    cmd += ["-u", settings.redis_url]
    if burst:
        cmd.append("--burst")
    if name:
        cmd += ["--name", name]
    cmd += list(extra or [])
    cmd.append(settings.queue_name)
    return cmd


def wait_for_redis(settings: Settings) -> bool:
    """Wait (capped exponential backoff) until REDIS_URL answers PING; False once WORKER_REDIS_GIVE_UP_S is spent.

    ``rq worker`` exits at once when Redis is down at start-up; a worker started with (or restarted by the deployment
    into) a Redis outage waits here instead, and ``RecoveringWorker`` takes over the outages after that.
    """
    import redis

    from ml_backend.worker import RedisBackoff, RedisGaveUp, wait_until_reachable  # local: loads rq (cli/ stays light)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    backoff = RedisBackoff(settings.worker_redis_retry_max_s, settings.worker_redis_give_up_s)
    conn = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        wait_until_reachable(conn, backoff, log, "worker start")
    except RedisGaveUp:
        log.error("worker start: Redis unreachable for %.0f s (WORKER_REDIS_GIVE_UP_S): giving up", backoff.give_up_s)
        return False
    finally:
        conn.close()
    return True


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    cmd = worker_command(settings, burst=args.burst, name=args.name, extra=args.rq_args)
    print("starting: " + " ".join(cmd), file=sys.stderr, flush=True)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    if not wait_for_redis(settings):
        from ml_backend.worker import GAVE_UP_EXIT_CODE  # local: ml_backend.worker loads rq (cli/ stays light)

        return GAVE_UP_EXIT_CODE
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # the worker replaces this process (signals go straight to rq)
    return 1  # pragma: no cover
