"""/predict with an overlay config (issue 12): the mask, the uncertainty layer and, on tiles larger than
SUGGEST_MIN_TILE, the suggested region, all valid for Label Studio; an overlay that would be rejected is dropped and
the mask still sent; the re-scoring job's builder (loop.score_tiles) gives the same layers."""

from __future__ import annotations

import numpy as np
from label_studio_sdk.label_interface import LabelInterface
from server_helpers import DENSE_XML, REPO, task

PROJECT = "7.1700000000"
UNCERTAIN_XML = (REPO / "label_config" / "dense_uncertainty.xml").read_text()
SPARSE_UNCERTAIN_XML = (REPO / "label_config" / "sparse_uncertainty.xml").read_text()


def _predict(client, xml, names=("t0.png", "t1.png")):
    tasks = [task(i + 1, n) for i, n in enumerate(names)]
    r = client.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": xml})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def test_predictions_carry_uncertainty_and_suggestion(make_client, publish):
    client = make_client(uncertainty_thresholds="0.2", suggest_min_tile=48, suggest_window=32, suggest_stride=8)
    publish(7)
    body = _predict(client, UNCERTAIN_XML)
    assert body["errors"] == []
    for pred in body["results"]:
        names = [r["from_name"] for r in pred["result"]]
        assert names[0] == "tag" and names.count("uncertainty") == 1 and names.count("suggestion") == 1, names
        assert LabelInterface(UNCERTAIN_XML).validate_prediction(pred, return_errors=True) == []
        (rect,) = [r for r in pred["result"] if r["from_name"] == "suggestion"]
        assert rect["value"]["width"] == rect["value"]["height"] == 50.0  # a 32-pixel window on a 64-pixel tile
        (layer,) = [r for r in pred["result"] if r["from_name"] == "uncertainty"]
        assert layer["readonly"] is True and layer["value"]["brushlabels"] == ["Uncertain"]


def test_small_tiles_get_no_rectangle_and_plain_configs_no_overlay(make_client, publish):
    client = make_client(uncertainty_thresholds="0.2")  # SUGGEST_MIN_TILE 384 > 64
    publish(7)
    names = [r["from_name"] for r in _predict(client, UNCERTAIN_XML)["results"][0]["result"]]
    assert "suggestion" not in names and "uncertainty" in names
    plain = _predict(client, DENSE_XML)["results"][0]["result"]
    assert {r["from_name"] for r in plain} == {"tag"}


def test_an_overlay_label_studio_would_reject_is_dropped_not_sent(make_client, publish):
    # two uncertainty levels but the config's "uncertainty" control has one label: the layer cannot be built
    client = make_client(uncertainty_thresholds="0.2,0.6", suggest_min_tile=48, suggest_window=32)
    publish(7)
    body = _predict(client, UNCERTAIN_XML)
    assert body["errors"] == []
    for pred in body["results"]:
        assert {r["from_name"] for r in pred["result"]} == {"tag"}  # the mask alone, still sent
        assert LabelInterface(UNCERTAIN_XML).validate_prediction(pred, return_errors=True) == []


def test_the_rescoring_job_builds_the_same_layers(trained_model, em_tiles):
    from ml_backend.config import Settings
    from ml_backend.labelstudio.labelconfig import parse_label_config
    from ml_backend.labelstudio.loop import score_tiles
    from ml_backend.strategies import get_strategy

    settings = Settings.from_env(device="cpu", uncertainty_thresholds="0.2", suggest_min_tile=48, suggest_window=32)
    config = parse_label_config(SPARSE_UNCERTAIN_XML)
    images = [im.astype(np.float32) / 255.0 for im in em_tiles[0][:2]]
    _summary, results, _pixels = score_tiles(trained_model, images, get_strategy("entropy"), config, settings)
    for result in results:
        assert sorted({r["from_name"] for r in result}) == ["suggestion", "tag", "uncertainty"]
        assert LabelInterface(SPARSE_UNCERTAIN_XML).validate_prediction({"result": result}, return_errors=True) == []
