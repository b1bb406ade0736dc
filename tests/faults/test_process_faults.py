"""Faults with real processes: real gunicorn, real Redis, real `rq worker`, real Label Studio 1.23.2 on loopback.

* a gunicorn worker killed with SIGKILL mid-request: the client gets a clean connection error at once, the master
  starts a new worker, and the next request succeeds;
* Redis killed (SIGKILL) and restarted between the webhooks and the job: with the append-only file the pending batch
  and the queued job survive, and the job trains on everything Label Studio holds;
* Label Studio down during a job: the job retries with exponential backoff, then fails clearly naming the URL; once
  Label Studio is back the job's retry delivers its predictions, the next trigger trains on every annotation;
* the `rq worker` killed (SIGKILL) mid-training (the worker process alone: its work horse stops itself) and
  mid-upload of predictions (worker and work horse at once, so the upload stops where it is): the current model
  stays intact, the job is re-run by another worker within a bounded time (``WORKER_ABANDONED_AFTER_S +
  WORKER_MAINTENANCE_S``, 45 s by default, plus the job's own time), the re-run of the upload delivers the published
  version without training again, and no task ends up with two predictions of one model version.

In each, nothing an annotator submitted is lost: Label Studio is re-read and compared with what the model used.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import threading
import time

import httpx
import psutil
import pytest
import redis
from fault_helpers import DENSE, TRAIN_ENV, as_project, job_meta, wait_for
from rq.job import Job
from rq.serializers import JSONSerializer

from ml_backend.labelstudio.client import as_dict
from ml_backend.queue import keys
from ml_backend.store.cache import ModelCache
from ml_backend.store.registry import ModelRegistry

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

BATCH = int(TRAIN_ENV["TRAIN_BATCH_SIZE"])
RECOVERY_BOUND_S = 45 + 30  # default WORKER_ABANDONED_AFTER_S + WORKER_MAINTENANCE_S, plus slack for a busy machine


# ---------------------------------------------------------------------- gunicorn worker killed mid-request
class _SlowImageHost:
    """An image host on 127.0.0.1 that holds ``/slow.png`` until released and serves ``/fast.png`` at once."""

    def __init__(self, png: bytes) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.startswith("/slow"):
                    host.arrived.set()
                    host.release.wait(30)
                with contextlib.suppress(OSError):  # the client's worker may be dead by now (the point of the test)
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(png)))
                    self.end_headers()
                    self.wfile.write(png)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


def _png() -> bytes:
    from PIL import Image

    from ml_backend.data.synthetic import generate_em_like

    images, _ = generate_em_like(1, 64, seed=7)
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="PNG")
    return buf.getvalue()


def _gunicorn_workers(master_pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(master_pid).children()]


def test_gunicorn_worker_killed_mid_request(start_backend, tmp_path):
    from ml_backend.model import build_model

    model_dir = tmp_path / "models"
    version = ModelRegistry(model_dir, 1).publish(build_model("unet", width=8, depth=2).eval(), {"trigger": "test"})
    host = _SlowImageHost(_png())
    try:
        backend = start_backend(model_dir, MEDIA_ALLOWED_HOSTS=f"127.0.0.1:{host.port}")
        master = backend.process.pid
        (victim,) = _gunicorn_workers(master)

        def body(name: str) -> dict:
            task = {"id": 1, "data": {"image": f"http://127.0.0.1:{host.port}/{name}.png"}}
            return {"tasks": [task], "project": "1.1700000000", "label_config": DENSE}

        outcome: dict = {}

        def slow_request() -> None:
            try:
                outcome["response"] = httpx.post(backend.url + "/predict", json=body("slow"), timeout=60)
            except httpx.HTTPError as exc:
                outcome["error"] = exc
            outcome["at"] = time.monotonic()

        client = threading.Thread(target=slow_request)
        client.start()
        assert host.arrived.wait(30), "the /predict request never reached the image host"
        killed_at = time.monotonic()
        psutil.Process(victim).kill()  # SIGKILL, mid-request
        client.join(30)
        assert not client.is_alive(), "the client of the killed worker hangs"
        # a clean, immediate error for the killed request: the connection is closed, no partial or wrong answer
        assert "response" not in outcome, f"unexpected answer: {outcome['response'].status_code}"
        assert isinstance(outcome["error"], (httpx.RemoteProtocolError, httpx.ReadError)), repr(outcome["error"])
        assert outcome["at"] - killed_at < 5
        host.release.set()

        # the master is alive and starts a new worker; the next request succeeds with the current model
        new_workers = wait_for(lambda: [p for p in _gunicorn_workers(master) if p != victim], 60, "a new worker")
        assert backend.process.poll() is None and victim not in new_workers

        def answered() -> httpx.Response | None:
            try:
                resp = httpx.post(backend.url + "/predict", json=body("fast"), timeout=30)
            except httpx.HTTPError:
                return None
            return resp

        resp = wait_for(answered, 120, "the next /predict to be answered", logs=backend.log_tail)
        assert resp.status_code == 200, resp.text
        (pred,) = resp.json()["results"]
        assert pred["model_version"] == version and len(pred["result"]) <= 1 and 0.0 <= pred["score"] <= 1.0
        assert "SIGKILL" in backend.log_tail(20000) or "was sent" in backend.log_tail(20000)
    finally:
        host.close()


# ---------------------------------------------------------------------- Redis restart between webhook and job
def test_redis_killed_between_webhooks_and_job_loses_nothing(
    ls, start_backend, start_worker, make_project, own_redis, tmp_path
):
    model_dir = tmp_path / "models"
    backend = start_backend(model_dir, REDIS_URL=own_redis.url, **TRAIN_ENV)
    project = make_project(backend.url)
    conn = redis.Redis.from_url(own_redis.url)
    first, last = project.task_ids[: BATCH - 1], project.task_ids[BATCH - 1]

    project.annotate(ls, first)  # Label Studio posts the webhooks: the batch is counted, no job yet
    assert conn.scard(keys.pending_key(project.id)) == BATCH - 1
    time.sleep(1.5)  # appendfsync everysec: what was acknowledged a second ago is on disk
    own_redis.kill9()
    own_redis.start()
    conn = redis.Redis.from_url(own_redis.url)
    assert conn.scard(keys.pending_key(project.id)) == BATCH - 1, "the pending batch was lost with Redis"

    project.annotate(ls, [last])  # completes the batch: the training job is queued (no worker runs yet)
    job_id = wait_for(lambda: conn.get(keys.queued_key(project.id)), 10, "the training job to be queued").decode()
    time.sleep(1.5)
    own_redis.kill9()
    own_redis.start()
    conn = redis.Redis.from_url(own_redis.url)
    assert Job.fetch(job_id, connection=conn, serializer=JSONSerializer).get_status() == "queued"

    worker = start_worker(model_dir, own_redis.url)
    registry = ModelRegistry(model_dir, project.id)
    version = wait_for(registry.current_version, 300, "the job to train after the Redis restarts", logs=worker.log)
    meta = registry.meta(version)
    annotated = project.annotated(ls)  # Label Studio, re-read: every submission was used
    assert annotated == set(project.task_ids[:BATCH])
    assert sorted(meta["task_ids"]) == sorted(annotated) and meta["job"] == job_id


# ---------------------------------------------------------------------- Label Studio down during a job
def _restart_label_studio(label_studio, scripts) -> None:
    """Start Label Studio again on the same port and data; the session fixture then stops the new process."""
    lss = scripts("label_studio_server")
    server = lss.start_label_studio(data_dir=label_studio.data_dir, document_root=label_studio.document_root,
                                    port=label_studio.port, token=label_studio.api_key, timeout=240)  # fmt: skip
    label_studio.process = server.process


def test_label_studio_down_during_a_job(
    label_studio, ls, scripts, start_backend, start_worker, make_project, redis_url, tmp_path
):
    model_dir = tmp_path / "models"
    backend = start_backend(model_dir, REDIS_URL=redis_url, **TRAIN_ENV)
    project = make_project(backend.url)
    conn = redis.Redis.from_url(redis_url)
    env = {"TRAIN_STEPS": "400"}  # long enough to stop Label Studio while it trains
    worker = start_worker(model_dir, redis_url, **env)
    batch = project.task_ids[:BATCH]
    project.annotate(ls, batch)
    job_id = wait_for(lambda: conn.get(keys.lock_key(project.id)), 120, "the job to start", logs=worker.log).decode()
    wait_for(lambda: job_meta(conn, job_id).get("progress"), 300, "training steps", poll=0.2, logs=worker.log)
    try:
        label_studio.stop()  # Label Studio goes down mid-job (the annotations are in its database)
        failure = wait_for(
            lambda: (last := conn.get(keys.last_job_key(project.id))) and json.loads(last),
            300, "the job to fail", logs=worker.log,
        )  # fmt: skip
    finally:
        _restart_label_studio(label_studio, scripts)
    assert failure["status"] == "failed" and failure["job"] == job_id
    assert f"Label Studio at {label_studio.url}" in failure["error"] and "unavailable" in failure["error"]
    log = worker.log(60000)
    delays = [line.rsplit(" in ", 1)[-1].strip() for line in log.splitlines() if "; retry " in line]
    assert delays[:4] == ["0.5 s", "1.0 s", "2.0 s", "4.0 s"], delays  # exponential backoff before giving up
    registry = ModelRegistry(model_dir, project.id)
    first = registry.current_version()
    assert first is not None  # the version trained before Label Studio went down is published and loadable
    assert ModelCache(model_dir, device="cpu").get(project.id)[1]["version"] == first

    # RQ retries the failed job (10 s later): Label Studio is back, so it delivers the version's predictions
    wait_for(lambda: as_project(ls, project.id).get("model_version") == first, 240, "the retry to deliver",
             logs=worker.log)  # fmt: skip
    counts = project.predictions_of(ls, first)
    assert {tid: n for tid, n in counts.items() if tid not in batch} == {t: 1 for t in counts if t not in batch}

    # the next trigger trains on every annotation Label Studio holds
    more = project.task_ids[BATCH : BATCH + 2]
    project.annotate(ls, more)
    (backend_row,) = [as_dict(b) for b in ls.ml.list(project=project.id)]
    ls.ml.train(id=backend_row["id"])
    second = wait_for(lambda: (v := registry.current_version()) != first and v, 300, "the next version",
                      logs=worker.log)  # fmt: skip
    annotated = project.annotated(ls)
    assert annotated == set(batch) | set(more)
    assert sorted(registry.meta(second)["task_ids"]) == sorted(annotated)
    wait_for(lambda: as_project(ls, project.id).get("model_version") == second, 240, "the upload", logs=worker.log)
    counts = project.predictions_of(ls, second)
    assert all(counts[t] == 1 for t in counts if t not in annotated), counts


# ---------------------------------------------------------------------- rq worker killed mid-training / mid-upload
def _wait_phase(conn: redis.Redis, job_id: str, phase: str, timeout: float, logs) -> float:
    """Poll the job's meta every few ms until it reports ``phase`` (with a training step when phase is train)."""

    def seen() -> bool:
        meta = job_meta(conn, job_id)
        return meta.get("phase") == phase and (phase != "train" or bool(meta.get("progress")))

    wait_for(seen, timeout, f"job {job_id} to reach phase {phase}", poll=0.01, logs=logs)
    return time.monotonic()


def test_rq_worker_killed_mid_training_and_mid_upload(
    ls, start_backend, start_worker, make_project, redis_url, tmp_path
):
    model_dir = tmp_path / "models"
    backend = start_backend(model_dir, REDIS_URL=redis_url, **TRAIN_ENV)
    project = make_project(backend.url)
    conn = redis.Redis.from_url(redis_url)
    registry = ModelRegistry(model_dir, project.id)
    w1 = start_worker(model_dir, redis_url, TRAIN_STEPS="300")

    # --- a first version, normally
    project.annotate(ls, project.task_ids[:BATCH])
    v1 = wait_for(registry.current_version, 300, "the first version", logs=w1.log)
    wait_for(lambda: as_project(ls, project.id).get("model_version") == v1, 240, "v1 delivered", logs=w1.log)

    # --- kill -9 mid-training of the second version: v1 stays current; a second worker redoes the job
    project.annotate(ls, project.task_ids[BATCH : 2 * BATCH])
    job2 = wait_for(lambda: conn.get(keys.lock_key(project.id)), 120, "job 2 to start", logs=w1.log).decode()
    _wait_phase(conn, job2, "train", 300, w1.log)
    started = conn.hget(f"rq:job:{job2}", "started_at")
    w1.kill9()
    killed = time.monotonic()
    assert registry.current_version() == v1
    assert ModelCache(model_dir, device="cpu").get(project.id)[1]["version"] == v1  # loadable, intact
    w2 = start_worker(model_dir, redis_url, TRAIN_STEPS="300")
    logs = lambda: w1.log() + "\n--- worker 2\n" + w2.log()  # noqa: E731
    wait_for(lambda: conn.hget(f"rq:job:{job2}", "started_at") != started, RECOVERY_BOUND_S,
             "the killed job to be re-run", poll=0.2, logs=logs)  # fmt: skip
    recovered_in = time.monotonic() - killed

    # --- kill -9 the re-run mid-upload of version 2's predictions: a third worker delivers them, no duplicates
    _wait_phase(conn, job2, "upload", 600, logs)  # polled every 10 ms from the re-run's start
    w2.kill9(with_horse=True)  # worker and work horse at once: the upload stops where it is
    status_at_kill = Job.fetch(job2, connection=conn, serializer=JSONSerializer).get_status()
    assert status_at_kill == "started", f"the kill came too late: job {job2} is {status_at_kill}"
    v2 = registry.current_version()
    assert v2 != v1 and registry.meta(v2)["job"] == job2 and registry.meta(v2)["parent"] == v1
    assert sorted(registry.meta(v2)["task_ids"]) == sorted(project.annotated(ls))
    assert ModelCache(model_dir, device="cpu").get(project.id)[1]["version"] == v2  # published before the upload
    delivered_before_kill = as_project(ls, project.id).get("model_version") == v2  # set last in the upload
    w3 = start_worker(model_dir, redis_url)
    logs3 = lambda: logs() + "\n--- worker 3\n" + w3.log()  # noqa: E731
    wait_for(lambda: as_project(ls, project.id).get("model_version") == v2, RECOVERY_BOUND_S + 120,
             "version 2's predictions to be delivered after the kill", logs=logs3)  # fmt: skip
    # job 2's own outcome (the project's last_job may be a later follow-up job that found nothing to do)
    job = Job.fetch(job2, connection=conn, serializer=JSONSerializer)
    wait_for(lambda: job.get_status(refresh=True) == "finished", 120, "job 2 to finish", logs=logs3)
    outcome = job.return_value(refresh=True)
    last = json.loads(conn.get(keys.last_job_key(project.id)))
    # killed before the upload finished: the re-run delivered v2 without training again; else it had nothing to do
    assert outcome["status"] == ("up-to-date" if delivered_before_kill else "delivered"), (outcome, last)
    annotated = project.annotated(ls)
    assert annotated == set(project.task_ids[: 2 * BATCH])  # nothing an annotator submitted was lost
    for version in (v1, v2):
        counts = project.predictions_of(ls, version)
        dupes = {t: n for t, n in counts.items() if n > 1}
        assert dupes == {}, f"duplicate predictions of {version}: {dupes}"
    counts = project.predictions_of(ls, v2)
    assert all(counts[t] == 1 for t in counts if t not in annotated), counts
    assert registry.current_version() == v2
    print(f"re-run of the job killed mid-training started {recovered_in:.0f} s after the kill; killed mid-upload "
          f"{'after' if delivered_before_kill else 'before'} the project's model_version was set")  # fmt: skip
