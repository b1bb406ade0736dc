"""Redis outages under a real ``rq worker`` (``python -m ml_backend.cli worker``, RecoveringWorker): kill -9 of a real
redis-server, restart on the same port, and the SAME worker process goes on working.

Before (issue 16, item 8) the worker's main process quit on the first Redis error outside RQ's blocking dequeue (a
job's heartbeat, the registry clean-up), so a Redis restart took the worker down for good. Every wait below is a
generous bound on a failure (nothing asserts a duration).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from fault_helpers import REPO, wait_for
from rq import Queue, Retry
from rq.serializers import JSONSerializer

QUEUE_DIR = REPO / "tests" / "queue"  # the workers run there: rq imports slow_jobs from its working directory
OUTAGE = "Redis unreachable"  # RecoveringWorker's warning (RQ's own message is "could not connect to Redis")
# Short intervals so the tests see several heartbeats, tries and maintenance runs.
FAST = {
    "WORKER_HEARTBEAT_S": "1",
    "WORKER_ABANDONED_AFTER_S": "30",
    "WORKER_MAINTENANCE_S": "2",
    "WORKER_REDIS_RETRY_MAX_S": "2",
}


@dataclass
class Server:
    """A redis-server on a fixed port that the test kills and starts again (with or without the append-only file)."""

    port: int
    workdir: Path
    tools: Any
    persist: bool
    process: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = self.tools.start_redis(self.port, self.workdir, persist=self.persist)

    def kill9(self) -> None:
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def make_redis(redis_tools, tmp_path) -> Iterator[Any]:
    """make_redis(persist) -> a started Server on a free port (stopped at the end of the test)."""
    if redis_tools.find_redis_server() is None:
        pytest.skip("no redis-server binary")
    servers: list[Server] = []

    def make(persist: bool) -> Server:
        server = Server(redis_tools.free_port(), tmp_path / f"redis-{len(servers)}", redis_tools, persist)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        if server.process is not None:
            redis_tools.stop_redis(server.process)


def _worker_env(server: Server, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **FAST,
        "REDIS_URL": server.url,
        "MODEL_DIR": str(tmp_path / "models"),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _name(worker: Any) -> str:
    args = list(worker.process.args)
    return args[args.index("--name") + 1]


def _conn(server: Server) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_connect_timeout=2, socket_timeout=5)


def _registered(server: Server, name: str) -> bool:
    """The worker is listed in rq:workers with a complete hash (what `rq info` and Worker.all read)."""
    try:
        conn = _conn(server)
        key = f"rq:worker:{name}"
        return bool(conn.sismember("rq:workers", key) and conn.hexists(key, "birth"))
    except redis.exceptions.ConnectionError:
        return False


def _queue(server: Server) -> Queue:
    return Queue("ml-backend", connection=_conn(server), serializer=JSONSerializer)


def _status(server: Server, job_id: str) -> str | None:
    raw = _conn(server).hget(f"rq:job:{job_id}", "status")
    return raw.decode() if raw else None


def _start_registered(start_rq_worker, server: Server, tmp_path: Path, **env: str) -> Any:
    worker = start_rq_worker(_worker_env(server, tmp_path, **env), "outage", cwd=QUEUE_DIR)
    wait_for(lambda: _registered(server, _name(worker)), 120, "the worker to register", logs=worker.log)
    return worker


def _outage_logged(worker: Any, n: int = 1) -> bool:
    """The worker logged the outage (its warning and ``n - 1`` further tries) and its process is still running."""
    assert worker.process.poll() is None, f"the worker exited ({worker.process.returncode}):\n{worker.log()}"
    return worker.log(200_000).count(OUTAGE) >= n


def _run_marker_job(server: Server, worker: Any, tmp_path: Path, tag: str) -> None:
    """Enqueue a real small job and wait until it is finished, once, by this worker."""
    marker = tmp_path / f"{tag}.marker"
    job = _queue(server).enqueue_call("slow_jobs.slow_marker", kwargs={"path": str(marker), "seconds": 0.2})
    wait_for(lambda: _status(server, job.id) == "finished", 120, f"job {tag} to finish", logs=worker.log)
    lines = marker.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["start", "done"], lines
    assert _conn(server).hget(f"rq:job:{job.id}", "worker_name").decode() == _name(worker)


def test_idle_worker_outlives_a_redis_kill_and_resumes(make_redis, start_rq_worker, tmp_path):
    server = make_redis(persist=True)
    worker = _start_registered(start_rq_worker, server, tmp_path)
    pid = worker.process.pid
    _run_marker_job(server, worker, tmp_path, "before")

    server.kill9()
    # The warning, then two more failed tries of the backoff: seconds in which the old worker had already quit.
    wait_for(lambda: _outage_logged(worker, 3), 120, "the worker to log the outage and retry", logs=worker.log)
    server.start()  # same port, same data dir (append-only file)

    wait_for(lambda: "Redis is back" in worker.log(200_000), 120, "the worker to see Redis back", logs=worker.log)
    _run_marker_job(server, worker, tmp_path, "after")
    assert worker.process.poll() is None and worker.process.pid == pid
    assert int(_conn(server).hget(f"rq:worker:{_name(worker)}", "pid")) == pid


def test_worker_registers_again_when_redis_restarts_empty(make_redis, start_rq_worker, tmp_path):
    """Without persistence Redis comes back empty: the worker's hash and its rq:workers entries are gone."""
    server = make_redis(persist=False)
    worker = _start_registered(start_rq_worker, server, tmp_path)
    pid = worker.process.pid

    server.kill9()
    wait_for(lambda: _outage_logged(worker), 120, "the worker to log the outage", logs=worker.log)
    server.start()

    wait_for(lambda: _registered(server, _name(worker)), 120, "the worker to register again", logs=worker.log)
    assert "registration was lost" in worker.log(200_000)
    _run_marker_job(server, worker, tmp_path, "after-empty-restart")
    # Its scheduler (retries with backoff need it) died in the outage and is started again by the maintenance.
    wait_for(lambda: _conn(server).exists("rq:scheduler-lock:ml-backend"), 120, "the scheduler lock", logs=worker.log)
    assert worker.process.poll() is None and worker.process.pid == pid


def test_running_job_goes_on_through_a_redis_outage(make_redis, start_rq_worker, tmp_path):
    """kill -9 of Redis while a job runs: the horse keeps working, its heartbeat resumes, the job finishes once."""
    server = make_redis(persist=True)
    worker = _start_registered(start_rq_worker, server, tmp_path)
    pid = worker.process.pid
    marker, gate = tmp_path / "running.marker", tmp_path / "running.gate"
    job = _queue(server).enqueue_call(
        "slow_jobs.gated_marker",
        kwargs={"path": str(marker), "gate": str(gate), "limit_s": 600},
        timeout=900,
    )
    wait_for(lambda: marker.exists() and "start" in marker.read_text(), 120, "the job to start", logs=worker.log)

    server.kill9()
    wait_for(lambda: _outage_logged(worker), 120, "the worker to log the outage", logs=worker.log)
    assert "the running job goes on" in worker.log(200_000)
    server.start()
    wait_for(lambda: "Redis is back" in worker.log(200_000), 120, "the job's heartbeat to resume", logs=worker.log)
    assert _status(server, job.id) == "started"  # its execution and started-registry entry survived (AOF)

    gate.touch()
    wait_for(lambda: _status(server, job.id) == "finished", 120, "the job to finish", logs=worker.log)
    assert [line.split()[0] for line in marker.read_text().splitlines()] == ["start", "done"]
    assert worker.process.poll() is None and worker.process.pid == pid


def test_job_ending_during_the_outage_is_rerun_not_lost(make_redis, start_rq_worker, tmp_path):
    """The job ends while Redis is down, so its end cannot be recorded: with the append-only file it is still in the
    started registry when Redis is back, and the abandoned-job recovery runs it again (not lost silently)."""
    server = make_redis(persist=True)
    worker = _start_registered(start_rq_worker, server, tmp_path, WORKER_ABANDONED_AFTER_S="4")
    pid = worker.process.pid
    marker, gate = tmp_path / "ending.marker", tmp_path / "ending.gate"
    job = _queue(server).enqueue_call(
        "slow_jobs.gated_marker",
        kwargs={"path": str(marker), "gate": str(gate), "limit_s": 600},
        timeout=900,
        retry=Retry(max=1, interval=[600]),  # the abandoned-job recovery re-queues at once, not after 600 s
    )
    wait_for(lambda: marker.exists() and "start" in marker.read_text(), 120, "the job to start", logs=worker.log)

    server.kill9()
    gate.touch()
    wait_for(lambda: "done" in marker.read_text(), 120, "the job's work to end", logs=worker.log)
    wait_for(lambda: "recording its start or end" in worker.log(200_000), 120, "the unrecorded end", logs=worker.log)
    gate.unlink()  # the re-run waits at the gate again
    server.start()

    rerun = "the abandoned-job recovery to run the job again"
    wait_for(lambda: marker.read_text().split().count("start") == 2, 120, rerun, logs=worker.log)
    assert _status(server, job.id) == "started"
    gate.touch()
    wait_for(lambda: _status(server, job.id) == "finished", 120, "the re-run to finish", logs=worker.log)
    assert [line.split()[0] for line in marker.read_text().splitlines()] == ["start", "done", "start", "done"]
    assert worker.process.poll() is None and worker.process.pid == pid


def test_worker_gives_up_after_the_configured_outage(make_redis, start_rq_worker, tmp_path):
    """WORKER_REDIS_GIVE_UP_S > 0: the worker exits with code 3 (for a supervisor that should see it fail)."""
    server = make_redis(persist=True)
    worker = _start_registered(start_rq_worker, server, tmp_path, WORKER_REDIS_GIVE_UP_S="3")
    server.kill9()
    wait_for(lambda: worker.process.poll() is not None, 120, "the worker to give up", logs=worker.log)
    assert worker.process.returncode == 3, worker.log()
    assert "giving up" in worker.log()


def test_worker_stops_on_sigterm_during_an_outage(make_redis, start_rq_worker, tmp_path):
    """`docker compose stop` while Redis is down: a warm shutdown (exit 0), not a hang in the backoff or a crash."""
    server = make_redis(persist=True)
    worker = _start_registered(start_rq_worker, server, tmp_path)
    server.kill9()
    wait_for(lambda: _outage_logged(worker, 2), 120, "the worker to log the outage", logs=worker.log)
    worker.process.terminate()
    wait_for(lambda: worker.process.poll() is not None, 120, "the worker to stop", logs=worker.log)
    assert worker.process.returncode == 0, worker.log()


def test_worker_started_during_an_outage_waits_for_redis(make_redis, start_rq_worker, tmp_path):
    """A worker (re)started while Redis is down (the compose restart policy) waits instead of exiting."""
    server = make_redis(persist=True)
    server.kill9()
    worker = start_rq_worker(_worker_env(server, tmp_path), "outage", cwd=QUEUE_DIR)
    wait_for(lambda: _outage_logged(worker, 2), 120, "the worker to wait for Redis", logs=worker.log)
    server.start()
    wait_for(lambda: _registered(server, _name(worker)), 120, "the worker to register", logs=worker.log)
    _run_marker_job(server, worker, tmp_path, "late-start")
