"""The bad-input matrix of every route (issue 9, findings 5-7): one case per row, each asserting the status, a clear
JSON reason, that nothing was created for an id that cannot exist, and that the next good request still succeeds.

Images come from a loopback HTTP host that is LABEL_STUDIO_URL (so the media allow-list allows it) as
``/data/upload/...`` URLs, the way Label Studio serves uploads.
"""

from __future__ import annotations

import json
import re
import struct
import time
import zlib

import numpy as np
import pytest
from server_helpers import DENSE_XML, ImageHost, png_bytes, upload_task

PROJECT = "7.1700000000"
MAX_BODY = 4 * 1024 * 1024
DEEP = "[" * 100_000 + "]" * 100_000


def _png_header_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's first line)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def images(em_tiles):
    tile = em_tiles[0][0]
    good = png_bytes(tile)
    rng = np.random.default_rng(0)
    return {
        "good.png": good,
        "empty.png": b"",
        "corrupt.png": b"\x89PNG\r\n\x1a\n this is not really a png",
        "truncated.png": good[: len(good) // 2],
        "sixteen.png": png_bytes(tile.astype(np.uint16) * 257),
        "rgba.png": png_bytes(np.dstack([tile, tile, tile, np.full_like(tile, 255)])),
        "one.png": png_bytes(np.zeros((1, 1), dtype=np.uint8)),
        "too_many_pixels.png": png_bytes(rng.integers(0, 255, (300, 300), dtype=np.uint8)),
        "bomb.png": png_bytes(np.zeros((4000, 4000), dtype=np.uint8)),  # ~16 MPixel from a few kB
        "header_bomb.png": _png_header_bomb(100_000, 100_000),
    }


@pytest.fixture
def host(images):
    with ImageHost({f"/data/upload/1/{name}": data for name, data in images.items()}) as server:
        yield server


@pytest.fixture
def client(make_client, host, publish):
    publish(7)
    return make_client(
        label_studio_url=host.url, max_request_bytes=MAX_BODY, predict_max_request_bytes=MAX_BODY, fetch_deadline_s=10.0
    )


def _predict(client, tasks, **extra):
    return client.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": DENSE_XML, **extra})


def _assert_error(r, status: int, reason: str) -> None:
    assert r.status_code == status, r.get_data(as_text=True)[:300]
    body = r.get_json()
    assert body["status"] == "error", body
    assert re.search(reason, body["reason"]), body["reason"]
    assert len(body["reason"]) < 1000  # a reason, not an echo of the input


def _projects(settings) -> set[str]:
    root = settings.model_dir / "projects"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def _good_predict(client) -> None:
    r = _predict(client, [upload_task(1, "good.png")])
    assert r.status_code == 200
    body = r.get_json()
    assert body["errors"] == [] and body["results"][0]["result"]


# ---------------------------------------------------------------------- request-level rows
def _raw(data, content_type="application/json"):
    return {"data": data, "content_type": content_type}


def _body(**fields):
    return _raw(json.dumps(fields))


def _predict_body(**override):
    fields = {"tasks": [upload_task(1, "good.png")], "project": PROJECT, "label_config": DENSE_XML, **override}
    return _raw(json.dumps({k: v for k, v in fields.items() if v is not ...}))


def _huge_number_project_body(route: str, digits: int) -> dict:
    tail = ', "tasks": [], "label_config": "x"' if route == "/predict" else ', "schema": "x"'
    return _raw('{"project": ' + "9" * digits + tail + "}")


REQUEST_ROWS = [
    # route, request, status, reason
    ("/predict", _raw("{not json"), 400, "malformed JSON"),
    ("/predict", _raw(""), 400, "empty request body"),
    ("/predict", _raw("[1, 2]"), 400, "expected a JSON object, got array"),
    ("/predict", _raw("null"), 400, "expected a JSON object, got null"),
    ("/predict", _raw(b"\xff\xfe\xfa{"), 400, "malformed JSON"),
    ("/predict", _raw(" " * (MAX_BODY + 1)), 413, "exceeds|too large"),
    ("/predict", _raw(DEEP), 400, "deeper than 64 levels"),
    ("/predict", _raw('{"tasks": ' + DEEP + ', "project": "7.1"}'), 400, "deeper than 64 levels"),
    ("/predict", _raw(json.dumps({"tasks": []}), "text/plain"), 415, "unsupported content type 'text/plain'"),
    ("/predict", _raw("tasks=1", "application/x-www-form-urlencoded"), 415, "Content-Type: application/json"),
    ("/predict", _raw("x", "multipart/form-data; boundary=x"), 415, "unsupported content type"),
    ("/predict", _predict_body(project=...), 400, "missing 'project'"),
    ("/predict", _predict_body(project="-3.1700000000"), 400, r"'project' id -3 is out of range 1\.\.2147483647"),
    ("/predict", _predict_body(project="0.17"), 400, "out of range"),
    ("/predict", _predict_body(project=2**31), 400, "2147483648 is out of range"),
    ("/predict", _predict_body(project="9" * 10_000 + ".1"), 400, "10,002 characters long"),
    ("/predict", _huge_number_project_body("/predict", 10_000), 400, "an integer of 10000 digits"),
    ("/predict", _predict_body(project=[7]), 400, "must be a string like"),
    ("/predict", _predict_body(project=True), 400, "got boolean"),
    ("/predict", _predict_body(project="../../etc.1"), 400, "does not start with a project id"),
    ("/predict", _predict_body(tasks={"id": 1}), 400, "'tasks' must be a list, got object"),
    ("/predict", _predict_body(tasks="t"), 400, "'tasks' must be a list, got string"),
    ("/predict", _predict_body(tasks=[{"id": i} for i in range(200_001)]), 400, "more than 200,000 tasks, at most"),
    ("/predict", _predict_body(label_config=42), 400, "'label_config' must be the label config XML"),
    ("/predict", _predict_body(label_config="<View" + "x" * 1_000_000), 400, "1,000,005 characters long"),
    ("/predict", _predict_body(label_config="<View></View>"), 400, "no <BrushLabels>"),
    ("/setup", _raw("{not json"), 400, "malformed JSON"),
    ("/setup", _raw(DEEP), 400, "deeper than 64 levels"),
    ("/setup", _raw(" " * (MAX_BODY + 1)), 413, "exceeds|too large"),
    ("/setup", _raw(json.dumps({"project": PROJECT}), "text/xml"), 415, "unsupported content type"),
    ("/setup", _body(schema=DENSE_XML), 400, "missing 'project'"),
    ("/setup", _body(project="-1.1", schema=DENSE_XML), 400, "-1 is out of range"),
    ("/setup", _body(project=2**40, schema=DENSE_XML), 400, "1099511627776 is out of range"),
    ("/setup", _huge_number_project_body("/setup", 10_000), 400, "an integer of 10000 digits"),
    ("/setup", _body(project={"id": 7}, schema=DENSE_XML), 400, "must be a string like"),
    ("/setup", _body(project=PROJECT, schema=["<View/>"]), 400, "'schema' must be the label config XML"),
    ("/setup", _body(project=PROJECT, schema=DENSE_XML, extra_params=[1]), 400, "extra_params must be an object"),
    ("/setup", _body(project=PROJECT, schema=DENSE_XML, extra_params=3), 400, "extra_params must be an object"),
    (
        "/setup",
        _body(project=PROJECT, schema=DENSE_XML, extra_params={"strategy_params": [1, 2]}),
        400,
        "strategy_params must be an object, got array",
    ),
    (
        "/setup",
        _body(project=PROJECT, schema=DENSE_XML, extra_params={"strategy_params": {"k": {"deep": 1}}}),
        400,
        r"strategy_params\['k'\] must be a number, string or boolean",
    ),
    (
        "/setup",
        _body(project=PROJECT, schema=DENSE_XML, extra_params={"strategy": ["entropy"]}),
        400,
        "extra_params.strategy must be a string, got array",
    ),
    (
        "/setup",
        _body(project=PROJECT, schema=DENSE_XML, extra_params={"strategy_params": {"nonsense": 1}}),
        400,
        r"unknown parameter 'nonsense' \(allowed parameters: aggregation\)",
    ),
    (
        "/setup",
        _body(project=PROJECT, schema=DENSE_XML, extra_params={"aggregation": "median"}),
        400,
        "aggregation must be one of",
    ),
    (
        "/setup",
        _body(project=PROJECT, schema=DENSE_XML, extra_params="[" * 9000),
        400,
        "extra_params nests JSON deeper",
    ),
    ("/setup", _body(project=PROJECT, schema=DENSE_XML, extra_params="[1]"), 400, "extra_params must be an object"),
    ("/setup", _body(project=PROJECT, schema=DENSE_XML, extra_params="{x"), 400, "extra_params is not valid JSON"),
    ("/versions", {"query_string": {"project": "-4"}}, 400, "-4 is out of range"),
    ("/versions", {"query_string": {"project": "9" * 5000}}, 400, "5,000 characters long"),
    ("/versions", {"query_string": {"project": "abc"}}, 400, "does not start with a project id"),
    ("/versions", _raw("{nope"), 400, "malformed JSON"),
    ("/versions", _raw(DEEP), 400, "deeper than 64 levels"),
]


def _next_good(client, route: str) -> None:
    if route == "/predict":
        _good_predict(client)
    elif route == "/setup":
        r = client.post("/setup", json={"project": PROJECT, "schema": DENSE_XML})
        assert r.status_code == 200 and r.get_json()["model_version"].startswith("v")
    else:
        r = client.get("/versions?project=7")
        assert r.status_code == 200 and r.get_json()["current"]


@pytest.mark.parametrize(
    ("route", "request_kwargs", "status", "reason"),
    [pytest.param(*row, id=f"{row[0]}-{i}-{row[3][:40]}") for i, row in enumerate(REQUEST_ROWS)],
)
def test_bad_request_is_4xx_with_reason(client, settings, route, request_kwargs, status, reason):
    before = _projects(settings)
    method = "GET" if "query_string" in request_kwargs else "POST"
    r = client.open(route, method=method, **request_kwargs)
    _assert_error(r, status, reason)
    assert _projects(settings) == before  # an id that cannot exist never becomes a folder
    _next_good(client, route)


@pytest.mark.parametrize(
    ("route", "body"),
    [
        pytest.param("/predict", {"extra": 1, "params": {"login": None}, "model_version": "x"}, id="predict-extra"),
        pytest.param("/predict", {"tasks": None}, id="predict-tasks-null"),
        pytest.param("/setup", {"hostname": "http://ls", "access_token": "t", "new_in_ls_2": [1]}, id="setup-extra"),
        pytest.param("/setup", {"extra_params": ""}, id="setup-extra-params-empty"),
        pytest.param("/setup", {"extra_params": '{"strategy": "margin"}'}, id="setup-extra-params-text"),
        pytest.param("/setup", {"label_config": DENSE_XML, "schema": None}, id="setup-label-config-field"),
    ],
)
def test_extra_and_optional_fields_are_accepted(client, route, body):
    """Label Studio sends fields this backend does not use and adds new ones: ignored, not refused."""
    if route == "/predict":
        base = {"tasks": [upload_task(1, "good.png")], "project": PROJECT, "label_config": DENSE_XML}
    else:
        base = {"project": PROJECT, "schema": DENSE_XML}
    r = client.post(route, json={**base, **body})
    assert r.status_code == 200, r.get_json()
    if route == "/predict" and body.get("tasks", ...) is None:
        assert r.get_json() == {"results": []}
    elif route == "/predict":
        assert r.get_json()["results"][0]["result"]
    else:
        assert r.get_json()["model_version"].startswith("v")


# ---------------------------------------------------------------------- per-task rows of /predict
TASK_ROWS = [
    # the bad task (raw JSON text, so that ids too long for int() can be sent), the reason of its error
    ('{"id": ' + "9" * 5000 + ', "data": {"image": "/data/upload/1/good.png"}}', "an integer of 5000 digits"),
    ('{"id": "' + "9" * 5000 + '", "data": {"image": "/data/upload/1/good.png"}}', "must be an integer in"),
    ('{"id": -5, "data": {"image": "/data/upload/1/good.png"}}', "-5 is out of range"),
    ('{"id": 0, "data": {"image": "/data/upload/1/good.png"}}', "0 is out of range"),
    ('{"id": 2147483648, "data": {"image": "/data/upload/1/good.png"}}', "2147483648 is out of range"),
    ('{"id": true, "data": {"image": "/data/upload/1/good.png"}}', "got boolean"),
    ('{"id": 1.5, "data": {"image": "/data/upload/1/good.png"}}', "got float"),
    ('{"id": [1], "data": {"image": "/data/upload/1/good.png"}}', "got array"),
    ('{"data": {"image": "/data/upload/1/good.png"}}', "has no integer 'id'"),
    ('"a string"', "task #1 is str, expected an object"),
    ("[1, 2]", "task #1 is list, expected an object"),
    ("null", "task #1 is NoneType, expected an object"),
    ('{"id": 2}', "task has no 'data' object"),
    ('{"id": 2, "data": [1]}', "task has no 'data' object"),
    ('{"id": 2, "data": {"text": "x"}}', "no image under 'image'.*keys: text"),
    ('{"id": 2, "data": {"image": 5}}', "no image under 'image'"),
    ('{"id": 2, "data": {"image": ""}}', "no image under 'image'"),
    ('{"id": 2, "data": {"image": "/data/upload/1/' + "x" * 9000 + '"}}', "characters long"),
    ('{"id": 2, "data": {"image": "/data/upload/1/missing.png"}}', "404|not found"),
    ('{"id": 2, "data": {"image": "/data/upload/1/empty.png"}}', "empty|0 bytes"),
    ('{"id": 2, "data": {"image": "/data/upload/1/corrupt.png"}}', "cannot decode|not an image"),
    ('{"id": 2, "data": {"image": "/data/upload/1/truncated.png"}}', "truncated|cannot decode|not an image"),
    ('{"id": 2, "data": {"image": "/data/upload/1/too_many_pixels.png"}}', "MAX_IMAGE_PIXELS"),
    ('{"id": 2, "data": {"image": "/data/upload/1/bomb.png"}}', "MAX_IMAGE_PIXELS"),
    ('{"id": 2, "data": {"image": "/data/upload/1/header_bomb.png"}}', "MAX_IMAGE_PIXELS|decompression bomb"),
]


@pytest.mark.parametrize(("bad_task", "reason"), [pytest.param(*row, id=row[1][:40]) for row in TASK_ROWS])
def test_bad_task_fails_alone(client, bad_task, reason):
    good = json.dumps(upload_task(1, "good.png"))
    data = f'{{"project": "{PROJECT}", "label_config": {json.dumps(DENSE_XML)}, "tasks": [{good}, {bad_task}]}}'
    r = client.post("/predict", data=data, content_type="application/json")
    assert r.status_code == 200, r.get_data(as_text=True)[:300]
    body = r.get_json()
    assert body["results"][0]["result"]  # the good task still gets its mask
    assert body["results"][1] == []  # Label Studio stores no prediction for the bad one
    assert [e["index"] for e in body["errors"]] == [1]
    assert re.search(reason, body["errors"][0]["reason"]), body["errors"][0]["reason"]
    assert len(body["errors"][0]["reason"]) < 1000
    _good_predict(client)


@pytest.mark.parametrize("name", ["sixteen.png", "rgba.png", "one.png"])
def test_unusual_but_valid_images_are_predicted(client, images, name):
    """16-bit, RGBA and 1x1 images are images: they get a prediction of their own size, not an error."""
    import io

    from PIL import Image

    width, height = Image.open(io.BytesIO(images[name])).size
    body = _predict(client, [upload_task(1, name), upload_task(2, "good.png")]).get_json()
    assert body["errors"] == []
    first = body["results"][0]
    assert first["model_version"].startswith("v") and 0.0 <= first["score"] <= 1.0
    for region in first["result"]:
        assert (region["original_width"], region["original_height"]) == (width, height)
    assert body["results"][1]["result"]


# ---------------------------------------------------------------------- /webhook (real Redis)
WEBHOOK_ROWS = [
    (_raw("{"), 400, "malformed JSON"),
    (_raw(DEEP), 400, "deeper than 64 levels"),
    (_raw(json.dumps({"action": "START_TRAINING"}), "text/plain"), 415, "unsupported content type"),
    (_body(action="START_TRAINING", project={"id": -1}), 400, "'project.id' -1 is out of range"),
    (_body(action="START_TRAINING", project={"id": 0}), 400, "out of range"),
    (_body(action="START_TRAINING", project={"id": 2**31}), 400, "2147483648 is out of range"),
    (_raw('{"action": "START_TRAINING", "project": {"id": ' + "9" * 10_000 + "}}"), 400, "10000 digits"),
    (_body(action="START_TRAINING", project="9" * 10_000), 400, "10,000 characters long"),
    (_body(action="START_TRAINING", project=-7), 400, "-7 is out of range"),
    (_body(action="START_TRAINING", project={"id": [7]}), 400, "must be an integer"),
    (_body(action="START_TRAINING", project={"id": "abc"}), 400, "does not start with a project id"),
    (_body(action="ANNOTATION_CREATED", annotation={"project": -2, "id": 1}), 400, "'annotation.project' -2"),
    (_body(action="ANNOTATION_CREATED", project={"id": 7}, task={"id": 2**33}), 400, "'task.id' 8589934592"),
    (_body(action="ANNOTATION_CREATED", project={"id": 7}, annotation={"task": -1}), 400, "'annotation.task' -1"),
    (_body(action="ANNOTATION_CREATED", project={"id": 7}, annotation={"id": "x"}), 400, "'annotation.id' must be"),
    (_body(action=["START_TRAINING"], project={"id": 7}), 400, "'action' must be a string"),
    (_body(action="A" * 1000, project={"id": 7}), 400, "'action' is 1,000 characters long"),
]


@pytest.mark.parametrize(
    ("request_kwargs", "status", "reason"),
    [pytest.param(*row, id=f"{i}-{row[2][:40]}") for i, row in enumerate(WEBHOOK_ROWS)],
)
def test_bad_webhook_is_4xx_and_never_reaches_redis(make_client, redis_url, request_kwargs, status, reason):
    import redis

    from ml_backend.queue import keys

    conn = redis.Redis.from_url(redis_url)
    client = make_client(redis_url=redis_url, max_request_bytes=MAX_BODY, train_batch_size=100)
    _assert_error(client.post("/webhook", **request_kwargs), status, reason)
    # no project key, no queue, no job (an rq scheduler lock of another test's worker is not this request's)
    assert [k for k in conn.keys("*") if not k.startswith(b"rq:scheduler")] == []
    ok = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 7}, "task": {"id": 3}})
    assert ok.status_code == 200 and ok.get_json()["status"] == "counted"
    assert {k.decode() for k in conn.keys(keys.project_pattern())} == {keys.pending_key(7)}


def test_webhook_accepts_label_studio_id_forms(make_client, redis_url):
    """Ids as Label Studio sends them (ints, '<id>.<ts>' strings, nested project objects) still work."""
    client = make_client(redis_url=redis_url, train_batch_size=100)
    for payload in (
        {"action": "ANNOTATION_CREATED", "project": {"id": 7, "title": "x"}, "annotation": {"id": 1, "task": 3}},
        {"action": "ANNOTATION_UPDATED", "project": "7.1700000000", "task": {"id": 4, "project": 7}},
        {"action": "ANNOTATION_CREATED", "annotation": {"project": 7, "id": 9, "task": 5}},
    ):
        r = client.post("/webhook", json=payload)
        assert r.status_code == 200 and r.get_json()["project"] == 7, r.get_json()


# ---------------------------------------------------------------------- request deadline (finding 5)
def test_slow_image_host_is_cut_off_by_the_request_deadline(make_client, images, publish):
    """Two images never arrive: the request answers within PREDICT_DEADLINE_S + slack, those two tasks carry a
    "deadline exceeded" error and no prediction, the others their masks; the next request is served normally."""
    publish(7)
    slow = {"/data/upload/1/slow1.png", "/data/upload/1/slow2.png"}
    files = {"/data/upload/1/good.png": images["good.png"], **{path: images["good.png"] for path in slow}}
    deadline = 1.5
    with ImageHost(files, slow=slow) as host:
        client = make_client(label_studio_url=host.url, predict_deadline_s=deadline, fetch_deadline_s=60.0)
        tasks = [upload_task(1, "good.png"), upload_task(2, "slow1.png"), upload_task(3, "good.png")]
        tasks.append(upload_task(4, "slow2.png"))
        t0 = time.monotonic()
        r = _predict(client, tasks)
        elapsed = time.monotonic() - t0
        assert r.status_code == 200
        assert deadline / 2 <= elapsed < deadline + 2.5, elapsed  # waited for the slow host, but not past the deadline
        body = r.get_json()
        assert body["results"][0]["result"] and body["results"][2]["result"]
        assert body["results"][1] == [] and body["results"][3] == []
        assert {e["index"] for e in body["errors"]} == {1, 3}
        assert all("deadline exceeded" in e["reason"] for e in body["errors"])
        t0 = time.monotonic()
        _good_predict(client)  # the stuck downloads do not hold up the next request
        assert time.monotonic() - t0 < deadline


def test_request_waiting_for_a_busy_model_answers_by_its_deadline(make_client, host, publish):
    """Another request holds the model (the inference lock) past this one's deadline: the request does not queue
    behind it for ever, it answers in time with "deadline exceeded" per task, and serves normally afterwards."""
    from ml_backend.labelstudio import prediction as predict_module

    publish(7)
    client = make_client(label_studio_url=host.url, predict_deadline_s=1.0)
    assert predict_module._inference_lock.acquire(timeout=5)
    try:
        t0 = time.monotonic()
        r = _predict(client, [upload_task(1, "good.png"), upload_task(2, "good.png")])
        elapsed = time.monotonic() - t0
    finally:
        predict_module._inference_lock.release()
    assert r.status_code == 200 and 0.5 <= elapsed < 1.0 + 2.5, elapsed
    body = r.get_json()
    assert body["results"] == [[], []]
    assert [e["index"] for e in body["errors"]] == [0, 1]
    assert all("deadline exceeded" in e["reason"] for e in body["errors"])
    _good_predict(client)
