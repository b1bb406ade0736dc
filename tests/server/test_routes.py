"""Contract tests of every route of the ML backend, as Label Studio 1.23 calls them, including bad input."""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from server_helpers import CUSTOM_XML, DENSE_XML, SPARSE_XML, task

PROJECT = "7.1700000000"


def _setup(client, xml=DENSE_XML, project=PROJECT, **extra):
    return client.post("/setup", json={"project": project, "schema": xml, "hostname": "http://x", **extra})


def _predict(client, tasks, xml=DENSE_XML, project=PROJECT):
    return client.post("/predict", json={"tasks": tasks, "project": project, "label_config": xml, "params": {}})


def _mask(result: dict) -> np.ndarray:
    h, w = result["original_height"], result["original_width"]
    return decode_rle(result["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


# ---------------------------------------------------------------------- /health, /metrics
def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.get_json()
    assert body["status"] == "UP" and body["model_class"] == "UNet"


def test_metrics_count_requests_errors_and_latency(client, publish):
    publish(7)
    _setup(client)
    _predict(client, [task(1, "t0.png"), task(2, "missing.png")])
    client.post("/predict", data="{not json")
    m = client.get("/metrics").get_json()
    assert m["requests"]["/setup"] == 1 and m["requests"]["/predict"] == 2
    assert m["errors"] == {"/predict 400": 1}
    assert m["predict"]["tasks"] == 2 and m["predict"]["failed_tasks"] == 1
    assert m["predict_latency_s"]["count"] == 1 and m["predict_latency_s"]["max"] > 0
    assert m["model_loads"] == 1


# ---------------------------------------------------------------------- /setup
def test_setup_cold_start_stores_config_and_strategy_quickly(client, settings):
    t0 = time.perf_counter()
    r = _setup(client, extra_params={"strategy": "margin", "aggregation": "mean"})
    assert time.perf_counter() - t0 < 1.0  # Label Studio gives /setup 3 s
    assert r.status_code == 200 and r.get_json() == {"model_version": "cold-start"}
    folder = settings.model_dir / "projects" / "7"
    assert (folder / "label_config.xml").read_text() == DENSE_XML
    state = json.loads((folder / "state.json").read_text())
    assert state["strategy"] == "margin" and state["strategy_params"] == {"aggregation": "mean"}
    assert state["mode"] == "dense" and state["labels"] == ["Mitochondria"]
    # a later setup without extra_params (Label Studio calls it before every prediction round) keeps the strategy
    _setup(client)
    assert json.loads((folder / "state.json").read_text())["strategy"] == "margin"


def test_setup_extra_params_as_json_string(client, settings):
    assert _setup(client, extra_params='{"strategy": "least_confidence"}').status_code == 200
    state = json.loads((settings.model_dir / "projects" / "7" / "state.json").read_text())
    assert state["strategy"] == "least_confidence" and state["strategy_params"] == {"aggregation": "sum"}


def test_setup_reports_the_current_trained_version(client, publish):
    version = publish(7)
    assert _setup(client).get_json() == {"model_version": version}
    newer = publish(7)
    assert _setup(client).get_json() == {"model_version": newer}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"schema": DENSE_XML}, "missing 'project'"),
        ({"project": "abc!.1", "schema": DENSE_XML}, "does not start with a project id"),
        ({"project": PROJECT, "schema": "<View><Image name='i' value='$i'/></View>"}, "no <BrushLabels>"),
        ({"project": PROJECT, "schema": "<View"}, "not valid Label Studio XML"),
        ({"project": PROJECT, "schema": 42}, "must be the label config XML"),
        ({"project": PROJECT}, "has no label config"),
        ({"project": PROJECT, "schema": DENSE_XML, "extra_params": {"strategy": "nope"}}, "unknown strategy 'nope'"),
        ({"project": PROJECT, "schema": DENSE_XML, "extra_params": "{bad json"}, "extra_params is not valid JSON"),
    ],
)
def test_setup_bad_input_is_400_with_reason(client, body, reason):
    r = client.post("/setup", json=body)
    assert r.status_code == 400
    assert r.get_json()["status"] == "error" and reason in r.get_json()["reason"]
    assert client.get("/health").status_code == 200


def test_broken_current_pointer_is_a_clear_500(client, settings, publish):
    publish(7)
    (settings.model_dir / "projects" / "7" / "CURRENT").write_text("v9999-20990101T000000Z\n")
    for r in (_setup(client), _predict(client, [task(1, "t0.png")])):
        assert r.status_code == 500
        assert "CURRENT points to 'v9999-20990101T000000Z'" in r.get_json()["reason"]
    assert client.get("/health").status_code == 200


# ---------------------------------------------------------------------- /predict
def test_predict_cold_start_returns_no_masks_and_stable_coverage_scores(client):
    _setup(client)
    tasks = [task(i, "t0.png") for i in range(1, 6)]
    first = _predict(client, tasks).get_json()
    assert first["model_version"] == "cold-start"
    results = first["results"]
    assert len(results) == 5
    assert all(r["result"] == [] and r["model_version"] == "cold-start" for r in results)
    scores = [r["score"] for r in results]
    assert all(0.0 <= s < 1.0 for s in scores) and len(set(scores)) == 5
    # a later request with the tasks in another order and one more task gives every task the same score
    again = _predict(client, [task(9, "t1.png"), *reversed(tasks)]).get_json()["results"]
    assert [r["score"] for r in again[1:]] == scores[::-1]


def test_predict_with_trained_model_returns_brush_masks_and_entropy_scores(client, publish, trained_model, em_tiles):
    from ml_backend.imaging import normalize
    from ml_backend.inference.tiling import predict_tiled
    from ml_backend.strategies import pixel_entropy
    from ml_backend.training.metrics import iou

    version = publish(7)
    tasks = [task(10 + i, f"t{i}.png") for i in range(len(em_tiles[0]))]
    body = _predict(client, tasks).get_json()
    assert body["model_version"] == version and body["errors"] == []
    images, truth = em_tiles
    ious = []
    for img, gt, pred in zip(images, truth, body["results"], strict=True):
        assert pred["model_version"] == version
        assert len(pred["result"]) == 1
        region = pred["result"][0]
        assert (region["from_name"], region["to_name"], region["type"]) == ("tag", "image", "brushlabels")
        assert region["value"]["brushlabels"] == ["Mitochondria"]
        assert (region["original_width"], region["original_height"]) == (64, 64)
        assert 0.5 <= region["score"] <= 1.0  # mean confidence of the painted pixels
        mask = _mask(region)
        ious.append(iou(mask.astype(np.int64), gt.astype(np.int64)))
        # the score is the documented absolute entropy mapping: 1 - sum(entropy) / (H * W * log 2)
        probs = predict_tiled(trained_model, normalize(img), tile=256, overlap=32)
        expected = 1.0 - pixel_entropy(probs).sum() / (64 * 64 * np.log(2))
        assert pred["score"] == pytest.approx(expected, abs=1e-4)
        np.testing.assert_array_equal(mask, probs.argmax(0) == 1)
    assert np.mean(ious) > 0.3  # the model was trained: masks overlap the ground truth


def test_label_names_come_from_the_projects_config(client, publish):
    publish(7)
    body = _predict(client, [task(1, "t0.png", key="tile")], xml=CUSTOM_XML).get_json()
    region = body["results"][0]["result"][0]
    assert (region["from_name"], region["to_name"]) == ("seg", "em")
    assert region["value"]["brushlabels"] == ["Mito"]  # background is never painted by predictions


def test_one_bad_task_fails_alone(client, publish):
    version = publish(7)
    tasks = [
        task(1, "t0.png"),
        task(2, "missing.png"),  # not on disk, Label Studio (LABEL_STUDIO_URL) unreachable
        task(3, "corrupt.png"),
        {"id": 4, "data": {"text": "no image field"}},
        task(5, "huge.png"),  # 300 x 300 > MAX_IMAGE_PIXELS = 200 x 200
        "not a task",
        {"id": 7, "data": {"image": "s3://bucket/x.png"}},
        task(8, "t1.png"),
        {"id": "x", "data": {"image": "/data/local-files/?d=t2.png"}},
    ]
    r = _predict(client, tasks)
    assert r.status_code == 200
    body = r.get_json()
    results = body["results"]
    assert len(results) == len(tasks)
    for ok in (0, 7):
        assert results[ok]["model_version"] == version and results[ok]["result"]
    for bad in (1, 2, 3, 4, 5, 6, 8):
        assert results[bad] == []  # Label Studio stores no prediction and retries the task next time
    reasons = {e["index"]: e["reason"] for e in body["errors"]}
    assert set(reasons) == {1, 2, 3, 4, 5, 6, 8}
    assert "cannot fetch" in reasons[1]
    assert "cannot decode" in reasons[2]
    assert "no image under 'image'" in reasons[3] and "text" in reasons[3]
    assert "MAX_IMAGE_PIXELS" in reasons[4]
    assert "expected an object" in reasons[5]
    assert "cloud storage" in reasons[6]
    assert "integer 'id'" in reasons[8]
    assert _predict(client, [task(1, "t0.png")]).get_json()["results"][0]["result"]  # still serving


def test_mixed_image_sizes_and_flat_image(client, publish):
    publish(7)
    body = _predict(client, [task(1, "flat.png"), task(2, "t0.png")]).get_json()
    flat = body["results"][0]
    assert flat["model_version"] and 0.0 <= flat["score"] <= 1.0
    for region in flat["result"]:
        assert (region["original_width"], region["original_height"]) == (80, 48)


def test_images_larger_than_a_tile_are_tiled(make_client, publish, trained_model, em_tiles):
    from ml_backend.imaging import normalize
    from ml_backend.inference.tiling import predict_tiled

    client = make_client(tile_size=32, tile_overlap=8)
    publish(7)
    body = _predict(client, [task(1, "t0.png"), task(2, "flat.png")]).get_json()
    assert body["errors"] == []
    probs = predict_tiled(trained_model, normalize(em_tiles[0][0]), tile=32, overlap=8)
    np.testing.assert_array_equal(_mask(body["results"][0]["result"][0]), probs.argmax(0) == 1)


def test_many_tasks_in_one_request_are_batched_in_order(client, publish):
    publish(7)
    names = [f"t{i % 4}.png" for i in range(37)]
    body = _predict(client, [task(100 + i, name) for i, name in enumerate(names)]).get_json()
    assert body["errors"] == [] and len(body["results"]) == 37
    by_name: dict[str, float] = {}
    for name, result in zip(names, body["results"], strict=True):
        assert by_name.setdefault(name, result["score"]) == pytest.approx(result["score"], abs=1e-6)


@pytest.mark.parametrize("tasks", [[], None])
def test_no_tasks_gives_empty_results(client, tasks):
    r = client.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": DENSE_XML})
    assert r.status_code == 200 and r.get_json() == {"results": []}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("{not json", "malformed JSON"),
        ("", "empty request body"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"tasks": {"id": 1}, "project": PROJECT}), "'tasks' must be a list"),
        (json.dumps({"tasks": [task(1, "t0.png")], "label_config": DENSE_XML}), "missing 'project'"),
        (
            json.dumps({"tasks": [task(1, "t0.png")], "project": PROJECT, "label_config": "<View></View>"}),
            "no <BrushLabels>",
        ),
        (json.dumps({"tasks": [task(1, "t0.png")], "project": "99.1"}), "has no label config"),
    ],
)
def test_predict_bad_request_is_400_with_reason(client, data, reason):
    r = client.post("/predict", data=data, content_type="application/json")
    assert r.status_code == 400
    body = r.get_json()
    assert body["status"] == "error" and reason in body["reason"]


def test_predict_uses_stored_config_when_request_has_none(client, publish):
    publish(7)
    _setup(client, xml=CUSTOM_XML)
    r = client.post("/predict", json={"tasks": [task(1, "t0.png", key="tile")], "project": PROJECT})
    assert r.get_json()["results"][0]["result"][0]["from_name"] == "seg"


def test_model_that_does_not_match_the_config_is_409(client, publish):
    publish(7)
    three = "<View><Image name='i' value='$image'/><BrushLabels name='b' toName='i'><Label value='A'/>" \
            "<Label value='B'/></BrushLabels></View>"  # fmt: skip
    r = _predict(client, [task(1, "t0.png")], xml=three)
    assert r.status_code == 409 and "predicts 2 classes but the label config has 3" in r.get_json()["reason"]


def test_model_loaded_once_and_reloaded_when_a_new_version_is_promoted(client, publish):
    v1 = publish(7)
    for _ in range(3):
        assert _predict(client, [task(1, "t0.png")]).get_json()["model_version"] == v1
    assert client.get("/metrics").get_json()["model_loads"] == 1
    v2 = publish(7)
    assert _predict(client, [task(1, "t0.png")]).get_json()["model_version"] == v2
    assert client.get("/metrics").get_json()["model_loads"] == 2


def test_two_projects_keep_their_own_config_strategy_and_model(client, publish, settings):
    version = publish(1)
    assert _setup(client, xml=DENSE_XML, project="1.100").get_json() == {"model_version": version}
    assert _setup(client, xml=SPARSE_XML, project="2.200", extra_params={"strategy": "margin"}).get_json() == {
        "model_version": "cold-start"
    }
    p1 = _predict(client, [task(1, "t0.png")], xml=DENSE_XML, project="1.100").get_json()
    p2 = _predict(client, [task(1, "t0.png")], xml=SPARSE_XML, project="2.200").get_json()
    assert p1["model_version"] == version and p1["results"][0]["result"]
    assert p2["model_version"] == "cold-start" and p2["results"][0]["result"] == []
    s1 = json.loads((settings.model_dir / "projects" / "1" / "state.json").read_text())
    s2 = json.loads((settings.model_dir / "projects" / "2" / "state.json").read_text())
    assert (s1["strategy"], s1["mode"]) == ("entropy", "dense")
    assert (s2["strategy"], s2["mode"]) == ("margin", "sparse")


def test_batch_strategy_project_is_scored_by_entropy_in_predict(client, publish):
    publish(7)
    _setup(client, extra_params={"strategy": "coreset"})
    coreset = _predict(client, [task(1, "t0.png")]).get_json()["results"][0]["score"]
    _setup(client, extra_params={"strategy": "entropy"})
    entropy = _predict(client, [task(1, "t0.png")]).get_json()["results"][0]["score"]
    assert coreset == pytest.approx(entropy)


def test_bald_project_scores_with_mc_dropout(client, publish):
    publish(7)
    _setup(client, extra_params={"strategy": "bald"})
    body = _predict(client, [task(1, "t0.png"), task(2, "t1.png")]).get_json()
    assert body["errors"] == []
    assert all(0.0 <= r["score"] <= 1.0 and r["result"] for r in body["results"])


# ---------------------------------------------------------------------- auth
def _basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_on(make_client):
    client = make_client(basic_auth_user="ls", basic_auth_pass="s3cret")
    assert client.get("/health").status_code == 200  # liveness probes need no secret
    r = _setup(client)
    assert r.status_code == 401 and "basic authentication required" in r.get_json()["reason"]
    assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert client.post("/setup", json={}, headers=_basic("ls", "wrong")).status_code == 401
    assert client.get("/metrics").status_code == 401
    ok = client.post("/setup", json={"project": PROJECT, "schema": DENSE_XML}, headers=_basic("ls", "s3cret"))
    assert ok.status_code == 200


def test_basic_auth_off_accepts_requests_without_credentials(client):
    assert _setup(client).status_code == 200
    assert _setup(client, project="8.1").status_code == 200


# ---------------------------------------------------------------------- /webhook
def test_webhook_with_redis_down_is_503_fast(client):
    t0 = time.perf_counter()
    r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 7}, "annotation": {"id": 1}})
    assert time.perf_counter() - t0 < 1.0  # Label Studio waits 1 s for a webhook
    assert r.status_code == 503
    assert "Redis" in r.get_json()["reason"] and r.get_json()["status"] == "error"


def test_webhook_bad_json_is_400(client):
    r = client.post("/webhook", data="{", content_type="application/json")
    assert r.status_code == 400 and "malformed JSON" in r.get_json()["reason"]


def test_webhook_with_real_redis(make_client, redis_url):
    client = make_client(redis_url=redis_url, train_batch_size=2)
    ignored = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 7}})
    assert ignored.status_code == 200 and ignored.get_json()["status"] == "ignored"
    counted = client.post(
        "/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 7}, "annotation": {"id": 1}}
    )
    assert counted.status_code == 200 and counted.get_json()["status"] == "counted"
    queued = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    assert queued.status_code == 202 and queued.get_json()["status"] in ("queued", "coalesced")


# ---------------------------------------------------------------------- other routes
def test_versions_route(client, publish):
    assert client.get("/versions").get_json()["versions"] == []
    v1, v2 = publish(7), publish(7)
    body = client.get("/versions?project=7.123").get_json()
    assert body == {"versions": [v1, v2], "current": v2}


def test_unknown_route_and_wrong_method_are_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.get_json()["status"] == "error"
    r = client.get("/predict")
    assert r.status_code == 405 and r.get_json()["status"] == "error"
