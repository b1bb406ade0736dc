"""Issue 11 in the product, end to end: real Label Studio 1.23.2, real Redis, the backend under gunicorn, a real
``rq worker``, a generated ISOTROPIC 3D volume (``ml_backend.data.volume``: neighbouring slices are near-duplicates).

1. ``ml-backend import`` (``cli.importing.main``) tiles the volume into the project and queues the cold start;
   the worker pretrains the U-Net on the tiles and pushes the first queue: coverage-ordered, empty results (no masks
   from a model not trained on labels), no near-duplicates in the first batch, audit tasks at their rate.
2. The first batch is annotated from the ground truth; the webhook-triggered job trains from the PRETRAINED weights,
   keeps the audit annotations out of training, and pushes the second queue: its first batch holds no
   near-duplicates, neither among itself nor of the labelled tiles; audit tasks get no pre-annotation.
3. The second batch is annotated with deliberately WRONG masks (audit tasks correctly): the new version is trained
   and stored but not promoted (worse on the audit tiles); the live version keeps serving, and the job status and
   the version's metadata say why.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile
from serving_order import serving_order
from waiting import wait_until

from ml_backend.labelstudio.client import as_dict, list_tasks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
TILE = 64
BATCH = 8
Z_RADIUS = 3
AUDIT_FRACTION = 0.25  # one audit place in every 4: places 3 and 7 of each batch


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    from ml_backend.data.volume import generate_volume

    base = tmp_path_factory.mktemp("iso-volume")
    vol = generate_volume((10, 256, 256), setting="isotropic", seed=11, foreground=0.1)
    tifffile.imwrite(base / "volume.tif", vol.image, photometric="minisblack")
    return base / "volume.tif", vol.labels


def _near(a: dict, b: dict) -> bool:
    da, db = a["data"], b["data"]
    return (
        da["source"] == db["source"]
        and abs(da["slice"] - db["slice"]) <= Z_RADIUS
        and abs(da["tile_x"] - db["tile_x"]) < TILE
        and abs(da["tile_y"] - db["tile_y"]) < TILE
    )


def _check_batch(batch: list[int], tasks: dict[int, dict], audit: set[int], labelled: list[int]) -> None:
    """No near-duplicate pair in the batch (audit tasks are a random sample: two of them may be neighbours), and
    no selected task next to a labelled one."""
    for i, a in enumerate(batch):
        for b in batch[i + 1 :]:
            if a in audit and b in audit:
                continue
            assert not _near(tasks[a], tasks[b]), f"near-duplicates {a} and {b} in the batch {batch}"
        if a not in audit:
            for lab in labelled:
                assert not _near(tasks[a], tasks[lab]), f"task {a} is a neighbour of the labelled task {lab}"


def _truth(labels: np.ndarray, task: dict) -> np.ndarray:
    d = task["data"]
    return labels[d["slice"], d["tile_y"] : d["tile_y"] + TILE, d["tile_x"] : d["tile_x"] + TILE].astype(np.int64)


def test_cold_start_stack_aware_queues_and_audit_gate(label_studio, ls, start_backend, scripts, volume, redis_url,
                                                      tmp_path, start_rq_worker, worker_env, monkeypatch):  # fmt: skip
    import redis
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from ml_backend.active_learning.audit import audit_task_ids
    from ml_backend.labelstudio.labelconfig import parse_label_config
    from ml_backend.labelstudio.rle import mask_to_results
    from ml_backend.queue import keys
    from ml_backend.store.registry import ModelRegistry

    stack, labels = volume
    dense = (REPO / "label_config" / "dense.xml").read_text()
    config = parse_label_config(dense)
    model_dir = tmp_path / "models"
    env = {
        "REDIS_URL": redis_url, "TRAIN_BATCH_SIZE": str(BATCH), "TRAIN_STEPS": "300", "TRAIN_CROP": "64",
        "MODEL_WIDTH": "8", "MODEL_DEPTH": "3", "RESCORE_CHUNK": "40", "STRATEGY": "entropy",
        "INITIAL_LEARNING_RATE": "3e-3", "LEARNING_RATE": "5e-3", "DEVICE": "cpu",
        "BATCH_DIVERSITY": "true", "DIVERSITY_Z_RADIUS": str(Z_RADIUS), "AUDIT_FRACTION": str(AUDIT_FRACTION),
        "AUDIT_MIN_TILES": "3", "PROMOTION_TOLERANCE": "0.02",
        "PRETRAIN": "true", "PRETRAIN_STEPS": "30", "PRETRAIN_CROP": "64", "PRETRAIN_TIME_BUDGET_S": "120",
        # the pretrained cold start and entropy's stack-aware batches, not issue 17's hedged default
        "SELECTION_RANDOM_SHARE": "0", "UNCERTAINTY_FROM_LABELS": "0", "INITIAL_TRAIN_FACTOR": "1",
    }  # fmt: skip
    backend = start_backend(model_dir, **env)
    env_of_worker = worker_env(model_dir, **env)
    worker = start_rq_worker(env_of_worker, "stack")  # the documented `python -m ml_backend.cli worker`

    def logs() -> str:
        return (
            f"--- worker\n{worker.log_path.read_text(errors='replace')[-8000:]}\n--- backend\n{backend.log_tail(3000)}"
        )

    conn = redis.Redis.from_url(redis_url)
    try:
        setup = scripts("setup_project")
        info = setup.setup_project(ls, title=f"stack-aware {uuid.uuid4().hex[:6]}", label_config=dense,
                                   backend_url=backend.url, retrieve=False)  # fmt: skip
        pid = info["project"]
        registry = ModelRegistry(model_dir, pid)

        # --- 1. the import command tiles the volume and queues the cold start
        from ml_backend.cli import importing

        for name, value in env.items():
            monkeypatch.setenv(name, value)
        rc = importing.main([str(stack), "--project", str(pid), "--tile", str(TILE), "--quiet",
                             "--document-root", str(label_studio.document_root), "--url", label_studio.url,
                             "--token", label_studio.api_key])  # fmt: skip
        assert rc == 0
        tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
        assert len(tasks) == 10 * 16
        audit = set(audit_task_ids(sorted(tasks), AUDIT_FRACTION, 0))
        job = wait_until(lambda: Job.fetch(f"pretrain-{pid}", connection=conn, serializer=JSONSerializer), 30,
                    "the pretraining job")  # fmt: skip
        wait_until(lambda: job.get_status(refresh=True) in ("finished", "failed"), 600, "pretraining", logs=logs)
        job.refresh()
        summary = job.return_value()
        assert job.get_status() == "finished" and summary["status"] == "pretrained", logs()
        assert summary["queue"] == "coverage" and summary["steps"] == 30
        # every phase reported its own progress in the job's meta (issue 18) and ended
        assert [p["state"] for p in job.meta["phases"]] == ["done"] * 6, job.meta["phases"]
        assert {"read_s", "pretrain_s", "embed_s", "publish_s"} <= set(job.meta["timings"])
        assert (registry.root / "pretrain" / "pretrained.pt").is_file()
        assert (registry.root / "pretrain" / "checkpoint.pt").is_file()  # resumable
        assert registry.current_version() is None
        assert as_dict(ls.projects.get(id=pid))["model_version"] == "cold-start"

        tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
        first_queue = serving_order(tasks, "cold-start")
        assert sorted(first_queue) == sorted(tasks)
        for tid in first_queue:  # no masks before a model was trained on labels
            assert all(p["result"] == [] for p in tasks[tid]["predictions"])
        first = first_queue[:BATCH]
        assert first == summary["first"]  # Label Studio serves the job's coverage order
        assert [t in audit for t in first] == [(i + 1) % 4 == 0 for i in range(BATCH)]
        _check_batch(first, tasks, audit, [])

        # --- 2. annotate the first batch from the ground truth: the first version starts from the pretrained weights
        for tid in first:
            ls.annotations.create(id=tid, result=mask_to_results(_truth(labels, tasks[tid]), config))
        v1 = wait_until(registry.current_version, 900, "the first version", logs=logs)
        wait_until(lambda: as_dict(ls.projects.get(id=pid)).get("model_version") == v1, 300, "the second queue",
              logs=logs)  # fmt: skip
        meta1 = registry.current_meta()
        assert meta1["initialised"] == "pretrained"
        train_ids = [t for t in first if t not in audit]
        assert sorted(meta1["task_ids"]) == sorted(train_ids)  # audit annotations are kept out of training
        assert meta1["promotion"]["promoted"] and "not enough audit tiles" in meta1["promotion"]["reason"]
        assert meta1["audit"]["tiles"] == 2

        tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
        second_queue = serving_order(tasks, v1)
        second = second_queue[:BATCH]
        assert [t in audit for t in second] == [(i + 1) % 4 == 0 for i in range(BATCH)]
        _check_batch(second, tasks, audit, first)
        for tid in second_queue:
            pred = next(p for p in tasks[tid]["predictions"] if p["model_version"] == v1)
            if tid in audit:
                assert pred["result"] == [], "audit tasks are served without the model's mask"

        # --- 3. a batch of deliberately wrong masks: trained, stored, not promoted; the job status says why
        for tid in second:
            truth = _truth(labels, tasks[tid])
            mask = truth if tid in audit else 1 - truth
            ls.annotations.create(id=tid, result=mask_to_results(mask, config))

        def refused():
            raw = conn.get(keys.last_job_key(pid))
            last = json.loads(raw) if raw else {}
            return last if last.get("version") not in (None, v1) else None

        last = wait_until(refused, 900, "the second training job", logs=logs)
        assert last["status"] == "not-promoted" and last["promoted"] is False, last
        why = last["promotion"]["reason"]
        assert last["promotion"]["promoted"] is False and "not promoted" in why and v1 in why
        v2 = last["version"]
        assert registry.current_version() == v1  # the live version keeps serving
        assert as_dict(ls.projects.get(id=pid))["model_version"] == v1
        meta2 = registry.meta(v2)
        assert meta2["promotion"] == {"promoted": False, "reason": why}
        assert meta2["audit"]["tiles"] == 4 and meta2["audit"]["iou"] < meta2["audit"]["live_iou"] - 0.02
        status = subprocess.run([sys.executable, "-m", "ml_backend.cli", "status", "--project", str(pid)],
                                env=env_of_worker, cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert status.returncode == 0, status.stderr[-2000:]
        assert f"promotion       : {why}" in status.stdout  # what the team lead reads
    finally:
        worker.stop()
