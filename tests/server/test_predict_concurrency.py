"""Concurrent /predict calls on a really served app (werkzeug, one thread per request, as gunicorn's threads) give the
same masks and scores as serial ones: the shared model, the inference lock and the image cache are thread-safe."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from server_helpers import DENSE_XML, ImageHost, png_bytes, upload_task

PROJECT = "7.1700000000"


@pytest.fixture
def served(settings, publish, em_tiles):
    """(base URL of the served app, list of image names) with a trained model and images from a loopback host."""
    from werkzeug.serving import make_server

    from ml_backend.server.app import create_app

    publish(7)
    files = {f"/data/upload/1/t{i}.png": png_bytes(img) for i, img in enumerate(em_tiles[0])}
    with ImageHost(files) as host:
        app = create_app(settings.replace(label_studio_url=host.url))
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_port}", [f"t{i}.png" for i in range(len(em_tiles[0]))]
        finally:
            server.shutdown()
            server.server_close()


def _predict(base: str, tasks: list[dict]) -> dict:
    r = requests.post(
        f"{base}/predict", json={"tasks": tasks, "project": PROJECT, "label_config": DENSE_XML}, timeout=60
    )
    assert r.status_code == 200, r.text[:300]
    return r.json()


def _without_region_ids(results: list[dict]) -> list[dict]:
    """The results with each region's random ``id`` removed: masks (RLE), labels, scores and versions remain."""
    return [
        {**r, "result": [{k: v for k, v in region.items() if k != "id"} for region in r["result"]]} for r in results
    ]


def test_concurrent_predictions_equal_serial_ones(served):
    base, names = served
    # Requests of different sizes and orders, so that they interleave differently on the model.
    requests_ = [
        [upload_task(100 * k + j + 1, names[(j + k) % len(names)]) for j in range(1 + k % len(names))]
        for k in range(12)
    ]
    serial = [_predict(base, tasks) for tasks in requests_]
    for body in serial:
        assert body["errors"] == [] and all(r["result"] for r in body["results"])
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda tasks: _predict(base, tasks), requests_ * 2))
    for k, body in enumerate(concurrent):
        expected = serial[k % len(requests_)]
        assert body["errors"] == []
        assert _without_region_ids(body["results"]) == _without_region_ids(expected["results"])
