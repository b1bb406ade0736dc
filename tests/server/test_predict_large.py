"""/predict at any size Label Studio sends (issue 16 item 2), through the real app with a real Redis.

"Retrieve predictions" sends every selected task in one request (1,980 on the quick start's stack). The request
answers what is done by PREDICT_DEADLINE_S; the rest is answered with an empty list (Label Studio stores nothing
and asks again) and queued as RQ backlog jobs, once. Images that never arrive stand in for "too much work": the
first few tiles come at once, the others hang on a loopback host until the test ends.
"""

from __future__ import annotations

import json
import tracemalloc

import pytest
from server_helpers import DENSE_XML, ImageHost, png_bytes, upload_task

from ml_backend.queue.rescoring import BACKLOG_JOBS, BACKLOG_MAX_CHUNK
from ml_backend.server.schemas import MAX_TASKS

PROJECT = "7.1700000000"
N_TASKS = 1_500  # above the former cap of 1,000 per request
FAST = 6


def _tasks() -> list[dict]:
    tasks = [upload_task(i + 1, "good.png") for i in range(FAST)]
    tasks += [upload_task(i + 1, "slow.png") for i in range(FAST, N_TASKS)]
    tasks[2] = {"id": 3}  # no data: fails alone, never queued
    tasks[3] = upload_task(4, "corrupt.png")  # not an image: fails alone, never queued
    return tasks


@pytest.fixture
def host(em_tiles):
    good = png_bytes(em_tiles[0][0])
    files = {"/data/upload/1/good.png": good, "/data/upload/1/slow.png": good, "/data/upload/1/corrupt.png": b"\x89PNG"}
    with ImageHost(files, slow={"/data/upload/1/slow.png"}) as server:
        yield server


def _post(client, tasks: list[dict]):
    return client.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": DENSE_XML})


def _backlog_jobs(redis_url: str, queue_name: str) -> list:
    import redis
    from rq import Queue
    from rq.serializers import JSONSerializer

    conn = redis.Redis.from_url(redis_url)
    return [j for j in Queue(queue_name, connection=conn, serializer=JSONSerializer).jobs
            if j.func_name == "ml_backend.jobs.backlog.predict_backlog"]  # fmt: skip


def test_a_request_above_the_old_cap_answers_what_is_done_and_queues_the_rest_once(
    make_client, host, publish, redis_url, settings
):
    version = publish(7)
    client = make_client(label_studio_url=host.url, redis_url=redis_url, predict_deadline_s=2.0, rescore_chunk=50)
    r = _post(client, _tasks())
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    results = body["results"]
    assert len(results) == N_TASKS
    done = [i for i in range(FAST) if i not in (2, 3)]
    for i in done:
        assert results[i]["model_version"] == version and results[i]["result"], i
    # Undone: an empty list, which Label Studio stores as nothing (asked again next time), never {"result": []}.
    assert all(results[i] == [] for i in range(FAST, N_TASKS))
    assert results[2] == [] and results[3] == []
    assert sorted(e["task"] for e in body["errors"]) == [3, 4]  # the bad tasks failed alone; queued ones are no error
    undone_ids = set(range(FAST + 1, N_TASKS + 1))
    assert body["queued"]["tasks"] == len(undone_ids) and body["queued"]["already_queued"] == 0
    assert "PREDICT_DEADLINE_S=2 s" in body["queued"]["reason"]

    jobs = _backlog_jobs(redis_url, settings.queue_name)
    assert len(jobs) == body["queued"]["jobs"] == BACKLOG_JOBS  # 1,494 tasks: 16 jobs of 94, not 30 of 50
    queued = [t for j in jobs for t in j.kwargs["task_ids"]]
    assert sorted(queued) == sorted(undone_ids)  # every undone task once, none of the done or bad ones
    assert {j.kwargs["version"] for j in jobs} == {version} and {j.kwargs["project_id"] for j in jobs} == {7}
    assert all(50 <= len(j.kwargs["task_ids"]) <= BACKLOG_MAX_CHUNK for j in jobs[:-1])

    # Label Studio asks again for the same tasks before the worker got to them: answered empty, not queued twice.
    again = _post(client, _tasks()).get_json()
    assert all(again["results"][i] == [] for i in range(FAST, N_TASKS))
    assert again["queued"]["tasks"] == 0 and again["queued"]["already_queued"] == len(undone_ids)
    assert len(_backlog_jobs(redis_url, settings.queue_name)) == len(jobs)
    metrics = client.get("/metrics").get_json()["predict"]
    assert metrics["tasks"] == 2 * N_TASKS and metrics["queued_tasks"] == len(undone_ids)


def test_without_redis_the_undone_tasks_are_per_task_errors(make_client, host, publish):
    """No Redis (nothing listens on the settings' port 9): nothing can be queued, so each undone task says why and
    is answered empty as before; Label Studio asks for it again next time."""
    publish(7)
    client = make_client(label_studio_url=host.url, predict_deadline_s=1.5)
    body = _post(client, _tasks()[:40]).get_json()
    undone = [e for e in body["errors"] if "deadline exceeded" in e["reason"]]
    assert {e["index"] for e in undone} == set(range(FAST, 40))
    assert all("not queued for the background" in e["reason"] and "Redis" in e["reason"] for e in undone)
    assert "queued" not in body and all(body["results"][i] == [] for i in range(FAST, 40))


def test_the_body_is_read_task_by_task_without_keeping_what_label_studio_adds():
    """Label Studio sends every task with its annotations and predictions (brush RLE). They are dropped as each
    task is read: the parse keeps id + data only and its peak memory stays near the body's text, while parsing the
    whole body at once holds every prediction too."""
    from ml_backend.server.predict import parse_predict_body

    rle = list(range(256)) * 8  # about 8 kB of RLE text per prediction, like a 256-px tile's mask
    tasks = [{"id": i, "data": {"image": f"/data/upload/1/t{i}.png"}, "annotations": [],
              "predictions": [{"model_version": "old", "result": [{"value": {"rle": rle}}]}]}
             for i in range(1, 2_001)]  # fmt: skip
    raw = json.dumps({"tasks": tasks, "project": PROJECT, "label_config": DENSE_XML}).encode()
    del tasks

    def peak(parse) -> tuple[object, int]:
        tracemalloc.start()
        try:
            out = parse()
            return out, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    body, streamed = peak(lambda: parse_predict_body(raw, "application/json"))
    assert len(body["tasks"]) == 2_000 and body["tasks"][0] == {"id": 1, "data": {"image": "/data/upload/1/t1.png"}}
    assert body["project"] == PROJECT and body["label_config"] == DENSE_XML
    whole, at_once = peak(lambda: json.loads(raw))
    assert len(whole["tasks"]) == 2_000
    assert streamed < 0.6 * at_once, (streamed, at_once, len(raw))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"tasks": [{"id": 1}, ], "project": "7"}', "malformed JSON"),
        (b'{"tasks": [{"id": 1}], "project": "7"} trailing', "malformed JSON: Extra data"),
        (b'{"tasks": [{"id": NaN}], "project": "7"}', "NaN is not a JSON number"),
        (b'[{"id": 1}]', "expected a JSON object, got array"),
    ],
)
def test_malformed_large_bodies_are_a_clear_400(client, raw, reason):
    r = client.post("/predict", data=raw, content_type="application/json")
    assert r.status_code == 400 and reason in r.get_json()["reason"], r.get_json()


def test_the_remaining_cap_is_a_protection_with_a_clear_error(client):
    tasks = ",".join(f'{{"id": {i}}}' for i in range(MAX_TASKS + 1))
    r = client.post("/predict", data=f'{{"project": "7", "tasks": [{tasks}]}}', content_type="application/json")
    assert r.status_code == 400
    reason = r.get_json()["reason"]
    assert f"more than {MAX_TASKS:,} tasks" in reason and "select fewer tasks" in reason


def test_predict_has_its_own_body_limit(make_client):
    """/predict's body may be PREDICT_MAX_REQUEST_BYTES (read task by task); the other routes keep MAX_REQUEST_BYTES."""
    client = make_client(max_request_bytes=1024 * 1024, predict_max_request_bytes=4 * 1024 * 1024)
    pad = "x" * 1000

    def body(n_tasks: int) -> str:
        tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}, "meta": pad} for i in range(1, n_tasks + 1)]
        return json.dumps({"project": PROJECT, "label_config": DENSE_XML, "tasks": tasks})

    two_mib = body(2_000)
    assert 1024 * 1024 < len(two_mib) < 4 * 1024 * 1024
    r = client.post("/predict", data=two_mib, content_type="application/json")
    assert r.status_code == 200 and len(r.get_json()["results"]) == 2_000, r.get_json()  # cold start: all answered
    assert client.post("/setup", data=two_mib, content_type="application/json").status_code == 413
    r = client.post("/predict", data=body(4_500), content_type="application/json")
    assert r.status_code == 413, r.get_json()


def test_a_backlog_job_of_a_replaced_version_does_nothing(settings, publish):
    """A training published a newer version before the backlog job ran: the job predicts nothing (the new version's
    delivery covers those tasks, and Label Studio asks for the new version's predictions anyway)."""
    from ml_backend.jobs.backlog import finish_backlog

    old = publish(7)
    new = publish(7)
    summary = finish_backlog(7, old, [11, 12], settings)  # Label Studio (port 9) is never called
    assert summary == {"status": "superseded", "project": 7, "version": old, "live": new, "tasks": 2}
