"""Prediction hygiene against the real Label Studio 1.23.2: the job's sink (``LabelStudioSink``) delivers a version's
predictions, then deletes the older versions' ones, keeping KEEP_PREDICTION_VERSIONS versions; a delivery that fails
deletes nothing; a task the round did not score keeps its older prediction."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from ml_backend.active_learning.round import ScoredPool
from ml_backend.active_learning.selection import Ranking
from ml_backend.inference.scoring import PoolScores
from ml_backend.labelstudio.client import LabelStudioError, as_dict, list_tasks
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.loop import LabelStudioSink
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


def _deliver(ls, pid: int, version: str, ids: list[int], *, keep: int) -> LabelStudioSink:
    """One round's delivery through the product's sink: a small mask and a score per task of ``ids``."""
    config = parse_label_config(XML)
    tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
    mask = np.zeros((16, 16), dtype=np.int64)
    mask[4:9, 3:12] = 1
    results = [mask_to_results(mask, config) for _ in ids]
    scored = ScoredPool(list(ids), PoolScores({}, np.full(len(ids), 256)), results)
    ranking = Ranking(list(ids), list(ids), np.linspace(0.1, 0.9, len(ids)))
    sink = LabelStudioSink(ls, pid, tasks, keep_prediction_versions=keep)
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
    assert after[labelled] == []  # a labelled task's old prediction goes too
    assert sink.last_prune.bulk == {"v1": len(ids)}  # one call for the whole version
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
    assert sink.last_prune.single == len(ids) - 1 and not sink.last_prune.bulk


def test_a_failed_delivery_deletes_nothing(ls):
    pid, ids = _project(ls)
    _deliver(ls, pid, "v1", ids, keep=1)
    with pytest.raises(LabelStudioError):
        _deliver(ls, pid, "v2", ids + [10**9], keep=1)  # Label Studio rejects the batch: an unknown task
    after = _versions(ls, pid)
    assert all("v1" in after[tid] for tid in ids)
    assert as_dict(ls.projects.get(id=pid))["model_version"] == "v1"
