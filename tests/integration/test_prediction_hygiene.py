"""Prediction hygiene against the real Label Studio 1.23.2: the job's sink (``LabelStudioSink``) delivers a version's
predictions, then deletes the older versions' ones by id, keeping KEEP_PREDICTION_VERSIONS versions; a delivery that
fails deletes nothing; a task the round did not score, a labelled task and a task created after the job's listing
keep their older prediction (issue 16: a whole-version delete took a new task's only prediction)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from ml_backend.active_learning.round import ScoredPool
from ml_backend.active_learning.selection import Ranking
from ml_backend.config import Settings
from ml_backend.inference.scoring import PoolScores
from ml_backend.labelstudio.client import LabelStudioError, as_dict, list_tasks, push_predictions
from ml_backend.labelstudio.hygiene import prune_predictions
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.loop import LabelStudioSink
from ml_backend.labelstudio.project_data import LabelStudioProject
from ml_backend.labelstudio.rle import mask_to_results

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

XML = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Mitochondria" background="#FF4D4D"/></BrushLabels>
</View>"""
N_TASKS = 8


def _project(ls, n: int = N_TASKS) -> tuple[int, list[int]]:
    project = as_dict(ls.projects.create(title=f"hygiene {uuid.uuid4().hex[:6]}", label_config=XML))
    pid = int(project["id"])
    out = as_dict(ls.projects.import_tasks(id=pid, request=[{"image": f"/data/upload/t{i}.png"} for i in range(n)],
                                           return_task_ids=True))  # fmt: skip
    return pid, sorted(int(t) for t in out["task_ids"])


def _project_data(ls, pid: int, listing: dict[int, dict]) -> LabelStudioProject:
    """The project as the job reads it (``ProjectData``), with the listing the job holds."""
    return LabelStudioProject(pid, Settings.from_env(), ls, listed=listing, config=parse_label_config(XML),
                              label_xml=XML)  # fmt: skip


def _deliver(ls, pid: int, version: str, ids: list[int], *, keep: int) -> LabelStudioSink:
    """One round's delivery through the product's sink: a small mask and a score per task of ``ids``."""
    config = parse_label_config(XML)
    tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
    mask = np.zeros((16, 16), dtype=np.int64)
    mask[4:9, 3:12] = 1
    results = [mask_to_results(mask, config) for _ in ids]
    scored = ScoredPool(list(ids), PoolScores({}, np.full(len(ids), 256)), results)
    ranking = Ranking(list(ids), list(ids), np.linspace(0.1, 0.9, len(ids)))
    sink = LabelStudioSink(_project_data(ls, pid, tasks), keep_prediction_versions=keep)
    assert sink.put(version, scored, ranking) == len(ids)
    return sink


def _versions(ls, pid: int) -> dict[int, list[str]]:
    return {int(t["id"]): sorted(str(p["model_version"]) for p in t.get("predictions") or [])
            for t in list_tasks(ls, pid)}  # fmt: skip


def test_only_the_live_version_remains_after_two_rounds(ls):
    pid, ids = _project(ls)
    _deliver(ls, pid, "v1", ids, keep=1)
    assert all(v == ["v1"] for v in _versions(ls, pid).values())
    labelled = ids[0]  # labelled between the rounds: the next round does not predict it
    ls.annotations.create(id=labelled, result=[])
    sink = _deliver(ls, pid, "v2", ids[1:], keep=1)
    after = _versions(ls, pid)
    assert {tid: after[tid] for tid in ids[1:]} == {tid: ["v2"] for tid in ids[1:]}
    assert after[labelled] == ["v1"]  # no newer prediction on it: a labelled task keeps its last one
    assert sink.last_prune.deleted_by_version == {"v1": len(ids) - 1} and sink.last_prune.left == 1
    assert len(ls.annotations.list(id=labelled)) == 1  # its annotation is untouched
    assert as_dict(ls.projects.get(id=pid))["model_version"] == "v2"


def test_keep_two_versions_keeps_the_previous_one(ls):
    pid, ids = _project(ls)
    for version in ("v1", "v2", "v3"):
        _deliver(ls, pid, version, ids, keep=2)
    assert all(v == ["v2", "v3"] for v in _versions(ls, pid).values())


def test_keep_zero_keeps_every_version(ls):
    pid, ids = _project(ls, 3)
    for version in ("v1", "v2", "v3"):
        _deliver(ls, pid, version, ids, keep=0)
    assert all(v == ["v1", "v2", "v3"] for v in _versions(ls, pid).values())


def test_a_task_the_round_did_not_score_keeps_its_older_prediction(ls):
    pid, ids = _project(ls)
    _deliver(ls, pid, "v1", ids, keep=1)
    missed = ids[-1]  # e.g. its image could not be read this round
    sink = _deliver(ls, pid, "v2", ids[:-1], keep=1)
    after = _versions(ls, pid)
    assert after[missed] == ["v1"]
    assert all(after[tid] == ["v2"] for tid in ids[:-1])
    assert sink.last_prune.deleted_by_version == {"v1": len(ids) - 1}


def test_a_failed_delivery_deletes_nothing(ls):
    pid, ids = _project(ls)
    _deliver(ls, pid, "v1", ids, keep=1)
    with pytest.raises(LabelStudioError):
        _deliver(ls, pid, "v2", ids + [10**9], keep=1)  # Label Studio rejects the batch: an unknown task
    after = _versions(ls, pid)
    assert all("v1" in after[tid] for tid in ids)
    assert as_dict(ls.projects.get(id=pid))["model_version"] == "v1"


def test_a_task_created_after_the_listing_keeps_its_only_prediction(ls):
    """The finding: the job lists the tasks, then one listed old prediction goes away and a new task arrives with a
    prediction of the old version (``/predict`` still served it), so the old version's count equals the listing
    again; the new version does not reach the new task. Deleting by version took its only prediction; by id it
    stays."""
    pid, ids = _project(ls)
    _deliver(ls, pid, "v1", ids, keep=1)
    config = parse_label_config(XML)
    listing = {int(t["id"]): t for t in list_tasks(ls, pid)}  # the job's listing, before the delivery of v2
    (removed,) = [int(p["id"]) for p in listing[ids[-1]]["predictions"]]
    ls.predictions.delete(id=removed)  # e.g. deleted in the Data Manager meanwhile
    (late,) = as_dict(ls.projects.import_tasks(id=pid, request=[{"image": "/data/upload/late.png"}],
                                               return_task_ids=True))["task_ids"]  # fmt: skip
    mask = np.zeros((16, 16), dtype=np.int64)
    mask[2:6, 2:6] = 1
    push_predictions(ls, pid, [{"task": int(late), "result": mask_to_results(mask, config), "score": 0.5,
                                "model_version": "v1"}])  # fmt: skip
    results = [mask_to_results(mask, config) for _ in ids]
    scored = ScoredPool(ids, PoolScores({}, np.full(len(ids), 256)), results)
    sink = LabelStudioSink(_project_data(ls, pid, listing), keep_prediction_versions=1)  # the job holds the old listing
    assert sink.put("v2", scored, Ranking(ids, ids, np.linspace(0.1, 0.9, len(ids)))) == len(ids)
    after = _versions(ls, pid)
    assert after[int(late)] == ["v1"]  # its only prediction is kept
    assert {tid: after[tid] for tid in ids} == {tid: ["v2"] for tid in ids}  # the old ones went, by id
    assert sink.last_prune.deleted_by_version == {"v1": len(ids) - 1} and sink.last_prune.left == 1


def test_deletions_over_the_rounds_budget_wait_for_the_next_round(ls):
    pid, ids = _project(ls)
    _deliver(ls, pid, "v1", ids, keep=0)
    listing = {int(t["id"]): t for t in list_tasks(ls, pid)}
    _deliver(ls, pid, "v2", ids, keep=0)
    report = prune_predictions(ls, pid, "v2", listing, ids, keep=1, max_deletes=3, workers=2)
    assert report.deleted == 3 and report.deferred == len(ids) - 3 and report.left == len(ids) - 3
    after = _versions(ls, pid)
    assert sum(v == ["v2"] for v in after.values()) == 3 and all("v2" in v for v in after.values())
    _deliver(ls, pid, "v3", ids, keep=1)  # the next round's listing finds the rest again
    assert all(v == ["v3"] for v in _versions(ls, pid).values())
