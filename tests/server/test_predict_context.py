"""/predict with a 2.5D-context model (CONTEXT_OFFSETS=-1,0,1): neighbours from the tasks' image_prev/image_next
(what the importer writes), else the tile itself; a missing or broken neighbour never fails a task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from server_helpers import REPO

from ml_backend.model import build_model

PROJECT = "8.1700000000"
XML_25D = (REPO / "label_config" / "dense_25d.xml").read_text()


@pytest.fixture
def context_model():
    torch.manual_seed(0)
    return build_model("unet", in_channels=3, context_offsets=[-1, 0, 1], width=8, depth=2).eval()


def _task(tid: int, name: str, prev: str | None = None, nxt: str | None = None) -> dict:
    data = {"image": f"/data/local-files/?d={name}"}
    if prev is not None:
        data["image_prev"] = f"/data/local-files/?d={prev}"
    if nxt is not None:
        data["image_next"] = f"/data/local-files/?d={nxt}"
    return {"id": tid, "data": data}


def test_predict_with_context_offsets_returns_a_prediction_per_task(make_client, publish, context_model, monkeypatch):
    import ml_backend.labelstudio.neighbours as neighbours

    seen: list[tuple[int, ...]] = []
    stack = neighbours.stack_context_images

    def spy(centre, urls, offsets, fetch, **kw):
        out = stack(centre, urls, offsets, fetch, **kw)
        seen.append((out.shape, bool(np.array_equal(out[0], out[1])), bool(np.array_equal(out[2], out[1]))))
        return out

    monkeypatch.setattr(neighbours, "stack_context_images", spy)
    client = make_client(context_offsets="-1,0,1")
    publish(8, model=context_model)
    tasks = [
        _task(1, "t1.png", prev="t0.png", nxt="t2.png"),  # both neighbours
        _task(2, "t0.png", prev="t0.png", nxt="corrupt.png"),  # first slice; a neighbour that does not decode
        _task(3, "t3.png"),  # no neighbour keys: the tile itself
    ]
    r = client.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": XML_25D})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["errors"] == []
    assert len(body["results"]) == 3 and all(p["result"] for p in body["results"])  # a mask for every task
    assert all(p["model_version"] for p in body["results"])
    assert sorted(seen) == sorted(
        [((3, 64, 64), False, False), ((3, 64, 64), True, True), ((3, 64, 64), True, True)]
    ), seen  # task 1 reads its neighbours; task 2's are itself (first slice) and broken; task 3 has none
