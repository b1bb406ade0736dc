"""The active-learning loop end to end: real Label Studio 1.23.2, real Redis, the backend under gunicorn and a real
`rq worker` process.

Generated EM-like tiles are imported and the project is set up with D's scripts; a batch of annotations is created
through the SDK (masks from the generated ground truth). Label Studio posts ANNOTATION_CREATED webhooks to the
backend, the batch-completing one enqueues `train_project`, and the worker trains, publishes a version, re-scores
the unlabelled tasks and pushes predictions. Then "Start training" (START_TRAINING) forces one more version.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import tifffile
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from waiting import wait_until

from ml_backend.config import Settings
from ml_backend.labelstudio.client import as_dict, latest_annotations, list_tasks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
TILE = 64
BATCH = 4


@pytest.fixture(scope="module")
def em_stack(tmp_path_factory):
    """A 4 x 128 x 128 EM-like TIFF stack (16 tiles of 64 x 64) and its ground truth per tile."""
    from ml_backend.data.synthetic import generate_em_like

    base = tmp_path_factory.mktemp("retrain-em")
    stack, masks = generate_em_like(4, 128, seed=31)
    tifffile.imwrite(base / "stack.tif", stack, photometric="minisblack")  # 4 pages, not one RGBA image
    truth = {}
    for z in range(4):
        for y in (0, 64):
            for x in (0, 64):
                truth[(z, y, x)] = masks[z, y : y + TILE, x : x + TILE].astype(np.int64)
    return base / "stack.tif", truth


def _view_order(ls, project_id: int, view_id: int) -> list[int]:
    return [int(as_dict(t)["id"]) for t in ls.tasks.list(project=project_id, view=view_id, fields="task_only")]


def _predictions(task: dict, version: str) -> list[dict]:
    return [p for p in task.get("predictions") or [] if p.get("model_version") == version]


def test_webhook_batch_trains_publishes_and_reorders_the_queue(
    label_studio, ls, start_backend, scripts, em_stack, redis_url, tmp_path, start_rq_worker, worker_env
):
    from ml_backend.labelstudio.labelconfig import parse_label_config
    from ml_backend.labelstudio.rle import mask_to_results
    from ml_backend.store.registry import ModelRegistry

    stack, truth = em_stack
    model_dir = tmp_path / "models"
    train_env = {
        "REDIS_URL": redis_url,
        "TRAIN_BATCH_SIZE": str(BATCH),
        "TRAIN_STEPS": "30",
        "TRAIN_CROP": "64",
        "MODEL_WIDTH": "8",
        "MODEL_DEPTH": "3",
        "RESCORE_CHUNK": "5",
        "STRATEGY": "entropy",
        "AUDIT_FRACTION": "0",  # every annotation is a training tile here (audit split: test_stack_aware_e2e)
    }
    backend = start_backend(model_dir, **train_env)
    env = worker_env(model_dir, **train_env)
    worker = start_rq_worker(env, "e2e")  # the documented `python -m ml_backend.cli worker`

    def logs() -> str:
        return (
            f"--- worker log\n{worker.log_path.read_text(errors='replace')[-6000:]}\n"
            f"--- backend log\n{backend.log_tail(3000)}"
        )

    try:
        setup = scripts("setup_project")
        importer = scripts("import_tiles")
        dense = (REPO / "label_config" / "dense.xml").read_text()
        config = parse_label_config(dense)
        info = setup.setup_project(ls, title=f"e2e retrain {uuid.uuid4().hex[:6]}", label_config=dense,
                                   backend_url=backend.url)  # fmt: skip
        pid, view = info["project"], info["view"]
        imported = importer.import_tiles(
            ls, pid, [stack], document_root=label_studio.document_root, tile=TILE, progress=False
        )
        assert imported["created"] == 16
        # cold start: the backend scores every task for coverage; this is the queue before any training
        title = as_dict(ls.projects.get(id=pid))["title"]
        cold = setup.setup_project(ls, title=title, label_config=dense, backend_url=backend.url)  # retrieves scores
        assert cold["project"] == pid and cold["model_version"]
        order_before = _view_order(ls, pid, view)
        assert sorted(order_before) == sorted(imported["task_ids"])

        # --- annotators submit a batch through the SDK; Label Studio posts the webhooks to the backend
        registry = ModelRegistry(model_dir, pid)
        tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
        batch = order_before[:BATCH]  # the first tasks the queue serves
        for tid in batch:
            data = tasks[tid]["data"]
            gt = truth[(data["slice"], data["tile_y"], data["tile_x"])]
            ls.annotations.create(id=tid, result=mask_to_results(gt, config))
            if tid != batch[-1]:
                assert registry.current_version() is None  # no training before the batch is complete

        version = wait_until(registry.current_version, 600, "a new model version", logs=logs)
        project_version = wait_until(
            lambda: (v := as_dict(ls.projects.get(id=pid)).get("model_version")) == version and v,
            300, "the project's model_version to be set", logs=logs,
        )  # fmt: skip
        assert project_version == version

        meta = registry.current_meta()
        assert meta["n_annotations"] == BATCH and sorted(meta["task_ids"]) == sorted(batch)
        assert meta["parent"] is None and meta["initialised"] == "from scratch"
        assert meta["metrics"]["val_iou"] is not None and meta["strategy"]["name"] == "entropy"
        assert meta["metrics"]["bn_calibration_images"] == 16  # BatchNorm re-estimated on a crop of every task
        assert "new annotations" in meta["trigger"]

        # the job ran on the rq worker, JSON arguments, progress in its meta
        conn = redis.Redis.from_url(redis_url)
        job = Job.fetch(meta["job"], connection=conn, serializer=JSONSerializer)
        # the job sets the project's model_version in its last phase; it is marked finished a moment later
        wait_until(lambda: job.get_status(refresh=True) == "finished", 120, "the training job to finish", logs=logs)
        job.refresh()  # the meta as the finished job left it (fetched above while the job was still running)
        assert job.kwargs["project_id"] == pid and job.kwargs["force"] is False
        first_steps = round(30 * Settings().initial_train_factor)  # a first version: TRAIN_STEPS x INITIAL_TRAIN_FACTOR
        assert job.meta["phase"] == "upload" and job.meta["train"]["steps"] == first_steps  # the train phase's last
        assert job.meta["train"]["eta_s"] == 0 and job.meta["progress"] == {}  # the upload phase's own: none
        assert {"read_s", "train_s", "score_s", "upload_s"} <= set(job.meta["timings"])
        assert job.return_value()["status"] == "trained" and job.return_value()["predictions"] == 16 - BATCH
        worker_output = worker.log_path.read_text(errors="replace")  # progress is in the worker's log too
        assert (
            f"project {pid}: step {first_steps}/{first_steps} loss" in worker_output
            and f"project {pid}: promoted {version}" in worker_output
        )

        # every unlabelled task holds a prediction of the new version: a brush mask of the tile and a score
        tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
        unlabelled = [tid for tid in tasks if tid not in batch]
        scores = {}
        for tid in unlabelled:
            preds = _predictions(tasks[tid], version)
            assert len(preds) == 1, f"task {tid}: {len(preds)} predictions of {version}"
            pred = preds[0]
            assert 0.0 <= pred["score"] <= 1.0
            for region in pred["result"]:
                assert region["value"]["brushlabels"] == ["Mitochondria"]
                assert (region["original_width"], region["original_height"]) == (TILE, TILE)
            scores[tid] = pred["score"]
            assert tasks[tid]["predictions_score"] == pytest.approx(pred["score"])  # used by Label Studio
        assert len(set(scores.values())) > 1

        # the queue is re-ordered by the new scores (lowest first) and differs from the cold-start order
        order_after = [tid for tid in _view_order(ls, pid, view) if tid in scores]
        assert sorted(order_after) == sorted(scores)
        assert [scores[t] for t in order_after] == sorted(scores.values())
        assert order_after != [tid for tid in order_before if tid in scores]
        # annotators label from the queue view (sequential sampling over it: see labelstudio/setup.SHARED_QUEUE)
        nxt = httpx.get(f"{label_studio.url}/api/projects/{pid}/next", params={"view": view},
                        headers={"Authorization": f"Token {label_studio.api_key}"}, timeout=30)  # fmt: skip
        nxt.raise_for_status()
        assert scores[int(nxt.json()["id"])] == min(scores.values())

        # --- "Start training": always trains (here with nothing new), fine-tuning the current version
        backends = [as_dict(b) for b in ls.ml.list(project=pid)]
        assert len(backends) == 1
        ls.ml.train(id=backends[0]["id"])
        second = wait_until(
            lambda: (v := registry.current_version()) != version and v, 600, "START_TRAINING's version",
            logs=logs,
        )  # fmt: skip
        meta2 = registry.meta(second)
        assert meta2["parent"] == version and meta2["initialised"] == "fine-tuned"
        assert meta2["trigger"] == "START_TRAINING"
        wait_until(lambda: as_dict(ls.projects.get(id=pid)).get("model_version") == second, 300, "model_version update",
              logs=logs)  # fmt: skip
        assert len(latest_annotations(list_tasks(ls, pid))) == BATCH

        # nothing is left queued or locked, and the operator CLI sees both versions
        queue = Queue("ml-backend", connection=conn, serializer=JSONSerializer)
        assert [j for j in queue.get_job_ids() if j.startswith(f"train-p{pid}-")] == []
        status = subprocess.run(
            [sys.executable, "-m", "ml_backend.cli", "status", "--project", str(pid), "--plot",
             str(tmp_path / "curve.png")],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert f"current version : {second}" in status.stdout and (tmp_path / "curve.png").is_file()
        assert worker.process.poll() is None, logs()
    finally:
        worker.stop()
