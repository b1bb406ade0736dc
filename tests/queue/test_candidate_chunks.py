"""The candidate sample through the product's pieces (issue 20.2): chunked scoring of the sample with a real Redis and
two real ``rq worker`` processes assembles every sampled task exactly once (duplicate helper jobs included), and in a
real Label Studio 1.23.2 the tasks outside the sample keep their prediction while the queue serves the sample first.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from fakes import train_round
from PIL import Image
from rq import Worker
from rq.job import Job
from rq.serializers import JSONSerializer
from waiting import wait_until

from ml_backend.active_learning import QueueOrder, RoundPlan, ScoredPool, run_round
from ml_backend.active_learning.candidates import CandidateSampler, PredictionAgeLog, prediction_age
from ml_backend.active_learning.round import LabelledSet, LabelledTile
from ml_backend.active_learning.selection import Ranking
from ml_backend.config import Settings
from ml_backend.data.synthetic import generate_em_like
from ml_backend.inference.scoring import PoolScores, ScoringConfig
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.loop import AnnotatedTasks
from ml_backend.labelstudio.project_data import ChunkInputs
from ml_backend.queue import keys
from ml_backend.queue.connection import get_queue
from ml_backend.queue.keys import chunk_id
from ml_backend.queue.rescoring import RESCORE_FUNC, RedisPoolScorer, RescoreJob, collect_rescore, start_rescore
from ml_backend.store.registry import ModelRegistry
from ml_backend.strategies import get_strategy
from ml_backend.training.recipe import ModelState

REPO = Path(__file__).resolve().parents[2]
XML = (REPO / "label_config" / "dense.xml").read_text()
PID = 31


def _settings(tmp_path: Path, redis_url: str, **kw) -> Settings:
    values = {
        "model_dir": tmp_path / "models", "redis_url": redis_url, "local_files_root": str(tmp_path / "root"),
        "label_studio_url": "http://127.0.0.1:9", "model_width": 4, "model_depth": 2, "train_steps": 2,
        "train_crop": 32, "val_fraction": 0.0, "device": "cpu", "rescore_chunk": 3, "inference_batch": 4,
        "bn_calibration_tiles": 0, "batch_diversity": False, "audit_fraction": 0.0,
    }  # fmt: skip
    values.update(kw)
    return Settings.from_env(**values)


def _tasks(root: Path, n: int, config) -> tuple[dict[int, dict], np.ndarray, np.ndarray]:
    raw, gt = generate_em_like(n, size=32, seed=4)
    (root / "tiles").mkdir(parents=True)
    tasks = {}
    for i in range(n):
        Image.fromarray(raw[i]).save(root / "tiles" / f"t{i:03d}.png")
        tasks[100 + i] = {"id": 100 + i, "data": {config.image_key: f"/data/local-files/?d=tiles/t{i:03d}.png"}}
    return tasks, raw, gt


class _Registered:
    """The round's publisher: the version is already in the registry (helpers load it from there)."""

    def __init__(self, version: str) -> None:
        self.version = version

    def publish(self, trained, labelled, evaluation) -> str:
        return self.version


class _DuplicatingScorer(RedisPoolScorer):
    """The product's scorer, plus a second helper job for every chunk (a re-delivered or re-queued job): the chunk
    claim must keep each chunk scored once. The helpers get a head start (``wait_helpers``) so that both workers, not
    only the coordinator, take chunks."""

    duplicates: list[str] = []

    def score(self, trained, version, strategy, ids, seed) -> ScoredPool:
        rnd = start_rescore(RescoreJob(self.pid, version, self.label_xml, self.inputs, self.settings, self.conn),
                            strategy, ids, n_ensemble=len(trained.ensemble), helpers=True)  # fmt: skip
        queue = get_queue(self.settings, self.conn)
        for chunk in rnd.chunks[1:]:
            job = queue.enqueue_call(RESCORE_FUNC, kwargs={"project_id": self.pid, "version": version,
                                     "task_ids": chunk}, job_id=f"dup-{uuid.uuid4().hex[:8]}", timeout=600)  # fmt: skip
            self.duplicates.append(job.id)
        jobs = rnd.helper_jobs + self.duplicates
        done = lambda: sum(_job(self.conn, j).get_status() in ("finished", "failed") for j in jobs)  # noqa: E731
        wait_until(lambda: done() >= len(jobs) // 2, timeout=240, what="half of the helper jobs to run")
        self.last = rnd
        return collect_rescore(rnd, trained.model, self.inputs, self.settings, self.conn, ensemble=trained.ensemble)


def _job(conn, job_id: str) -> Job:
    return Job.fetch(job_id, connection=conn, serializer=JSONSerializer)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_sample_is_scored_in_chunks_by_two_workers_exactly_once(tmp_path, redis_url, start_rq_worker):
    config = parse_label_config(XML)
    settings = _settings(tmp_path, redis_url)
    tasks, raw, gt = _tasks(tmp_path / "root", 60, config)
    labelled_ids = sorted(tasks)[:4]
    tiles = [LabelledTile(t, None, raw[t - 100].astype(np.float32) / 255, gt[t - 100].astype(np.int64))
             for t in labelled_ids]  # fmt: skip
    torch.manual_seed(0)
    out = train_round(ModelRegistry(settings.model_dir, PID), tiles, config, settings)
    env = {
        **os.environ, "REDIS_URL": redis_url, "MODEL_DIR": str(settings.model_dir), "DEVICE": "cpu",
        "INFERENCE_BATCH": "4", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": settings.local_files_root,
        "LABEL_STUDIO_URL": settings.label_studio_url, "BATCH_DIVERSITY": "false",
        "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    for i in range(2):
        start_rq_worker(env, prefix=f"cand{i}")
    conn = redis.Redis.from_url(redis_url)
    wait_until(lambda: len(Worker.all(connection=conn)) == 2, timeout=120, what="two rq workers")

    pool = [t for t in sorted(tasks) if t not in labelled_ids]
    previous = (pool[-1], pool[-2], labelled_ids[0])  # the last ranking's best; one of them labelled since
    sampler = CandidateSampler(24, 4, seed=7, previous_best=previous)
    plan = RoundPlan(get_strategy("entropy"), ModelState(out.model, out.version, "kept"), candidates=sampler,
                     scoring=ScoringConfig.from_settings(settings))  # fmt: skip
    scorer = _DuplicatingScorer(PID, XML, ChunkInputs(config, settings, tasks), settings, conn)
    outcome = run_round(plan, AnnotatedTasks(LabelledSet(tiles), pool), publisher=_Registered(out.version),
                        scorer=scorer, select=QueueOrder(config.num_classes))  # fmt: skip

    sample = sampler(pool, out.version)
    assert len(sample) == 24 and {pool[-1], pool[-2]} <= set(sample) and labelled_ids[0] not in sample
    rnd = scorer.last
    assert sorted(t for c in rnd.chunks for t in c) == sample and len(rnd.chunks) == 8  # chunks of the sample only
    # Assembled exactly once: every sampled task once, in chunk order, each chunk by one owner.
    assert outcome.scored.ids == [t for c in rnd.chunks for t in c] and outcome.pool_size == len(pool)
    assert sorted(outcome.ranking.picked) == sample
    assert set(rnd.owners) == {chunk_id(c) for c in rnd.chunks} and all(rnd.owners.values())
    jobs = rnd.helper_jobs + scorer.duplicates
    wait_until(lambda: all(_job(conn, j).get_status() in ("finished", "failed") for j in jobs), timeout=240,
               what="every helper job (the late duplicates find the round over)")  # fmt: skip
    helpers = [_job(conn, j) for j in jobs]
    statuses = [(j.return_value() or {}).get("status") for j in helpers]
    assert all(j.get_status() == "finished" for j in helpers), [j.exc_info for j in helpers]
    scored_by_helpers = [j for j, s in zip(helpers, statuses, strict=True) if s == "scored"]
    assert len(scored_by_helpers) + rnd.scored_here == len(rnd.chunks)  # no chunk computed twice
    assert set(statuses) <= {"scored", "taken", "expired"}
    assert {rnd.owners[j.return_value()["chunk"]]: j.id for j in scored_by_helpers} == {  # the scorer is the owner
        j.id: j.id for j in scored_by_helpers
    }
    assert len({j.worker_name for j in scored_by_helpers}) == 2  # both workers scored chunks of the sample
    # The same numbers as scoring the sample in one process: results land on the right tasks.
    local = RedisPoolScorer(PID, XML, ChunkInputs(config, settings, tasks), settings, conn, helpers=False)
    alone = local.score(out, out.version + "-local", plan.strategy, sample, 0)
    by_id = dict(zip(alone.ids, alone.scores.summary["value"], strict=True))
    shared = dict(zip(outcome.scored.ids, outcome.scored.scores.summary["value"], strict=True))
    assert sorted(shared) == sorted(by_id) and all(shared[t] == pytest.approx(by_id[t], rel=1e-4) for t in shared)
    assert conn.keys(keys.rescore_pattern(PID)) == []


# ------------------------------------------------------------------------------------------- real Label Studio


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_tasks_outside_the_sample_keep_their_prediction_and_queue_after_it(ls, tmp_path):
    from ml_backend.labelstudio.client import _api, as_dict, ensure_view, list_tasks, paged
    from ml_backend.labelstudio.loop import LabelStudioSink
    from ml_backend.labelstudio.project_data import LabelStudioProject
    from ml_backend.labelstudio.rle import mask_to_results
    from ml_backend.labelstudio.setup import QUEUE_ORDERING, SAMPLING

    config = parse_label_config(XML)
    project = as_dict(ls.projects.create(title=f"candidates {uuid.uuid4().hex[:6]}", label_config=XML,
                                         sampling=SAMPLING))  # fmt: skip
    pid = int(project["id"])
    created = as_dict(ls.projects.import_tasks(id=pid, request=[{"image": f"/data/upload/c{i}.png"} for i in range(12)],
                                               return_task_ids=True))  # fmt: skip
    ids = sorted(int(t) for t in created["task_ids"])
    mask = np.zeros((16, 16), dtype=np.int64)
    mask[3:9, 2:12] = 1
    log = PredictionAgeLog(tmp_path, pid)

    def deliver(version: str, scored_ids: list[int]) -> dict[int, dict]:
        listing = {int(t["id"]): t for t in list_tasks(ls, pid)}
        scored = ScoredPool(scored_ids, PoolScores({}, np.full(len(scored_ids), 256)),
                            [mask_to_results(mask, config) for _ in scored_ids])  # fmt: skip
        ranking = Ranking(scored_ids, scored_ids[::-1], np.linspace(0.9, 0.1, len(scored_ids)))  # last id first
        project = LabelStudioProject(pid, Settings.from_env(), ls, listed=listing, config=config, label_xml=XML)
        LabelStudioSink(project, keep_prediction_versions=1).put(version, scored, ranking)
        log.record(listing, [], version, scored_ids, pool=len(ids), candidate_pool=4)  # as the training job does
        return listing

    deliver("v1", ids)  # the first round: the whole (small) pool
    before = {int(t["id"]): [p["id"] for p in t["predictions"]] for t in list_tasks(ls, pid)}
    sample = CandidateSampler(4, 0, seed=0)(ids, "v2")
    listing = deliver("v2", sample)
    after = {int(t["id"]): t["predictions"] for t in list_tasks(ls, pid)}
    rest = [t for t in ids if t not in sample]
    for tid in rest:  # outside the sample: the same v1 prediction, untouched by hygiene
        assert [p["id"] for p in after[tid]] == before[tid] and after[tid][0]["model_version"] == "v1"
        assert after[tid][0]["result"][0]["value"]["rle"]
    for tid in sample:  # in the sample: only the new version's prediction
        assert [p["model_version"] for p in after[tid]] == ["v2"]
    assert as_dict(ls.projects.get(id=pid))["model_version"] == "v2"
    # The queue view (ascending predictions_score, the live version's only): the sample first, in its order.
    view = ensure_view(ls, pid, "Active learning queue", QUEUE_ORDERING)
    order = [int(as_dict(t)["id"]) for t in paged(ls, ls.tasks.list, project=pid, view=int(view["id"]),
                                                  fields="all", page_size=100, what="queue")]  # fmt: skip
    assert order[:4] == sample[::-1] and sorted(order[4:]) == rest  # the last sampled task holds the lowest score
    # /next under uncertainty sampling serves the lowest score among the live version's predictions.
    assert int(_api(ls, "GET", f"api/projects/{pid}/next")["id"]) == sample[-1]
    # The status page's summary: 4 tasks hold the live version's prediction, 8 the one delivered before it.
    assert log.read()["ages"] == prediction_age(listing, [], "v2", sample, ["v1", "v2"]) == {"0": 4, "1": 8}
    assert log.read()["history"] == ["v1", "v2"] and log.read()["scored"] == 4
