"""``ml-backend worker``: the RQ worker of this backend (JSON serializer, scheduler, crash-recovery timing)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from ml_backend.config import ConfigError, Settings

WORKER_CLASS = "ml_backend.worker.RecoveringWorker"


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


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    cmd = worker_command(settings, burst=args.burst, name=args.name, extra=args.rq_args)
    print("starting: " + " ".join(cmd), file=sys.stderr, flush=True)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    os.execv(cmd[0], cmd)  # the worker replaces this process (signals go straight to rq)
    return 1  # pragma: no cover
