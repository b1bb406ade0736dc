"""Crash recovery with real processes (findings 7 and 9 of issue 9): a `kill -9`'d `rq worker` has its job re-run
exactly once more within a bounded time, a long healthy job is never taken for abandoned, Redis with the project's
persistence keeps the pending-annotation set across its own `kill -9`, and a training job for a project Label
Studio does not have fails once, without retries."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import redis
from http_stub import send_json
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer
from waiting import scaled, wait_until

from ml_backend import queue as q
from ml_backend.cli import worker_command
from ml_backend.config import ConfigError, Settings
from ml_backend.queue import keys
from ml_backend.queue.connection import _CONNECTIONS

QUEUE_DIR = Path(__file__).resolve().parent  # workers run here: rq imports slow_jobs from its working directory
# Short intervals for the tests (production defaults: 10 / 30 / 15 s, see test_production_defaults_bound_recovery)
FAST = {"WORKER_HEARTBEAT_S": "1", "WORKER_ABANDONED_AFTER_S": "3", "WORKER_MAINTENANCE_S": "2"}
FAST_BOUND_S = 3 + 2  # abandoned-after + maintenance: a dead worker's job is re-queued within this


def _env(redis_url: str, tmp_path: Path, **extra: str) -> dict:
    return {
        **os.environ,
        **FAST,
        "REDIS_URL": redis_url,
        "MODEL_DIR": str(tmp_path / "models"),
        **extra,
    }


def _start_worker(env: dict, name: str, log: Path, *args: str) -> subprocess.Popen:
    """`python -m ml_backend.cli worker` (execs into `rq worker` with RecoveringWorker), as deployed."""
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "ml_backend.cli", "worker", "--name", name, *args],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=QUEUE_DIR,
        )


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _stop(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
            proc.wait(10)
        except psutil.NoSuchProcess:
            pass


def _enqueue_slow(redis_url: str, marker: Path, seconds: float) -> Job:
    conn = redis.Redis.from_url(redis_url)
    queue = Queue(Settings.from_env(redis_url=redis_url).queue_name, connection=conn, serializer=JSONSerializer)
    return queue.enqueue_call(
        "slow_jobs.slow_marker",
        kwargs={"path": str(marker), "seconds": seconds},
        timeout=3600,
        retry=Retry(**q.JOB_RETRY),  # the training jobs' policy: 3 retries after 10, 30, 60 s
    )


@pytest.mark.parametrize("kill", ["worker-and-children", "worker-main-process-only"])
def test_killed_worker_job_is_rerun_once_within_the_bound(redis_url, tmp_path, kill):
    env = _env(redis_url, tmp_path)
    marker, log = tmp_path / "marker.txt", tmp_path / "workers.log"
    job = _enqueue_slow(redis_url, marker, seconds=4)
    first = _start_worker(env, "doomed", log)
    tree: list[psutil.Process] = []
    second = None
    try:
        wait_until(lambda: _lines(marker).count("start") == 1, 30, "the job to start")
        tree = psutil.Process(first.pid).children(recursive=True)  # the work horse (+ the scheduler process)
        horse = int(_lines(marker)[1])
        assert horse in {p.pid for p in tree}
        if kill == "worker-and-children":  # the container / machine died
            for proc in [psutil.Process(first.pid), *tree]:
                proc.send_signal(signal.SIGKILL)
        else:  # only `rq worker` itself: its horse must stop by itself, or the job would run twice at once
            first.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        if kill != "worker-and-children":
            gone = lambda: not psutil.pid_exists(horse) or psutil.Process(horse).status() == "zombie"  # noqa: E731
            wait_until(gone, 5, "the horse", poll=0.1)
        first.wait(scaled(10))
        second = _start_worker(env, "rescuer", log)
        wait_until(lambda: _lines(marker).count("start") == 2, 30, "the re-run")
        rerun_after = time.monotonic() - killed_at
        wait_until(lambda: "done" in _lines(marker), 30, "the re-run to finish")
        conn = redis.Redis.from_url(redis_url)
        wait_until(lambda: Job.fetch(job.id, connection=conn, serializer=JSONSerializer).get_status() == "finished", 10,
                   "the job to be marked finished")  # fmt: skip
        time.sleep(FAST_BOUND_S + 1)  # long enough for a duplicate re-run to show up
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(scaled(30))
        _stop(tree)
    words = _lines(marker)
    assert words.count("start") == 2 and words.count("done") == 1, marker.read_text()  # exactly once more
    # re-queued at once (not after its 10 s retry interval): kill -> re-run within abandoned-after + maintenance +
    # the new worker's start-up (scaled: slower on a busy CPU)
    assert rerun_after < FAST_BOUND_S + scaled(8), f"re-run {rerun_after:.1f} s after the kill"
    done = Job.fetch(job.id, connection=redis.Redis.from_url(redis_url), serializer=JSONSerializer)
    assert done.retries_left == 2 and done.retry_intervals[1:] == [30, 60]  # later failures still back off
    print(f"[recovery] {kill}: job re-run {rerun_after:.1f} s after kill -9 (bound {FAST_BOUND_S} s + start-up)")


def test_long_healthy_job_is_never_taken_for_abandoned(redis_url, tmp_path):
    """A job running 4x longer than WORKER_ABANDONED_AFTER_S, while another idle worker cleans the registries every
    2 s, runs exactly once: the busy worker's heartbeat keeps it alive."""
    env = _env(redis_url, tmp_path)
    marker, log = tmp_path / "marker.txt", tmp_path / "workers.log"
    job = _enqueue_slow(redis_url, marker, seconds=12)
    busy = _start_worker(env, "busy", log)
    idle = None
    try:
        wait_until(lambda: "start" in _lines(marker), 30, "the job to start")
        idle = _start_worker(env, "idle-cleaner", log)
        conn = redis.Redis.from_url(redis_url)
        wait_until(lambda: Job.fetch(job.id, connection=conn, serializer=JSONSerializer).get_status() == "finished", 40,
              "the job to finish")  # fmt: skip
    finally:
        for proc in (busy, idle):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(scaled(30))
    words = _lines(marker)
    assert words.count("start") == 1 and words.count("done") == 1, marker.read_text()
    assert "cleaning registries" in log.read_text()  # the idle worker did look for abandoned jobs meanwhile
    assert Job.fetch(job.id, connection=conn, serializer=JSONSerializer).retries_left == 3


def test_production_defaults_bound_recovery_to_a_minute():
    settings = Settings.from_env(redis_url="redis://127.0.0.1:1/0")
    cmd = worker_command(settings)
    arg = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert arg["--worker-class"] == "ml_backend.worker.RecoveringWorker"
    heartbeat, abandoned = int(arg["--job-monitoring-interval"]), settings.worker_abandoned_after_s
    # an idle worker wakes every worker_ttl - 15 s and cleans when maintenance_interval has passed
    wake = int(arg["--worker-ttl"]) - 15
    assert int(arg["--maintenance-interval"]) <= wake
    assert abandoned + wake <= 60, "a dead worker's job must be re-queued within about a minute"
    assert abandoned >= 3 * heartbeat  # a healthy job misses two heartbeats before it looks abandoned
    assert q.LOCK_TTL_S <= 60  # a dead job's training lock blocks other jobs of its project no longer than that
    with pytest.raises(ConfigError, match="WORKER_ABANDONED_AFTER_S"):
        worker_command(settings.replace(worker_heartbeat_s=30, worker_abandoned_after_s=30))


def test_pending_set_and_queued_job_survive_redis_kill_9(tmp_path, redis_tools):
    """scripts/redis_server.py with persistence (the default of the command): AOF, fsync every second."""
    port = redis_tools.free_port()
    workdir = tmp_path / "redis"
    proc = redis_tools.start_redis(port, workdir, persist=True)
    try:
        conn = redis.Redis(port=port)
        assert conn.config_get("appendonly")["appendonly"] == "yes"
        assert conn.config_get("appendfsync")["appendfsync"] == "everysec"
        settings = Settings.from_env(redis_url=f"redis://127.0.0.1:{port}/0", train_batch_size=50)
        for task in range(1, 8):
            payload = {"action": "ANNOTATION_CREATED", "project": {"id": 7}, "task": {"id": task, "project": 7}}
            assert q.handle_webhook(payload, settings)["status"] == "counted"
        queued = q.handle_webhook({"action": "START_TRAINING", "project": {"id": 8}}, settings)["job_id"]
        time.sleep(1.5)  # appendfsync everysec: at most the last second of writes is at risk
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        redis_tools.stop_redis(proc)
    _CONNECTIONS.clear()  # the pooled client of the dead server
    proc = redis_tools.start_redis(port, workdir, persist=True)
    try:
        conn = redis.Redis(port=port)
        assert conn.scard(keys.pending_key(7)) == 7
        assert conn.sismember(keys.projects_key(), 7)
        # the queued training job and its slot survive too: a worker started now runs it, no webhook is needed
        queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
        assert queue.get_job_ids() == [queued] and conn.get(keys.queued_key(8)).decode() == queued
        assert Job.fetch(queued, connection=conn, serializer=JSONSerializer).kwargs["project_id"] == 8
    finally:
        redis_tools.stop_redis(proc)


class _FakeLabelStudio(http.server.BaseHTTPRequestHandler):
    """Answers like Label Studio for a token check, and 404 for every project (the project was deleted)."""

    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        type(self).hits.append(self.path)
        if self.path.startswith("/api/current-user/whoami"):
            body, status = {"id": 1, "email": "probe@example.com", "username": "probe"}, 200
        else:
            body, status = {"detail": "Not found."}, 404
        send_json(self, status, body)

    def log_message(self, *args: object) -> None:
        pass


def test_start_training_for_a_missing_project_fails_once_without_retry(redis_url, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeLabelStudio)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _FakeLabelStudio.hits = []
    ls_url = f"http://127.0.0.1:{server.server_address[1]}"
    env = _env(redis_url, tmp_path, LABEL_STUDIO_URL=ls_url, LABEL_STUDIO_API_KEY="a" * 40)
    settings = Settings.from_env(redis_url=redis_url)
    try:
        out = q.handle_webhook({"action": "START_TRAINING", "project": {"id": 4242}}, settings)
        assert out["status"] == "queued"
        log = tmp_path / "worker.log"
        worker = _start_worker(env, "burst", log, "--burst")
        assert worker.wait(120) == 0, log.read_text()[-3000:]
    finally:
        server.shutdown()
        server.server_close()
    conn = redis.Redis.from_url(redis_url)
    job = Job.fetch(out["job_id"], connection=conn, serializer=JSONSerializer)
    assert job.get_status() == "failed", log.read_text()[-3000:]
    error = job.latest_result().exc_string or ""
    assert "ProjectNotFound" in error and "does not exist" in error
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    assert queue.scheduled_job_registry.get_job_ids() == [] and queue.get_job_ids() == []  # no retry waiting
    assert job.retries_left == 0
    assert [h for h in _FakeLabelStudio.hits if h.startswith("/api/projects/")] == ["/api/projects/4242/"]
    assert conn.get(keys.queued_key(4242)) is None  # no slot reserved for a retry
    last = json.loads(conn.get(keys.last_job_key(4242)))
    assert last["status"] == "failed" and "does not exist" in last["error"]
