"""``ProjectData``: the one interface to a labelling project, and the product's own plug-ins run against it.

``RedisPoolScorer`` (chunks through a real Redis) scores a ``FakeProject``'s pool with the re-scoring loaders
passed in, and ``LabelStudioSink`` delivers to it: the code the training job runs, without Label Studio."""

from __future__ import annotations

import numpy as np
import pytest
import redis
import torch
from fakes import FakeChunkInputs, FakeProject

from ml_backend.active_learning import ScoredPool
from ml_backend.active_learning.project import ProjectData
from ml_backend.active_learning.selection import Ranking
from ml_backend.config import Settings
from ml_backend.inference.scoring import PoolScores
from ml_backend.labelstudio.errors import LabelStudioError
from ml_backend.labelstudio.loop import LabelStudioSink, score_tiles
from ml_backend.labelstudio.project_data import LabelStudioProject
from ml_backend.model import build_model
from ml_backend.queue import keys
from ml_backend.queue.rescoring import RedisPoolScorer
from ml_backend.strategies import get_strategy
from ml_backend.training.recipe import ModelState, TrainedModel

XML = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">
<Label value="Mitochondria"/></BrushLabels></View>"""


def _project(n: int = 10, size: int = 32) -> FakeProject:
    rng = np.random.default_rng(0)
    return FakeProject(7, XML, {100 + i: rng.random((size, size)).astype(np.float32) for i in range(n)})


def _settings(tmp_path, redis_url: str = "redis://127.0.0.1:1/0") -> Settings:
    return Settings.from_env(model_dir=tmp_path / "models", redis_url=redis_url, device="cpu", rescore_chunk=4,
                             inference_batch=4, batch_diversity=False)  # fmt: skip


def test_the_fake_and_the_label_studio_project_implement_the_protocol(tmp_path):
    assert isinstance(_project(), ProjectData)
    assert isinstance(LabelStudioProject(1, _settings(tmp_path), ls=object(), listed={}), ProjectData)


def test_the_fake_projects_model_input_stacks_its_neighbours():
    project = _project(3)
    task = {"id": 101, "data": {"neighbours": {"-1": 100}}}  # no +1 neighbour: the tile itself
    img = project.model_input(task, (-1, 0, 1))
    assert img.shape == (3, 32, 32)
    np.testing.assert_array_equal(img[0], project.images[100])
    np.testing.assert_array_equal(img[1], project.images[101])
    np.testing.assert_array_equal(img[2], project.images[101])
    np.testing.assert_array_equal(project.model_input(task), project.images[101])


def test_redis_pool_scorer_scores_the_pool_in_chunks_with_the_loaders_passed_in(tmp_path, redis_url):
    project = _project(10)
    settings = _settings(tmp_path, redis_url)
    config, xml = project.label_config()
    torch.manual_seed(0)
    model = build_model("unet", in_channels=1, width=4, depth=2).eval()
    conn = redis.Redis.from_url(redis_url)
    ids = sorted(project.images) + [999]  # task 999 has no image: left out, never fatal
    scorer = RedisPoolScorer(project.pid, xml, FakeChunkInputs(project, settings), settings, conn, helpers=False)
    trained = TrainedModel(ModelState(model, "v1", "kept"))
    strategy = get_strategy("entropy")
    scored = scorer.score(trained, "v1", strategy, ids, 0)

    assert scored.ids == sorted(project.images)  # chunk order = pool order; the imageless task dropped
    assert [len(c) for c in scorer.last.chunks] == [4, 4, 2]
    assert all(owner.startswith("coordinator") for owner in scorer.last.owners.values())  # no helper: all here
    assert len(scored.results) == 10 and all(isinstance(r, list) for r in scored.results)
    # the same numbers as scoring the images in one go: each chunk's results land on the right tasks
    summary, _results, _pixels = score_tiles(model, [project.images[t] for t in scored.ids], strategy, config,
                                             settings)  # fmt: skip
    np.testing.assert_allclose(scored.scores.summary["value"], summary["value"], rtol=1e-5)
    assert conn.keys(keys.rescore_pattern(project.pid)) == []  # the round cleans up after itself


def _pool(ids: list[int]) -> tuple[ScoredPool, Ranking]:
    results = [[{"type": "brushlabels", "value": {"rle": [1, 2, 3]}, "task": t}] for t in ids]
    scored = ScoredPool(list(ids), PoolScores({}, np.full(len(ids), 256)), results)
    return scored, Ranking(list(ids), list(ids), np.linspace(0.1, 0.9, len(ids)))


def test_label_studio_sink_delivers_sets_the_version_and_prunes(tmp_path):
    project = _project(6)
    ids = sorted(project.images)
    sink = LabelStudioSink(project, keep_prediction_versions=1, blank=frozenset({ids[0]}))
    assert sink.put("v1", *_pool(ids)) == 6
    assert project.model_version() == "v1" and project.counts() == {"v1": 6}
    first = {p["task"]: p for p in project.pushed}
    assert first[ids[0]]["result"] == [] and first[ids[1]]["result"]  # an audit task: a score, no mask
    assert [first[t]["score"] for t in ids] == pytest.approx(np.linspace(0.1, 0.9, 6).tolist())

    # the next version on half of the pool: their v1 predictions go, the others keep v1 (KEEP_PREDICTION_VERSIONS=1)
    part = ids[:3]
    sink = LabelStudioSink(project, keep_prediction_versions=1)
    assert sink.put("v2", *_pool(part)) == 3
    assert project.model_version() == "v2"
    held = {t: sorted(p["model_version"] for p in project.tasks()[t]["predictions"]) for t in ids}
    assert held == {**{t: ["v2"] for t in part}, **{t: ["v1"] for t in ids[3:]}}
    assert sink.last_prune.deleted_by_version == {"v1": 3}

    # a re-run of the same delivery never duplicates a prediction
    pushed = len(project.pushed)
    assert LabelStudioSink(project, keep_prediction_versions=1).put("v2", *_pool(part)) == 3
    assert len(project.pushed) == pushed


def test_label_studio_sink_with_nothing_to_predict_leaves_the_version(tmp_path):
    class Refusing(FakeProject):
        def set_model_version(self, version: str) -> None:
            raise LabelStudioError("HTTP 400: no prediction of this version")

    project = Refusing(7, XML, {1: np.zeros((8, 8), np.float32)})
    assert LabelStudioSink(project, keep_prediction_versions=1).put("v3", None, None) == 0
    assert project.model_version() is None and project.pushed == []


def test_the_cold_start_publishes_its_order_through_project_data():
    """``jobs.pretrain.publish_order``: the old cold-start predictions deleted in one call, the new order pushed as
    queue scores (lower = served first) and the project's model version set, all through ``ProjectData``."""
    from ml_backend.jobs.pretrain import COLD_START_VERSION, publish_order

    project = _project(5)
    ids = sorted(project.images)
    project.push_predictions([{"task": t, "result": [], "score": 0.5, "model_version": COLD_START_VERSION}
                              for t in ids])  # fmt: skip
    order = list(reversed(ids))
    reports: list[int] = []
    assert publish_order(project, order, report=reports.append) == {"queued": 5, "replaced": 5}
    assert project.model_version() == COLD_START_VERSION and project.counts() == {COLD_START_VERSION: 5}
    scores = {t: p["score"] for t in ids for p in project.tasks()[t]["predictions"]}
    assert sorted(ids, key=scores.__getitem__) == order and reports == [5]

    class Undeletable(FakeProject):
        def delete_version(self, version: str) -> int:
            raise LabelStudioError("HTTP 500")

    other = Undeletable(7, XML, {1: np.zeros((8, 8), np.float32)})
    assert publish_order(other, [1]) == {"queued": 1, "replaced": 0}  # older ones stay; the new order still serves
    assert other.model_version() == COLD_START_VERSION


def test_the_status_pages_counts_come_from_project_data():
    from ml_backend.server.status_page import label_studio_counts

    project = FakeProject(7, XML, {1: np.zeros((8, 8), np.float32), 2: np.zeros((8, 8), np.float32)},
                          annotations={1: {"id": 1, "result": []}}, title="cells")  # fmt: skip
    project.push_predictions([{"task": 2, "result": [], "score": 0.1, "model_version": "v0002"}])
    assert label_studio_counts(project, "v0002") == {"title": "cells", "total": 2, "labelled": 1, "unlabelled": 1,
                                                     "with_live_prediction": 1}  # fmt: skip
    assert label_studio_counts(project, None)["with_live_prediction"] == 0
    assert project.read_tasks([2, 99]) == {2: project.tasks()[2]}  # a task that is gone is absent
