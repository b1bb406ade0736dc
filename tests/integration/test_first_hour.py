"""A new team's first hour on its own stack (issue 18), end to end: real Label Studio 1.23.2, real Redis, the backend
under gunicorn behind basic auth, a real ``rq worker``, a generated stack of 1,024 tiles of 32 px.

1. ``ml-backend setup`` configures the project as the quick start does: ``dense_uncertainty.xml``, "Uncertainty
   sampling" (every way of asking for the next task serves the lowest score), the webhook carrying the login.
2. The quick start's import path: tiles imported, the position-spread first queue published at once
   (``jobs.pretrain.publish_spread_queue``), the cold start queued (tiny pretraining budget).
3. Before any model exists, a second user of the organisation asks ``/next`` WITHOUT ``view=`` (what an SDK script
   calls): it gets the head of the spread queue, not task 1 (two users do not make Label Studio draw at random);
   then the cold start is queued.
4. The cold start ends: every phase reported its own progress; only COLDSTART_EMBED_TILES tiles were embedded; the
   coverage order is what ``/next`` serves from then on.
5. The admin takes the rest of the first batch from ``/next`` (no view) and submits the ground truth: the served
   tasks are exactly the queue's lowest scores, skipping the task the other user holds.
6. A first version of the backend's registry (``v0001-...``) is trained from the pretrained weights, stopped by
   FIRST_VERSION_TIME_BUDGET_S, delivered, and the queue re-ordered: ``/next`` serves the new version's lowest score
   (a sample of RANDOM_PHASE_CANDIDATES tiles while batches are random draws).
7. The clock cut the first version short: a follow-up training on the same labels fine-tunes it (``v0002-...``).

Fast tests of the pieces (spread order, bounded coverage sample, the "a training waits" rule, pretraining that
yields to a waiting training) come first.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
import tifffile
from serving_order import serving_order
from waiting import wait_until

from ml_backend.config import Settings
from ml_backend.labelstudio.client import as_dict, list_tasks

TILE = 32
SLICES = 16
BATCH = 10
EMBED = 200  # COLDSTART_EMBED_TILES: fewer than the 1,024 tiles
Z_RADIUS = 3


def _grid_tasks(slices: int, rows: int, cols: int, tile: int = TILE, start: int = 1) -> dict[int, dict]:
    tasks, tid = {}, start
    for z in range(slices):
        for r in range(rows):
            for c in range(cols):
                tasks[tid] = {"id": tid, "data": {"image": f"/t/{tid}.png", "source": "/stack.tif", "slice": z,
                                                  "tile_y": r * tile, "tile_x": c * tile, "tile_width": tile,
                                                  "tile_height": tile}}  # fmt: skip
                tid += 1
    return tasks


def _near(a: dict, b: dict, tile: int = TILE) -> bool:
    da, db = a["data"], b["data"]
    return (
        abs(da["slice"] - db["slice"]) <= Z_RADIUS
        and abs(da["tile_x"] - db["tile_x"]) < tile
        and abs(da["tile_y"] - db["tile_y"]) < tile
    )


def _settings(tmp_path: Path, **kw) -> Settings:
    return Settings.from_env(model_dir=tmp_path, train_batch_size=BATCH, audit_fraction=0.1, device="cpu",
                             model_width=4, model_depth=2, **kw)  # fmt: skip


def test_the_spread_order_spans_the_stack_without_near_duplicates(tmp_path):
    from ml_backend.active_learning.audit import audit_task_ids
    from ml_backend.active_learning.plan import cold_start_order, spread_order

    settings = _settings(tmp_path)
    tasks = _grid_tasks(SLICES, 8, 8)
    order = spread_order(sorted(tasks), tasks, settings)
    assert sorted(order) == sorted(tasks) and order == spread_order(sorted(tasks), tasks, settings)
    first = order[:BATCH]
    slices = sorted(tasks[t]["data"]["slice"] for t in first)
    assert len(set(slices)) >= BATCH - 2 and slices[-1] - slices[0] >= SLICES // 2, slices  # over the whole stack
    for i, a in enumerate(first):
        for b in first[i + 1 :]:
            assert not _near(tasks[a], tasks[b]), (a, b)
    served = cold_start_order(sorted(tasks), tasks, settings)
    audit = set(audit_task_ids(sorted(tasks), 0.1, settings.seed))
    assert [t in audit for t in served[:20]] == [(i + 1) % 10 == 0 for i in range(20)]  # audit places kept
    # labelled tasks are not served; a given head comes first, the rest keeps the spread order
    head = [t for t in order[50:60] if t not in audit]
    pool = [t for t in sorted(tasks) if t != order[0]]
    served = cold_start_order(pool, tasks, settings, head=head)
    assert order[0] not in served and [t for t in served if t not in audit][: len(head)] == head


def test_the_coverage_order_embeds_only_the_sample_it_is_given(tmp_path):
    from ml_backend.active_learning.audit import audit_task_ids
    from ml_backend.active_learning.plan import spread_order
    from ml_backend.data.synthetic import generate_em_like
    from ml_backend.jobs.pretrain import coverage_queue
    from ml_backend.training.recipe import new_model

    settings = _settings(tmp_path)
    tasks = _grid_tasks(6, 4, 4)
    sample = sorted(tasks)[::3]
    raw, _ = generate_em_like(len(sample), size=TILE, seed=2)
    images = {t: r.astype(np.float32) / 255.0 for t, r in zip(sample, raw, strict=True)}
    model = new_model(settings, 2)
    calls: list[int] = []
    embed = model.embed

    def counting_embed(x):  # the real encoder, counted
        calls.append(int(x.shape[0]))
        return embed(x)

    model.embed = counting_embed
    order = coverage_queue(tasks, images, model, settings, "cpu")
    audit = set(audit_task_ids(sorted(tasks), 0.1, settings.seed))
    embedded = {t for t in sample if t not in audit}
    assert sum(calls) == len(embedded) < len(tasks)  # the sample only, never the whole stack
    assert sorted(order) == sorted(tasks)  # every task is queued: the others in spread order behind the sample
    served = [t for t in order if t not in audit]
    assert set(served[: len(embedded)]) == embedded
    assert served[len(embedded) :] == [t for t in spread_order(sorted(tasks), tasks, settings)
                                       if t not in embedded and t not in audit]  # fmt: skip


def test_a_waiting_training_skips_the_coverage_push(tmp_path, redis_url):
    import redis

    from ml_backend.jobs.pretrain import _pending_training
    from ml_backend.queue import keys

    conn = redis.Redis.from_url(redis_url)
    settings = _settings(tmp_path, redis_url=redis_url)
    pid = 91000 + int(uuid.uuid4().int % 1000)
    assert not _pending_training(pid, settings, conn)
    conn.sadd(keys.pending_key(pid), *[f"a{i}" for i in range(BATCH - 1)])
    assert not _pending_training(pid, settings, conn)  # one annotation short of a batch
    conn.sadd(keys.pending_key(pid), "a-last")
    assert _pending_training(pid, settings, conn)
    conn.delete(keys.pending_key(pid))
    conn.set(keys.queued_key(pid), "train-p-gone")  # a stale slot naming no waiting job does not count
    assert not _pending_training(pid, settings, conn)


def test_pretraining_yields_when_asked_and_checkpoints(tmp_path):
    import torch

    from ml_backend.data.synthetic import generate_em_like
    from ml_backend.model import build_model
    from ml_backend.training.pretrain import PretrainConfig, pretrain

    raw, _ = generate_em_like(8, size=TILE, seed=1)
    tiles = [r.astype(np.float32) / 255.0 for r in raw]
    cfg = PretrainConfig(steps=40, batch_size=4, crop=TILE, patch=4, log_every=5, checkpoint_every=50, device="cpu")
    asked: list[float] = []

    def after_ten_steps(elapsed: float) -> bool:  # the job asks Redis whether a training waits; here: the 3rd time
        asked.append(elapsed)
        return len(asked) >= 2

    ckpt = tmp_path / "pre.pt"
    torch.manual_seed(0)
    result = pretrain(build_model("unet", width=4, depth=2), tiles, cfg, checkpoint_path=ckpt,
                      should_stop=after_ten_steps)  # fmt: skip
    assert result.stopped == "requested" and result.steps == 10 and len(asked) == 2
    assert torch.load(ckpt, weights_only=True)["step"] == 10  # a re-run resumes from there
    torch.manual_seed(0)
    rest = pretrain(build_model("unet", width=4, depth=2), tiles, cfg, checkpoint_path=ckpt)
    assert rest.stopped == "steps" and rest.steps == 40 and rest.resumed_from == 10


def test_the_status_page_shows_the_running_phase_with_its_own_eta():
    from ml_backend.server.status_page import render_status_page

    meta = {"phase": "embed", "progress": {"step": 64, "steps": 512, "unit": "tiles", "seconds": 8.0, "eta_s": 56.0},
            "phases": [{"name": "spread", "state": "done", "seconds": 0.1},
                       {"name": "pretrain", "state": "done", "seconds": 180.2},
                       {"name": "embed", "state": "running", "seconds": None},
                       {"name": "publish", "state": "waiting", "seconds": None}]}  # fmt: skip
    page = render_status_page({"projects": [{"id": 3, "job": meta}]})
    assert "<th>phase</th><td>embed</td>" in page and "64 / 512 tiles" in page
    assert "<th>ETA</th><td>56 s</td>" in page  # the embedding's own ETA, not pretraining's
    assert "pretrain (done, 3 min 00 s) &rarr; embed (running) &rarr; publish (waiting)" in page


@pytest.mark.integration
def test_a_batch_labelled_during_pretraining_gets_the_first_version_sooner(label_studio, ls, redis_url, tmp_path):
    """The cold start on a real Label Studio project while a labelled batch waits: pretraining yields after
    PRETRAIN_YIELD_AFTER_S (not its whole budget), the spread queue stays (no coverage push the trained version
    would replace minutes later), and the job's meta says which phases ran and which were skipped."""
    import redis
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from ml_backend.data.volume import generate_volume
    from ml_backend.jobs.pretrain import cold_start, publish_spread_queue
    from ml_backend.labelstudio.importing import import_tiles
    from ml_backend.labelstudio.setup import DEFAULT_LABEL_CONFIG, setup_project
    from ml_backend.queue import keys
    from ml_backend.queue.status import JobProgress

    vol = generate_volume((4, 64, 64), seed=3)
    stack = tmp_path / "small.tif"
    tifffile.imwrite(stack, vol.image, photometric="minisblack")
    pid = int(setup_project(ls, title=f"yield {uuid.uuid4().hex[:6]}",
                            label_config=DEFAULT_LABEL_CONFIG.read_text())["project"])  # fmt: skip
    assert import_tiles(ls, pid, [stack], document_root=label_studio.document_root, tile=TILE,
                        progress=False)["created"] == 16  # fmt: skip
    settings = Settings.from_env(
        label_studio_url=label_studio.url, label_studio_api_key=label_studio.api_key, redis_url=redis_url,
        local_files_root=str(label_studio.document_root), model_dir=tmp_path / "models", device="cpu",
        model_width=4, model_depth=2, train_batch_size=2, pretrain_steps=100000, pretrain_time_budget_s=120.0,
        pretrain_yield_after_s=0.0, pretrain_crop=TILE, pretrain_tiles=16,
    )  # fmt: skip
    spread = publish_spread_queue(ls, pid, settings)
    conn = redis.Redis.from_url(redis_url)
    conn.sadd(keys.pending_key(pid), "annotation-1", "annotation-2")  # a batch of TRAIN_BATCH_SIZE waits
    job = Job.create("builtins.print", connection=conn, serializer=JSONSerializer, id=f"cold-{uuid.uuid4().hex[:6]}")
    job.save()
    summary = cold_start(pid, settings, JobProgress(job, pid), ls=ls, conn=conn)
    assert summary["stopped"] == "requested" and summary["steps"] < 100000, summary  # yielded, not its budget
    assert summary["spread"] == "in place" and summary["queue"].startswith("spread kept"), summary
    job.refresh()
    states = {p["name"]: p["state"] for p in job.meta["phases"]}
    assert states == {"spread": "done", "read": "done", "pretrain": "done", "embed": "skipped",
                      "order": "skipped", "publish": "skipped"}, states  # fmt: skip
    tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
    assert serving_order(tasks, "cold-start")[:2] == spread["first"][:2]  # the spread queue still serves


# ------------------------------------------------------------------------------------------------- end to end
def _signup(url: str) -> requests.Session:
    """A second user of the organisation, signed up and logged in through Label Studio's own form."""
    s = requests.Session()
    email, password = f"annotator-{uuid.uuid4().hex[:6]}@example.com", "annotator-pass-123"
    s.get(url + "/user/signup/", timeout=30)
    form = {"email": email, "password": password, "how_find_us": "Other",
            "csrfmiddlewaretoken": s.cookies.get("csrftoken", "")}  # fmt: skip
    resp = s.post(url + "/user/signup/", data=form, headers={"Referer": url + "/user/signup/"}, timeout=30)
    assert resp.status_code == 200, resp.text[:300]
    assert s.get(url + "/api/current-user/whoami", timeout=30).json().get("email") == email
    s.headers.update({"X-CSRFToken": s.cookies.get("csrftoken", ""), "Referer": url})
    return s


def _next(session: requests.Session, url: str, pid: int) -> dict:
    """``GET /api/projects/<id>/next/`` without ``view=``: what an SDK script calls."""
    resp = session.get(f"{url}/api/projects/{pid}/next/", timeout=60)
    assert resp.status_code == 200, resp.text[:300]
    return resp.json()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_first_hour(label_studio, ls, start_backend, start_rq_worker, worker_env, redis_url, tmp_path, monkeypatch):
    import redis
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from ml_backend.cli.importing import enqueue_cold_start
    from ml_backend.data.volume import generate_volume
    from ml_backend.jobs.pretrain import COLD_START_VERSION, publish_spread_queue
    from ml_backend.labelstudio.importing import import_tiles
    from ml_backend.labelstudio.labelconfig import parse_label_config
    from ml_backend.labelstudio.rle import mask_to_results
    from ml_backend.labelstudio.setup import DEFAULT_LABEL_CONFIG, SAMPLING, setup_project
    from ml_backend.store.registry import ModelRegistry

    vol = generate_volume((SLICES, 256, 256), setting="isotropic", seed=5, foreground=0.1)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, vol.image, photometric="minisblack")
    model_dir = tmp_path / "models"
    login = ("team-backend", uuid.uuid4().hex)
    env = {
        "REDIS_URL": redis_url, "TRAIN_BATCH_SIZE": str(BATCH), "TRAIN_STEPS": "60", "TRAIN_CROP": "32",
        "MODEL_WIDTH": "8", "MODEL_DEPTH": "3", "RESCORE_CHUNK": "256", "DEVICE": "cpu", "BN_CALIBRATION_TILES": "16",
        "PRETRAIN": "true", "PRETRAIN_STEPS": "100000", "PRETRAIN_TIME_BUDGET_S": "20", "PRETRAIN_CROP": "32",
        "PRETRAIN_TILES": "64", "COLDSTART_EMBED_TILES": str(EMBED), "DIVERSITY_Z_RADIUS": str(Z_RADIUS),
        "SUGGEST_MIN_TILE": "16", "SUGGEST_WINDOW": "16", "FIRST_VERSION_TIME_BUDGET_S": "2",
    }  # fmt: skip
    backend = start_backend(model_dir, **env, BASIC_AUTH_USER=login[0], BASIC_AUTH_PASS=login[1])
    worker = start_rq_worker(worker_env(model_dir, **env), "first-hour")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env(label_studio_url=label_studio.url, label_studio_api_key=label_studio.api_key,
                                 model_dir=model_dir)  # fmt: skip
    conn = redis.Redis.from_url(redis_url)

    def logs() -> str:
        return f"--- worker\n{worker.log_path.read_text(errors='replace')[-8000:]}\n--- backend\n{backend.log_tail()}"

    # --- 1. the set-up of the quick start
    label_config = DEFAULT_LABEL_CONFIG.read_text()
    assert DEFAULT_LABEL_CONFIG.name == "dense_uncertainty.xml"
    info = setup_project(ls, title=f"first hour {uuid.uuid4().hex[:6]}", label_config=label_config,
                         backend_url=backend.url, basic_auth=login, retrieve=False)  # fmt: skip
    pid = int(info["project"])
    project = as_dict(ls.projects.get(id=pid))
    assert project["sampling"] == SAMPLING == "Uncertainty sampling" and project["maximum_annotations"] == 1
    config = parse_label_config(project["label_config"])
    assert 'name="uncertainty"' in project["label_config"] and "Suggested region" in project["label_config"]

    # --- 2. the quick start's import: the spread queue at once (the cold start is queued after step 3)
    imported = import_tiles(ls, pid, [stack], document_root=label_studio.document_root, tile=TILE, progress=False)
    assert imported["created"] == SLICES * 8 * 8 >= 1000
    spread = publish_spread_queue(ls, pid, settings)
    assert spread["queued"] == imported["created"]
    assert as_dict(ls.projects.get(id=pid))["model_version"] == COLD_START_VERSION
    tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
    spread_queue = serving_order(tasks, COLD_START_VERSION)
    assert spread_queue[:BATCH] == spread["first"]
    head_slices = [tasks[t]["data"]["slice"] for t in spread_queue[: BATCH - 1]]
    assert len(set(head_slices)) >= BATCH - 3 and max(head_slices) - min(head_slices) >= SLICES // 2, head_slices

    # --- 3. a second user's SDK-style /next (no view) before any model exists: the head of the spread queue
    other = _signup(label_studio.url)
    first = _next(other, label_studio.url, pid)
    assert first["id"] == spread_queue[0] != min(tasks), (first["id"], spread_queue[:5])
    d = first["data"]
    truth = vol.labels[d["slice"], d["tile_y"] : d["tile_y"] + TILE, d["tile_x"] : d["tile_x"] + TILE]
    resp = other.post(f"{label_studio.url}/api/tasks/{first['id']}/annotations/",
                      json={"result": mask_to_results(truth.astype(np.int64), config)}, timeout=60)  # fmt: skip
    assert resp.status_code == 201, resp.text[:300]
    assert enqueue_cold_start(pid, settings)["status"] == "queued"
    job = wait_until(lambda: Job.fetch(f"pretrain-{pid}", connection=conn, serializer=JSONSerializer), 30,
                     "the cold-start job")  # fmt: skip

    # --- 4. the cold start: bounded, every phase with its own progress, the coverage order published
    wait_until(lambda: job.get_status(refresh=True) in ("finished", "failed"), 900, "the cold start", logs=logs)
    job.refresh()
    summary = job.return_value()
    assert job.get_status() == "finished" and summary["status"] == "pretrained", logs()
    assert summary["stopped"] == "time_budget" and summary["spread"] == "in place"
    assert summary["queue"] == "coverage" and summary["embedded"] <= EMBED < imported["created"]
    phases = {p["name"]: p for p in job.meta["phases"]}
    assert list(phases) == ["spread", "read", "pretrain", "embed", "order", "publish"]
    assert all(p["state"] == "done" and p["seconds"] is not None for p in phases.values()), phases
    assert job.meta["phase"] == "publish" and job.meta["progress"]["unit"] == "tasks"
    assert job.meta["progress"]["step"] == job.meta["progress"]["steps"] == imported["created"] - 1
    tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
    coverage = serving_order(tasks, COLD_START_VERSION)
    assert coverage[:BATCH] == summary["first"] and first["id"] not in coverage
    assert all(p["result"] == [] for t in coverage for p in tasks[t]["predictions"])  # no masks before labels

    # --- 5. the admin takes the rest of the batch from /next (no view): exactly the queue's lowest scores
    admin = requests.Session()
    admin.headers["Authorization"] = f"Token {label_studio.api_key}"
    served = []
    for _ in range(BATCH - 1):
        task = _next(admin, label_studio.url, pid)
        served.append(int(task["id"]))
        d = task["data"]
        truth = vol.labels[d["slice"], d["tile_y"] : d["tile_y"] + TILE, d["tile_x"] : d["tile_x"] + TILE]
        ls.annotations.create(id=task["id"], result=mask_to_results(truth.astype(np.int64), config))
    assert served == coverage[: BATCH - 1], (served, coverage[:BATCH])

    # --- 6. a first version of the backend, delivered: the queue re-ordered by it
    registry = ModelRegistry(model_dir, pid)
    version = wait_until(registry.current_version, 1200, "the first version", logs=logs)
    assert version.startswith("v0001-") and registry.current_meta()["initialised"] == "pretrained"
    wait_until(lambda: as_dict(ls.projects.get(id=pid)).get("model_version") == version, 600,
               "the first version's queue", logs=logs)  # fmt: skip
    meta = registry.current_meta()
    assert meta["metrics"]["stopped"] == "time_budget" and meta["steps"] < meta["hyper_parameters"]["train"]["steps"]
    tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
    requeued = serving_order(tasks, version, sample=True)
    # fewer than UNCERTAINTY_FROM_LABELS labels: the next batch is a random draw, so the round scored a sample of
    # RANDOM_PHASE_CANDIDATES tiles, served first; the other tiles keep the cold start's order behind them
    assert len(requeued) == settings.random_phase_candidates < imported["created"] - BATCH
    assert requeued[:BATCH] != [t for t in coverage if t in set(requeued)][:BATCH]  # re-ordered by the model
    assert int(_next(admin, label_studio.url, pid)["id"]) == requeued[0]

    # --- 7. the clock cut the first version short (FIRST_VERSION_TIME_BUDGET_S): a follow-up continues it
    second = wait_until(lambda: (registry.current_version() or "").startswith("v0002-") and registry.current_version(),
                        900, "the first version's continuation", logs=logs)  # fmt: skip
    meta2 = registry.current_meta()
    assert meta2["parent"] == version and meta2["n_annotations"] == meta["n_annotations"], meta2
    assert meta2["trigger"].startswith("follow-up"), meta2["trigger"]
    wait_until(lambda: as_dict(ls.projects.get(id=pid)).get("model_version") == second, 600,
               "the continuation's queue", logs=logs)  # fmt: skip
