"""The cold start in the product (issue 11): pretrained weights are what the first training starts from, the first
queue is coverage-ordered without near-duplicates with the audit tasks at their rate, and the pretraining job is
queued once per project (real Redis)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.active_learning.audit import audit_task_ids
from ml_backend.active_learning.plan import load_pretrained, pretrained_path, product_plan, task_position
from ml_backend.config import Settings
from ml_backend.data.synthetic import generate_em_like
from ml_backend.jobs.pretrain import coverage_queue, pretrain_config, save_pretrained
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.store.registry import ModelRegistry
from ml_backend.training.pretrain import pretrain
from ml_backend.training.recipe import new_model

XML = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    '<Label value="Mitochondria"/></BrushLabels></View>'
)


def _settings(tmp_path, **kw) -> Settings:
    return Settings.from_env(model_dir=tmp_path, model_width=4, model_depth=2, train_crop=32, device="cpu",
                             tile_size=64, tile_overlap=8, val_fraction=0.0, bn_calibration_tiles=0,
                             pretrain=True, pretrain_steps=6, pretrain_crop=32, **kw)  # fmt: skip


def _images(n: int, size: int = 48, seed: int = 3) -> list[np.ndarray]:
    raw, _ = generate_em_like(n, size=size, seed=seed)
    return [r.astype(np.float32) / 255.0 for r in raw]


def test_the_first_training_starts_from_the_pretrained_weights(tmp_path):
    from fakes import train_round

    from ml_backend.active_learning import LabelledTile

    settings = _settings(tmp_path)
    config = parse_label_config(XML)
    registry = ModelRegistry(tmp_path, 4)
    images = _images(6)
    assert not load_pretrained(registry, new_model(settings, config.num_classes))  # nothing there yet
    model = new_model(settings, config.num_classes)
    result = pretrain(model, images, pretrain_config(settings, 48), checkpoint_path=pretrained_path(registry).parent
                      / "checkpoint.pt")  # fmt: skip
    save_pretrained(registry, model, result)
    fresh = new_model(settings, config.num_classes)
    enc = next(k for k in result.state_dict if k.startswith("encoders") and k.endswith("weight"))
    assert not torch.equal(fresh.state_dict()[enc], result.state_dict[enc])  # pretraining changed the encoder

    plan = product_plan(registry, config, settings, None, score=False)
    assert plan.model.how == "pretrained" and plan.model.parent is None
    for k, v in result.state_dict.items():  # the round starts from exactly the pretrained weights
        assert torch.equal(plan.model.model.state_dict()[k], v), k

    _, gt = generate_em_like(6, size=48, seed=3)
    tiles = [LabelledTile(i, None, images[i], gt[i].astype(np.int64)) for i in range(3)]
    out = train_round(registry, tiles, config, settings, train_overrides={"steps": 2})
    assert out.meta["initialised"] == "pretrained"
    # the second version fine-tunes the first, not the pretrained weights
    assert product_plan(registry, config, settings, None, score=False).model.how == "fine-tuned"
    # weights of another architecture are ignored (training from scratch, as before)
    wide = new_model(settings.replace(model_width=8), config.num_classes)
    assert not load_pretrained(registry, wide)


def test_coverage_queue_has_no_near_duplicates_and_serves_audit_tasks_at_their_rate(tmp_path):
    settings = _settings(tmp_path, train_batch_size=6, audit_fraction=0.25)
    config = parse_label_config(XML)
    tasks, images, tid = {}, {}, 1
    imgs = _images(10, size=32, seed=8)
    for g in range(10):  # ten columns of four slices: each column is one near-duplicate group (z radius 3)
        for z in range(4):
            tasks[tid] = {
                "id": tid,
                "data": {
                    "image": f"/t/{tid}.png",
                    "source": "/s.tif",
                    "slice": z,
                    "tile_y": 0,
                    "tile_x": 32 * g,
                    "tile_width": 32,
                    "tile_height": 32,
                },
            }
            images[tid] = imgs[g] + 0.01 * z
            tid += 1
    tasks[1]["annotations"] = [{"id": 1, "result": []}]  # labelled: not queued
    model = new_model(settings, config.num_classes)
    order = coverage_queue(tasks, images, model, settings, "cpu")
    assert 1 not in order and sorted(order) == sorted(set(tasks) - {1})
    audit = set(audit_task_ids(sorted(tasks), 0.25, settings.seed))
    assert audit, "the test needs audit tasks"
    every = 4
    assert len(audit & set(order)) >= 2 and len(set(order) - audit) >= 6
    for place, t in enumerate(order[: 2 * every]):  # places 3 and 7 are audit places, the others are not
        assert (t in audit) == ((place + 1) % every == 0), (place, t)
    first = [t for t in order[:6] if t not in audit]
    columns = [task_position(tasks[t])[3] for t in first]
    assert len(columns) == len(set(columns)), f"near-duplicates in the first batch: {first}"
    assert order == coverage_queue(tasks, images, model, settings, "cpu")  # deterministic


def test_pretraining_is_queued_once_per_project(tmp_path, redis_url):
    import redis
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from ml_backend.queue.scheduling import PRETRAIN_FUNC, schedule_pretraining

    settings = _settings(tmp_path, redis_url=redis_url)
    conn = redis.Redis.from_url(redis_url)
    first = schedule_pretraining(12, settings, connection=conn)
    assert first == {"status": "queued", "job_id": "pretrain-12"}
    assert schedule_pretraining(12, settings, connection=conn)["status"] == "already-queued"
    job = Job.fetch("pretrain-12", connection=conn, serializer=JSONSerializer)
    assert job.func_name == PRETRAIN_FUNC and job.kwargs == {"project_id": 12}
    assert schedule_pretraining(12, settings.replace(pretrain=False), connection=conn) == {"status": "disabled"}
    with pytest.raises(ValueError):
        schedule_pretraining(0, settings, connection=conn)
