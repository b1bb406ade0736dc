"""The training job's pure part (annotations -> masks -> fine_tune -> publish) and the chunked re-scoring, with a
real small U-Net, real Redis and a real `rq worker` process; no Label Studio (that is the e2e test)."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from fakes import train_round
from PIL import Image
from rq.job import Job
from rq.serializers import JSONSerializer

from ml_backend.active_learning import LabelledTile, QueueOrder, TrainingError
from ml_backend.config import Settings
from ml_backend.data.synthetic import generate_em_like
from ml_backend.imaging import load_image
from ml_backend.labelstudio.annotations import annotation_signature, decode_annotations
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.loop import predictions_for
from ml_backend.labelstudio.project_data import ChunkInputs
from ml_backend.labelstudio.rle import mask_to_results, results_to_mask
from ml_backend.labelstudio.tasks import calibration_crops
from ml_backend.queue import keys
from ml_backend.queue.rescoring import RedisPoolScorer, RescoreJob, collect_rescore, start_rescore
from ml_backend.store.registry import ModelRegistry
from ml_backend.strategies import get_strategy
from ml_backend.training import IGNORE
from ml_backend.training.recipe import initial_model

REPO = Path(__file__).resolve().parents[2]

DENSE_XML = (REPO / "label_config" / "dense.xml").read_text()  # the config the product ships

SPARSE_XML = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Background" background="#0000ff"/>
    <Label value="Mitochondria" background="#ff0000"/>
  </BrushLabels>
</View>"""


@pytest.fixture(scope="module")
def data():
    raw, gt = generate_em_like(24, size=96, seed=3)
    return raw, gt


def small_settings(tmp_path: Path, redis_url: str = "redis://127.0.0.1:1/0", **kw) -> Settings:
    values = {
        "model_dir": tmp_path / "models",
        "redis_url": redis_url,
        "model_width": 8,
        "model_depth": 3,
        "model_dropout": 0.1,
        "train_steps": 80,
        "train_crop": 64,
        "val_fraction": 0.25,
        "train_time_budget_s": 300.0,
        "device": "cpu",
        "rescore_chunk": 4,
        "inference_batch": 4,
        "mc_passes": 2,
        "keep_versions": 3,
        # The image servers of these tests listen on loopback ports other than LABEL_STUDIO_URL's (issue 9: only
        # allow-listed hosts are fetched).
        "media_allowed_hosts": "127.0.0.1",
    }
    values.update(kw)
    return Settings.from_env(**values)


def make_tasks(raw: np.ndarray, config, gt: np.ndarray | None = None, ids=None):
    """Tasks whose data[image] is a key into `raw`, and annotations drawn from the ground truth."""
    ids = list(ids if ids is not None else range(1, len(raw) + 1))
    tasks = {tid: {"id": tid, "data": {config.image_key: f"img://{i}"}} for i, tid in enumerate(ids)}
    annotations = {}
    if gt is not None:
        for i, tid in enumerate(ids):
            annotations[tid] = {"id": 100 + tid, "result": mask_to_results(gt[i].astype(np.int64), config)}
    return tasks, annotations


def loader(raw: np.ndarray):
    def load(task):
        return load_image(_png(raw[int(task["data"]["image"].split("//")[1])]))

    return load


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_annotations_skips_only_the_bad_tasks(data):
    raw, gt = data
    config = parse_label_config(DENSE_XML)
    tasks, annotations = make_tasks(raw[:6], config, gt[:6])
    # wrong size: an RLE drawn on a 48x48 image
    annotations[2]["result"] = mask_to_results(np.ones((48, 48), dtype=np.int64), config)
    # unknown label
    bad_label = json.loads(json.dumps(annotations[3]["result"]))
    bad_label[0]["value"]["brushlabels"] = ["Nucleus"]
    annotations[3]["result"] = bad_label
    # undecodable RLE
    broken = json.loads(json.dumps(annotations[4]["result"]))
    broken[0]["value"]["rle"] = [1, 2, 3]
    annotations[4]["result"] = broken
    # annotation of a deleted task
    annotations[99] = {"id": 999, "result": []}
    tiles, skipped = decode_annotations(tasks, annotations, config, loader(raw))
    assert [t.task_id for t in tiles] == [1, 5, 6]
    for tile in tiles:
        np.testing.assert_array_equal(tile.mask, gt[tile.task_id - 1])
        assert tile.image.dtype == np.float32 and tile.image.shape == (96, 96)
    assert {s["task"] for s in skipped} == {2, 3, 4, 99}
    reasons = {s["task"]: s["error"] for s in skipped}
    assert "deleted" in reasons[99]
    assert all(reasons[t] for t in (2, 3, 4))


def test_dense_empty_result_is_all_background_sparse_unpainted_is_unknown(data):
    raw, gt = data
    dense = parse_label_config(DENSE_XML)
    tasks, _ = make_tasks(raw[:2], dense)
    tiles, skipped = decode_annotations(tasks, {1: {"id": 1, "result": []}}, dense, loader(raw))
    assert not skipped and (tiles[0].mask == 0).all()

    sparse = parse_label_config(SPARSE_XML)
    tasks, _ = make_tasks(raw[:2], sparse)
    # the annotator painted the mitochondria and a strip of background; every other pixel is unknown
    background = np.zeros((96, 96), dtype=bool)
    background[:10] = True
    background &= gt[0] == 0
    results = [brush(sparse, background, "Background"), brush(sparse, gt[0] > 0, "Mitochondria")]
    annotations = {1: {"id": 1, "result": results}, 2: {"id": 2, "result": []}}
    tiles, skipped = decode_annotations(tasks, annotations, sparse, loader(raw))
    assert [s["task"] for s in skipped] == [2] and "no labelled pixel" in skipped[0]["error"]
    mask = tiles[0].mask
    assert (mask[background] == sparse.class_of("Background")).all()
    assert (mask[gt[0] > 0] == sparse.class_of("Mitochondria")).all()
    assert (mask[~background & (gt[0] == 0)] == IGNORE).all()


def brush(config, region: np.ndarray, label: str) -> dict:
    """A brush result as Label Studio's editor stores it (RLE of a 0/255 mask)."""
    from label_studio_sdk.converter.brush import mask2rle

    h, w = region.shape
    return {
        "from_name": config.from_name,
        "to_name": config.to_name,
        "type": "brushlabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask2rle(region.astype(np.uint8) * 255), "brushlabels": [label]},
    }


def test_annotation_signature_tracks_changes():
    a = {1: {"id": 10, "updated_at": "2026-01-01"}, 2: {"id": 11, "updated_at": "2026-01-01"}}
    same = {2: {"id": 11, "updated_at": "2026-01-01"}, 1: {"id": 10, "updated_at": "2026-01-01"}}
    assert annotation_signature(a) == annotation_signature(same)
    assert annotation_signature(a) != annotation_signature({**a, 2: {"id": 11, "updated_at": "2026-02-01"}})
    assert annotation_signature(a) != annotation_signature({1: a[1]})


def _tiles(raw, gt, config, idx):
    tasks, annotations = make_tasks(raw[idx], config, gt[idx], ids=[i + 1 for i in idx])
    tiles, skipped = decode_annotations(tasks, annotations, config, lambda t: load_image(_png(raw[t["id"] - 1])))
    assert not skipped
    return tiles


@pytest.mark.slow
def test_the_round_improves_validation_iou_and_publishes(tmp_path, data):
    import torch

    torch.set_num_threads(1)
    raw, gt = data
    config = parse_label_config(DENSE_XML)
    settings = small_settings(tmp_path)
    registry = ModelRegistry(settings.model_dir, 5)
    steps = []
    out = train_round(
        registry,
        _tiles(raw, gt, config, list(range(12))),
        config,
        settings,
        strategy=get_strategy("entropy"),
        progress=steps.append,
        extra_meta={"annotation_signature": "abc"},
    )
    meta = out.meta
    assert registry.current_version() == out.version == meta["version"]
    assert meta["parent"] is None and meta["initialised"] == "from scratch"
    assert meta["n_annotations"] == 12 and meta["task_ids"] == list(range(1, 13))
    assert meta["annotation_ids"] == [101 + i for i in range(12)]
    assert meta["n_val"] >= 1 and meta["n_train"] + meta["n_val"] == 12
    assert meta["strategy"]["name"] == "entropy" and meta["annotation_signature"] == "abc"
    # the first version trains from scratch at the initial rate; later versions fine-tune at LEARNING_RATE
    assert meta["hyper_parameters"]["train"]["lr"] == settings.initial_learning_rate
    assert meta["hyper_parameters"]["model"]["width"] == 8
    assert meta["device"] == "cpu" and meta["training_seconds"] > 0
    metrics = meta["metrics"]
    # a real small U-Net learns the generated mitochondria: validation IoU measurably improves
    assert metrics["val_iou"] > metrics["initial_val_iou"] + 0.15, metrics
    assert steps and steps[-1]["step"] == meta["steps"] and "val_iou" in steps[-1]

    second = train_round(registry, _tiles(raw, gt, config, list(range(20))), config, settings)
    assert second.meta["parent"] == out.version and second.meta["initialised"] == "fine-tuned"
    assert second.meta["hyper_parameters"]["train"]["lr"] == settings.learning_rate
    assert second.meta["n_annotations"] == 20
    assert [m["version"] for m in registry.versions()] == [out.version, second.version]


def test_a_first_version_the_clock_stopped_asks_for_its_continuation(tmp_path, data, redis_url):
    """Issue 18: FIRST_VERSION_TIME_BUDGET_S stops a first version early (live within minutes on a CPU); the job
    then sets its forced follow-up flag, so one more training on the same labels fine-tunes it. A fine-tuned
    version, or a first version that ran all its steps, asks for nothing."""
    from ml_backend.jobs.train import _continue_first_version
    from ml_backend.queue.locks import take_dirty

    torch.set_num_threads(1)
    raw, gt = data
    config = parse_label_config(DENSE_XML)
    conn = redis.Redis.from_url(redis_url)
    settings = small_settings(tmp_path, redis_url, train_steps=100_000, first_version_time_budget_s=2.0)
    registry = ModelRegistry(settings.model_dir, 7)
    tiles = _tiles(raw, gt, config, list(range(8)))
    first = train_round(registry, tiles, config, settings)
    assert first.meta["parent"] is None and first.meta["metrics"]["stopped"] == "time_budget"
    assert first.meta["hyper_parameters"]["train"]["time_budget_s"] == 2.0
    assert first.meta["hyper_parameters"]["train"]["anneal_by_time"] is True
    assert first.meta["steps"] < first.meta["hyper_parameters"]["train"]["steps"] == 225_000
    assert _continue_first_version(7, conn, first.meta) and take_dirty(conn, 7) == "force"

    second = train_round(registry, tiles, config, settings.replace(train_steps=5))
    assert second.meta["parent"] == first.version
    assert second.meta["hyper_parameters"]["train"]["anneal_by_time"] is False
    assert not _continue_first_version(7, conn, second.meta) and take_dirty(conn, 7) is None
    full = train_round(ModelRegistry(settings.model_dir, 8), tiles, config, settings.replace(train_steps=4))
    assert full.meta["parent"] is None and full.meta["metrics"]["stopped"] == "steps"
    assert not _continue_first_version(8, conn, full.meta) and take_dirty(conn, 8) is None


def test_the_round_needs_tiles(tmp_path):
    config = parse_label_config(DENSE_XML)
    with pytest.raises(TrainingError, match="no usable annotated tile"):
        train_round(ModelRegistry(tmp_path, 1), [], config, small_settings(tmp_path))


def test_label_config_change_trains_from_scratch(tmp_path, data):
    raw, gt = data
    settings = small_settings(tmp_path, train_steps=2)
    registry = ModelRegistry(settings.model_dir, 1)
    dense = parse_label_config(DENSE_XML)
    first = train_round(registry, _tiles(raw, gt, dense, [0, 1, 2]), dense, settings)
    two_labels = parse_label_config(DENSE_XML.replace("</BrushLabels>", '<Label value="Vesicle"/></BrushLabels>'))
    assert two_labels.num_classes == 3
    tiles = [LabelledTile(t.task_id, t.annotation_id, t.image, t.mask) for t in _tiles(raw, gt, dense, [0, 1, 2])]
    second = train_round(registry, tiles, two_labels, settings)
    assert second.meta["initialised"] == "from scratch" and second.meta["parent"] is None
    assert second.meta["hyper_parameters"]["model"]["num_classes"] == 3
    assert first.version != second.version


@pytest.mark.parametrize(("norm", "layer"), [("batch", torch.nn.BatchNorm2d), ("group", torch.nn.GroupNorm)])
def test_model_norm_setting_builds_the_first_version(tmp_path, monkeypatch, norm, layer):
    monkeypatch.setenv("MODEL_NORM", norm)
    settings = Settings.from_env(model_dir=tmp_path / "models", model_width=4, model_depth=2)
    model, parent, how = initial_model(ModelRegistry(settings.model_dir, 1), parse_label_config(DENSE_XML), settings)
    assert (parent, how) == (None, "from scratch") and model.hparams["norm"] == norm
    assert any(isinstance(m, layer) for m in model.modules())


def test_calibration_crops_sample_the_project_and_skip_missing_images(tmp_path, monkeypatch):
    images = {i: np.full((200, 150), i, np.float32) for i in range(30)}

    def fake_load(task):
        if task["id"] == 7:
            raise OSError("gone")
        return images[task["id"]]

    tasks = {i: {"id": i, "data": {}} for i in range(30)}
    settings = small_settings(tmp_path, bn_calibration_tiles=30)  # every task: exactly one (task 7) fails
    crops = calibration_crops(tasks, settings, fake_load)
    assert len(crops) == 29 and all(c.shape == (64, 64) for c in crops)
    assert sorted(int(c[0, 0]) for c in crops) == [i for i in range(30) if i != 7]
    few = small_settings(tmp_path, bn_calibration_tiles=5)
    a, b = calibration_crops(tasks, few, fake_load), calibration_crops(tasks, few, fake_load)
    assert len(a) == 5 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))  # seeded
    assert calibration_crops(tasks, small_settings(tmp_path, bn_calibration_tiles=0), fake_load) == []


# ---------------------------------------------------------------------- re-scoring
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def image_server(tmp_path, data):
    """The pool's tiles as PNG files behind a real HTTP server (what fetch_image_bytes reads)."""
    raw, _ = data
    root = tmp_path / "www"
    root.mkdir()
    for i, tile in enumerate(raw):
        (root / f"tile_{i:03d}.png").write_bytes(_png(tile))
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _predictions(scored, version, config, strategy, settings, labelled_embeddings=None):
    """The job's selection over the whole pool (``QueueOrder``) and the predictions its sink would push."""
    if not scored.ids:
        return []
    ranking = QueueOrder(config.num_classes)(strategy, scored.ids, scored.scores,
                                             labelled_embeddings=labelled_embeddings, seed=settings.seed)  # fmt: skip
    return predictions_for(version, scored, ranking)


def _rescore(out, config, strategy, tasks, ids, settings, conn, labelled_embeddings=None, progress=None):
    """The product's pool scorer on one process (``RedisPoolScorer``, chunks through Redis), then the selection."""
    scorer = RedisPoolScorer(9, DENSE_XML, ChunkInputs(config, settings, tasks), settings, conn, helpers=False,
                             progress=progress)  # fmt: skip
    scored = scorer.score(out, out.version, strategy, ids, 0)
    return _predictions(scored, out.version, config, strategy, settings, labelled_embeddings)


def _pool(base_url, config, n=14, offset=10):
    tasks = {
        1000 + i: {"id": 1000 + i, "data": {config.image_key: f"{base_url}/tile_{offset + i:03d}.png"}}
        for i in range(n)
    }
    return tasks, sorted(tasks)


@pytest.mark.slow
def test_rescore_chunks_are_shared_with_a_real_rq_worker(tmp_path, data, redis_url, image_server):
    raw, gt = data
    config = parse_label_config(DENSE_XML)
    settings = small_settings(tmp_path, redis_url=redis_url, train_steps=30)
    registry = ModelRegistry(settings.model_dir, 9)
    out = train_round(registry, _tiles(raw, gt, config, list(range(8))), config, settings)
    conn = redis.Redis.from_url(redis_url)
    tasks, ids = _pool(image_server, config)
    strategy = get_strategy("entropy")

    inputs = ChunkInputs(config, settings, tasks)  # what the training job hands queue/ (the coordinator's)
    rnd = start_rescore(RescoreJob(9, out.version, DENSE_XML, inputs, settings, conn), strategy, ids)
    assert [len(c) for c in rnd.chunks] == [4, 4, 4, 2] and len(rnd.helper_jobs) == 3
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "MODEL_DIR": str(settings.model_dir),
        "DEVICE": "cpu",
        "INFERENCE_BATCH": "4",
        "MC_PASSES": "2",
        "MEDIA_ALLOWED_HOSTS": settings.media_allowed_hosts,
    }
    worker = subprocess.run(
        [sys.executable, "-m", "ml_backend.cli", "worker", "--burst", "--name", "helper-test"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert worker.returncode == 0, worker.stderr[-3000:]
    for job_id in rnd.helper_jobs:  # every helper chunk was scored by the worker process, JSON in and out
        job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
        assert job.get_status() == "finished", job.exc_info
        assert job.return_value()["status"] == "scored"
    seen: list[dict] = []
    shared = _predictions(collect_rescore(rnd, out.model, inputs, settings, conn, progress=seen.append), out.version,
                          config, strategy, settings)  # fmt: skip
    # the score phase's own progress, in tasks (the worker scored its chunks before: all done at the first look)
    assert seen and seen[-1]["step"] == seen[-1]["steps"] == len(ids) and seen[-1]["unit"] == "tasks", seen

    steps: list[dict] = []
    local = _rescore(out, config, strategy, tasks, ids, settings, conn, progress=steps.append)
    # chunk by chunk here: from 0 (no ETA yet) to every task, with an ETA once a chunk is done
    assert [s["step"] for s in steps] == list(range(0, len(ids) + 1, settings.rescore_chunk)) + (
        [len(ids)] if len(ids) % settings.rescore_chunk else []), steps
    assert steps[0]["eta_s"] is None and all(s["eta_s"] >= 0 for s in steps[1:]) and steps[-1]["eta_s"] == 0
    assert [p["task"] for p in shared] == ids == [p["task"] for p in local]
    for a, b in zip(shared, local, strict=True):
        assert a["model_version"] == b["model_version"] == out.version
        assert a["score"] == pytest.approx(b["score"], abs=1e-6) and 0.0 <= a["score"] <= 1.0
        # the same masks up to float noise: two processes may round a borderline pixel differently
        mask_a, mask_b = (results_to_mask(p["result"], config, 96, 96) for p in (a, b))
        assert np.mean(mask_a != mask_b) <= MASK_TOLERANCE, f"task {a['task']}: masks differ beyond tolerance"
        assert [r["type"] for r in a["result"]] == [r["type"] for r in b["result"]]
    # the masks are the model's predictions, decodable at the tile size
    for pred in shared:
        mask = results_to_mask(pred["result"], config, 96, 96)
        assert mask.shape == (96, 96)
    assert conn.keys(keys.rescore_pattern(9)) == []  # the round cleans up after itself


MASK_TOLERANCE = 0.002  # fraction of pixels; one 96 x 96 tile's borderline pixels


def test_rescore_with_a_batch_strategy_ranks_the_whole_pool(tmp_path, data, redis_url, image_server):
    raw, gt = data
    config = parse_label_config(DENSE_XML)
    settings = small_settings(tmp_path, redis_url=redis_url, train_steps=5)
    registry = ModelRegistry(settings.model_dir, 9)
    tiles = _tiles(raw, gt, config, [0, 1, 2, 3])
    out = train_round(registry, tiles, config, settings)
    conn = redis.Redis.from_url(redis_url)
    tasks, ids = _pool(image_server, config, n=10)
    from ml_backend.inference.scoring import embed_images

    labelled = embed_images(out.model, [t.image for t in tiles], "cpu")
    preds = _rescore(out, config, get_strategy("coreset"), tasks, ids, settings, conn, labelled_embeddings=labelled)
    scores = sorted(p["score"] for p in preds)
    assert scores == pytest.approx([r / 10 for r in range(10)])  # rank mapping over the whole pool


def test_rescore_skips_tasks_whose_image_is_gone(tmp_path, data, redis_url, image_server):
    raw, gt = data
    config = parse_label_config(DENSE_XML)
    settings = small_settings(tmp_path, redis_url=redis_url, train_steps=2)
    out = train_round(ModelRegistry(settings.model_dir, 9), _tiles(raw, gt, config, [0, 1]), config, settings)
    conn = redis.Redis.from_url(redis_url)
    tasks, ids = _pool(image_server, config, n=5)
    tasks[ids[1]]["data"]["image"] = f"{image_server}/missing.png"
    del tasks[ids[2]]["data"]["image"]
    preds = _rescore(out, config, get_strategy("entropy"), tasks, ids, settings, conn)
    assert [p["task"] for p in preds] == [ids[0], ids[3], ids[4]]


def test_label_studio_unreachable_fails_clearly_and_frees_the_project(tmp_path, redis_url, redis_tools):
    from ml_backend import queue as q
    from ml_backend.jobs.train import _train_and_rescore
    from ml_backend.labelstudio.client import LabelStudioUnavailable
    from ml_backend.queue.coordination import run_exclusive

    dead = f"http://127.0.0.1:{redis_tools.free_port()}"
    settings = small_settings(tmp_path, redis_url=redis_url, label_studio_url=dead, label_studio_api_key="x" * 40)
    conn = redis.Redis.from_url(redis_url)

    def body(force, progress, conn_, job_id):
        return _train_and_rescore(3, settings, conn_, progress, force=force, reason="test", job_id=job_id)

    with pytest.raises(LabelStudioUnavailable, match=f"Label Studio at {dead}.* is unavailable"):
        run_exclusive(3, settings, None, body, force=True, reason="test", conn=conn)
    assert q.running_job(conn, 3) is None  # the next trigger (or RQ's retry) can run at once
    last = json.loads(conn.get(keys.last_job_key(3)))
    assert last["status"] == "failed" and "unavailable" in last["error"]
    assert ModelRegistry(settings.model_dir, 3).current_version() is None
