"""Webhook triggering and coalescing against a real redis-server (tests/conftest.py starts it)."""

from __future__ import annotations

import json
import statistics
import threading
import time
import zlib

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from ml_backend import queue as q
from ml_backend.config import Settings
from ml_backend.queue import keys, run_exclusive


@pytest.fixture
def settings(redis_url, tmp_path):
    return Settings.from_env(redis_url=redis_url, model_dir=tmp_path / "models", train_batch_size=3)


@pytest.fixture
def conn(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def created(project=7, task=1, annotation=None, action="ANNOTATION_CREATED", **extra):
    payload = {"action": action, "project": {"id": project}, "task": {"id": task, "project": project}}
    payload["annotation"] = {"id": annotation if annotation is not None else 1000 + task, "task": task, **extra}
    return payload


def train_jobs(conn, settings, project=7):
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    return [j for j in queue.get_job_ids() if j.startswith(f"train-p{project}-")]


def test_batch_threshold_schedules_one_job(settings, conn):
    assert q.handle_webhook(created(task=1), settings)["status"] == "counted"
    second = q.handle_webhook(created(task=2), settings)
    assert second["status"] == "counted" and second["pending"] == 2 and second["threshold"] == 3
    assert train_jobs(conn, settings) == []
    third = q.handle_webhook(created(task=3), settings)
    assert third["status"] == "queued"
    assert train_jobs(conn, settings) == [third["job_id"]]


def test_resaving_one_task_counts_once(settings, conn):
    for _ in range(5):
        out = q.handle_webhook(created(task=1, action="ANNOTATION_UPDATED"), settings)
    assert out["status"] == "counted" and out["pending"] == 1
    assert train_jobs(conn, settings) == []


def test_at_most_one_job_queued_per_project(settings, conn):
    statuses = [q.handle_webhook(created(task=t), settings)["status"] for t in range(1, 10)]
    assert statuses == ["counted", "counted", "queued"] + ["coalesced"] * 6
    assert len(train_jobs(conn, settings)) == 1
    # other projects are independent
    assert q.handle_webhook({"action": "START_TRAINING", "project": {"id": 8}}, settings)["status"] == "queued"
    assert len(train_jobs(conn, settings, project=8)) == 1
    assert len(train_jobs(conn, settings)) == 1


def test_start_training_always_schedules_and_upgrades_a_waiting_job(settings, conn):
    first = q.handle_webhook({"action": "START_TRAINING", "project": {"id": 7}}, settings)
    assert first["status"] == "queued"
    job = Job.fetch(first["job_id"], connection=conn, serializer=JSONSerializer)
    assert job.kwargs == {"project_id": 7, "force": True, "reason": "START_TRAINING"}

    conn.flushall()
    for t in (1, 2, 3):
        out = q.handle_webhook(created(task=t), settings)
    assert out["status"] == "queued"
    job = Job.fetch(out["job_id"], connection=conn, serializer=JSONSerializer)
    assert job.kwargs["force"] is False
    again = q.handle_webhook({"action": "START_TRAINING", "project": {"id": 7}}, settings)
    assert again == {"action": "START_TRAINING", "project": 7, "status": "coalesced", "job_id": out["job_id"]}
    assert q.take_force_flag(conn, 7, out["job_id"])  # the waiting job will train even if nothing changed


def test_job_arguments_are_json_and_retried_with_backoff(settings, conn):
    out = q.handle_webhook({"action": "START_TRAINING", "project": {"id": 7}}, settings)
    raw = conn.hget(Job.key_for(out["job_id"]), "data")
    func, _instance, args, kwargs = json.loads(zlib.decompress(raw))  # plain JSON, no pickle anywhere
    assert func == "ml_backend.jobs.train_project" and args == [] and kwargs["project_id"] == 7
    job = Job.fetch(out["job_id"], connection=conn, serializer=JSONSerializer)
    assert job.retries_left == 3 and job.retry_intervals == [10, 30, 60]
    assert job.meta["project"] == 7


def test_events_during_running_training_schedule_exactly_one_follow_up(settings, conn):
    first = q.handle_webhook({"action": "START_TRAINING", "project": {"id": 7}}, settings)["job_id"]
    rq_queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    rq_queue.remove(first)  # a worker dequeued it and runs it (below, in a thread)
    started, release = threading.Event(), threading.Event()
    outcome = {}

    def body(force, progress, conn_, job_id):
        q.take_pending(conn_, 7)  # what the real job does before reading Label Studio
        started.set()
        assert release.wait(30)
        return {"status": "trained"}

    def run():
        outcome["first"] = run_exclusive(7, settings, None, body, force=True, reason="t", job_id=first)

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(10)
    assert q.running_job(conn, 7) == first
    statuses = [q.handle_webhook(created(task=t), settings)["status"] for t in range(1, 8)]
    assert statuses == ["counted", "counted", "queued", "coalesced", "coalesced", "coalesced", "coalesced"]
    follow_ups = train_jobs(conn, settings)
    assert len(follow_ups) == 1 and follow_ups[0] != first

    # a second worker picking the follow-up while the first still trains must not train concurrently
    rq_queue.remove(follow_ups[0])  # a second worker dequeues it
    try:
        deferred = run_exclusive(7, settings, None, body, force=False, reason="t", job_id=follow_ups[0])
    finally:
        release.set()
        worker.join(30)
    assert deferred["status"] == "deferred" and deferred["running"] == first
    assert outcome["first"]["status"] == "trained"
    # the running job saw the follow-up flag when it finished: exactly one new job waits
    waiting = train_jobs(conn, settings)
    assert len(waiting) == 1 and waiting[0] not in (first, follow_ups[0])
    assert q.running_job(conn, 7) is None
    assert conn.get(keys.dirty_key(7)) is None


def test_follow_up_flag_is_forced_by_a_deferred_start_training(settings, conn):
    started, release = threading.Event(), threading.Event()

    def body(force, progress, conn_, job_id):
        started.set()
        assert release.wait(30)
        return {"status": "trained"}

    t = threading.Thread(target=run_exclusive, args=(7, settings, None, body), kwargs={"force": False, "reason": "x"})
    t.start()
    assert started.wait(10)
    try:
        assert run_exclusive(7, settings, None, body, force=True, reason="y")["status"] == "deferred"
    finally:
        release.set()
        t.join(30)
    (job_id,) = train_jobs(conn, settings)
    assert Job.fetch(job_id, connection=conn, serializer=JSONSerializer).kwargs["force"] is True


def test_counter_is_reset_when_a_job_starts_reading(settings, conn):
    for t in (1, 2):
        q.handle_webhook(created(task=t), settings)
    assert q.take_pending(conn, 7) == 2
    assert q.handle_webhook(created(task=3), settings)["pending"] == 1


def test_stale_queued_slot_does_not_block_scheduling(settings, conn):
    out = q.handle_webhook({"action": "START_TRAINING", "project": {"id": 7}}, settings)
    Job.fetch(out["job_id"], connection=conn, serializer=JSONSerializer).delete()  # removed by hand / expired
    again = q.handle_webhook({"action": "START_TRAINING", "project": {"id": 7}}, settings)
    assert again["status"] == "queued" and again["job_id"] != out["job_id"]


def test_failed_body_releases_lock_and_reraises(settings, conn):
    def body(force, progress, conn_, job_id):
        raise RuntimeError("Label Studio unreachable")

    with pytest.raises(RuntimeError, match="unreachable"):
        run_exclusive(7, settings, None, body, force=True, reason="x")
    assert q.running_job(conn, 7) is None
    last = json.loads(conn.get(keys.last_job_key(7)))
    assert last["status"] == "failed" and "unreachable" in last["error"]


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"action": "ANNOTATION_CREATED"},  # no project anywhere
        {"action": "ANNOTATION_CREATED", "project": None, "annotation": None, "task": None},
        {"action": "PROJECT_UPDATED", "project": {"id": 7}},
        {"action": None},
        {"action": 12},
    ],
)
def test_payloads_without_what_we_need_are_acknowledged_and_ignored(settings, conn, payload):
    assert q.handle_webhook(payload, settings)["status"] == "ignored"
    assert conn.keys(keys.all_pattern()) == []


def test_non_object_payload_is_ignored(settings):
    assert q.handle_webhook(["ANNOTATION_CREATED"], settings)["status"] == "ignored"


def test_project_id_found_in_any_key_and_any_form(settings):
    assert q.project_id_from_payload({"project": "12.1712345678"}) == 12
    assert q.project_id_from_payload({"project": {"id": "5"}}) == 5
    assert q.project_id_from_payload({"annotation": {"project": 4}}) == 4
    assert q.project_id_from_payload({"task": {"project": 3}}) == 3
    assert q.project_id_from_payload({"project": {"title": "x"}, "task": {"project": 9}}) == 9
    assert q.project_id_from_payload({"project": True}) is None
    # an annotation event without task or annotation id still counts once
    out = q.handle_webhook({"action": "ANNOTATION_CREATED", "project": 7}, settings)
    assert out["status"] == "counted" and out["pending"] == 1


def test_cancelled_and_deleted_annotations_do_not_count(settings):
    assert q.handle_webhook(created(task=1, was_cancelled=True), settings)["status"] == "ignored"
    deleted = q.handle_webhook(created(task=2, action="ANNOTATION_DELETED"), settings)
    assert deleted["status"] == "acknowledged"
    assert q.handle_webhook(created(task=3), settings)["pending"] == 1


def test_webhook_answers_in_milliseconds(settings):
    q.handle_webhook(created(task=0), settings)  # connection warm-up
    durations = []
    for t in range(1, 200):
        t0 = time.perf_counter()
        q.handle_webhook(created(task=t), settings)
        durations.append(time.perf_counter() - t0)
    durations.sort()
    assert statistics.median(durations) < 0.02, f"median {statistics.median(durations) * 1e3:.1f} ms"
    assert durations[-1] < 0.5, f"slowest webhook {durations[-1] * 1e3:.0f} ms (Label Studio's timeout is 1 s)"


def test_redis_down_raises_queue_unavailable_fast(tmp_path, redis_tools):
    redis_script = redis_tools
    port = redis_script.free_port()
    proc = redis_script.start_redis(port, tmp_path / "r")
    settings = Settings.from_env(redis_url=f"redis://127.0.0.1:{port}/0", train_batch_size=3)
    assert q.handle_webhook(created(task=1), settings)["status"] == "counted"  # pooled connection now open
    redis_script.stop_redis(proc)
    for payload in (created(task=2), {"action": "START_TRAINING", "project": {"id": 7}}):
        t0 = time.perf_counter()
        with pytest.raises(q.QueueUnavailable, match=f"127.0.0.1:{port}.*unreachable"):
            q.handle_webhook(payload, settings)
        assert time.perf_counter() - t0 < 1.0


def test_unreachable_redis_host_fails_within_the_webhook_timeout():
    # a non-routable address: the connect times out (socket timeout 0.5 s), is refused, or (behind a sandbox
    # proxy) something that is not Redis answers; every case must end in QueueUnavailable within the 1 s budget
    settings = Settings.from_env(redis_url="redis://10.255.255.1:6379/0")
    t0 = time.perf_counter()
    with pytest.raises(q.QueueUnavailable, match=r"Redis at redis://10\.255\.255\.1:6379/0"):
        q.handle_webhook({"action": "START_TRAINING", "project": {"id": 1}}, settings)
    assert time.perf_counter() - t0 < 1.0


def test_redis_url_password_is_not_leaked():
    assert q.redact("redis://user:secret@host:6379/0") == "redis://***@host:6379/0"
    assert q.redact("redis://host:6379/0") == "redis://host:6379/0"


def test_queue_state_lists_jobs_and_counter(settings, conn):
    for t in (1, 2):
        q.handle_webhook(created(task=t), settings)
    out = q.handle_webhook({"action": "START_TRAINING", "project": {"id": 7}}, settings)
    state = q.queue_state(7, settings)
    assert state["queued"] == [out["job_id"]]
    assert state["pending_annotations"] == 2 and state["threshold"] == 3
    assert state["running"] is None and state["failed"] == []


def test_a_killed_workers_lock_expires_and_the_job_can_be_rerun(settings, conn):
    # a worker died mid-training: its lock has no heartbeat any more and expires after its TTL
    assert q.acquire_training_lock(conn, 7, "train-p7-dead", ttl=1)
    ran = []

    def body(force, progress, conn_, job_id):
        ran.append(job_id)
        return {"status": "trained"}

    assert run_exclusive(7, settings, None, body, force=True, reason="x", job_id="train-p7-new")["status"] == "deferred"
    time.sleep(1.5)
    conn.delete(keys.dirty_key(7))
    # RQ re-runs the same job id (retry or requeue of the abandoned job): it gets the lock now
    assert run_exclusive(7, settings, None, body, force=True, reason="x", job_id="train-p7-dead")["status"] == "trained"
    assert ran == ["train-p7-dead"] and q.running_job(conn, 7) is None


def test_heartbeat_keeps_the_lock_alive(settings, conn):
    assert q.acquire_training_lock(conn, 7, "job-a", ttl=2)
    with q.LockHeartbeat(conn, 7, "job-a", ttl=2) as hb:
        time.sleep(3)
        assert q.running_job(conn, 7) == "job-a" and not hb.lost
    assert q.release_training_lock(conn, 7, "job-a")
