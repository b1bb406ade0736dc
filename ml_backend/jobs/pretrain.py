"""RQ job: the cold start of a project (issue 11) — self-supervised pretraining, then a coverage-ordered first queue.

``pretrain_project(project_id)`` is enqueued after tiles are imported (``ml_backend.queue.scheduling
.schedule_pretraining``: the import command and the quick start). Its steps:

1. skip when a trained version already serves (pretraining is for the first fine-tuning only);
2. read the project's tasks from Label Studio and a seeded sample of PRETRAIN_TILES task images;
3. pretrain a fresh U-Net of the project's architecture on them (``training.pretrain``: masked-image + denoising
   reconstruction through the whole U-Net, SimMIM / Models Genesis), bounded by PRETRAIN_STEPS and
   PRETRAIN_TIME_BUDGET_S, checkpointed under the project's store folder (``<MODEL_DIR>/projects/<id>/pretrain/``)
   so a re-run (RQ retry, worker killed) resumes where it stopped; progress in the job's meta;
4. write the weights (``pretrained.pt``); the project's first training starts from them
   (``active_learning.plan.product_plan``);
5. order the first queue for coverage in the pretrained feature space: ``strategies.batch.coverage_order`` with
   ``method="random"`` under the stack/feature exclusions (the component's experiments: on a stack with ~4%
   foreground, TypiClust's typical tiles are background and did not beat random; random order with the
   exclusions on pretrained embeddings did), the audit tasks interleaved at their rate; pushed as queue scores
   with an EMPTY result under the cold-start model version (never masks from a model not trained on labels).
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np

from ml_backend.active_learning.plan import pretrained_path
from ml_backend.config import Settings, get_settings, torch_device
from ml_backend.queue.coordination import run_exclusive
from ml_backend.queue.status import JobProgress
from ml_backend.store.atomic import write_atomic
from ml_backend.store.registry import ModelRegistry

from .logs import ensure_logging

log = logging.getLogger(__name__)

COLD_START_VERSION = "cold-start"  # the same name /predict answers with before the first trained version


def pretrain_project(project_id: int) -> dict:
    """RQ entry point: pretrain project ``project_id`` on its unlabelled tiles and push the coverage-ordered queue.

    Runs under the project's training lock (``queue.coordination.run_exclusive``): a training triggered meanwhile
    becomes its follow-up and starts from the pretrained weights.
    """
    from rq import get_current_job

    ensure_logging()
    settings = get_settings()
    pid = int(project_id)

    def body(force: bool, progress: JobProgress, conn: Any, job_id: str) -> dict:
        return cold_start(pid, settings, progress)

    return run_exclusive(pid, settings, get_current_job(), body, force=False, reason="pretrain")


def _sample(ids: list[int], n: int, seed: int) -> list[int]:
    rng = np.random.default_rng([seed, 0x9E7])
    return sorted(rng.permutation(ids)[:n].tolist()) if len(ids) > n else list(ids)


def pretrain_config(settings: Settings, min_side: int) -> Any:
    from ml_backend.training.pretrain import PretrainConfig

    return PretrainConfig(
        steps=settings.pretrain_steps,
        time_budget_s=settings.pretrain_time_budget_s,
        crop=max(8, min(settings.pretrain_crop, min_side)),
        seed=settings.seed,
        device=settings.device,
    )


def cold_start(pid: int, settings: Settings, progress: JobProgress | None = None, *, ls: Any = None) -> dict:
    """Steps 1-5 of the module docstring; returns a JSON summary."""
    import torch

    from ml_backend.labelstudio.client import connect, list_tasks
    from ml_backend.labelstudio.neighbours import NeighbourIndex, load_context_image
    from ml_backend.labelstudio.project import project_label_config
    from ml_backend.labelstudio.tasks import load_task_image
    from ml_backend.training.pretrain import pretrain
    from ml_backend.training.recipe import new_model

    progress = progress or JobProgress(None, pid)
    registry = ModelRegistry(settings.model_dir, pid)
    if registry.current_version() is not None:
        return {"status": "skipped", "reason": f"{registry.current_version()} serves already: nothing to pretrain"}
    t0 = time.monotonic()
    ls = ls if ls is not None else connect(settings)
    config, _ = project_label_config(ls, pid, settings)
    tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
    if not tasks:
        return {"status": "no-tasks"}
    offsets = settings.context_offset_list  # 2.5D context: the new model reads these slices as channels
    index = NeighbourIndex.from_tasks(tasks, config.image_key) if offsets != (0,) else None
    with progress.phase("read"):
        images: dict[int, np.ndarray] = {}
        for tid in sorted(tasks):
            try:
                images[tid] = (
                    load_task_image(tasks[tid], config, settings)
                    if index is None
                    else load_context_image(tasks[tid], config, settings, offsets, index)
                )
            except Exception as exc:  # an unreadable tile is left out of pretraining and of the coverage order
                log.warning("project %s: task %s not read for pretraining: %s", pid, tid, exc)
    if not images:
        return {"status": "no-images", "tasks": len(tasks)}
    sample = _sample(sorted(images), settings.pretrain_tiles, settings.seed)
    model = new_model(settings, config.num_classes)
    cfg = pretrain_config(settings, min(min(images[t].shape[-2:]) for t in sample))
    folder = pretrained_path(registry).parent

    def report(info: dict) -> None:
        progress.update(phase="pretrain", progress=info)
        log.info("project %s: pretraining step %s/%s loss %.4f", pid, info["step"], info["steps"], info["loss"])

    with progress.phase("pretrain"):
        result = pretrain(model, [images[t] for t in sample], cfg, checkpoint_path=folder / "checkpoint.pt",
                          progress=report)  # fmt: skip
        save_pretrained(registry, model, result)
    summary = {
        "status": "pretrained",
        "steps": result.steps,
        "stopped": result.stopped,
        "resumed_from": result.resumed_from,
        "pretrain_seconds": round(result.seconds, 1),
        "tiles": len(sample),
        "final_loss": result.losses[-1] if result.losses else None,
    }
    if registry.current_version() is not None:  # a version was trained meanwhile: its queue wins
        return {**summary, "queue": "kept (a trained version serves)"}
    with progress.phase("coverage"):
        device = torch_device(settings.device)
        with torch.no_grad():
            summary.update(push_coverage_queue(ls, pid, tasks, images, model, settings, device))
    summary["seconds"] = round(time.monotonic() - t0, 1)
    return summary


def save_pretrained(registry: ModelRegistry, model: Any, result: Any) -> None:
    """Write the weights the first fine-tuning starts from (``active_learning.plan.load_pretrained``), atomically."""
    import torch

    buf = io.BytesIO()
    torch.save({"hparams": dict(model.hparams), "state_dict": result.state_dict, "steps": result.steps,
                "stopped": result.stopped}, buf)  # fmt: skip
    write_atomic(pretrained_path(registry), buf.getvalue(), durable=True)


def coverage_queue(
    tasks: dict[int, dict], images: dict[int, np.ndarray], model: Any, settings: Settings, device: Any
) -> list[int]:
    """The first queue: audit tasks at their rate, the others in ``coverage_order(method="random")`` on the
    pretrained embeddings under the stack/feature exclusions (labelled tasks left out)."""
    from ml_backend.active_learning.audit import audit_every, audit_task_ids
    from ml_backend.active_learning.plan import batch_config, interleave_audit, positions_of
    from ml_backend.inference.scoring import embed_images
    from ml_backend.strategies.batch import coverage_order, thumbnail

    pool = [t for t in sorted(images) if not _labelled(tasks[t])]
    audit = [a for a in audit_task_ids(sorted(tasks), settings.audit_fraction, settings.seed) if a in set(pool)]
    rest = [t for t in pool if t not in set(audit)]
    order: list[int] = []
    if rest:
        emb = embed_images(model, [images[t] for t in rest], device)
        thumbs = np.stack([thumbnail(images[t]) for t in rest])  # the "auto" z radius is measured on them
        idx = coverage_order(emb, positions_of(rest, tasks), settings.train_batch_size, config=batch_config(settings),
                             seed=settings.seed, method="random", z_features=thumbs)  # fmt: skip
        order = [rest[i] for i in idx]
    return interleave_audit(order, audit, audit_every(settings.audit_fraction))


def push_coverage_queue(
    ls: Any, pid: int, tasks: dict[int, dict], images: dict[int, np.ndarray], model: Any, settings: Settings,
    device: Any,
) -> dict:  # fmt: skip
    """Replace the cold-start predictions (hash order, from /predict) by the coverage order: empty results, rank
    scores, the project's model_version set to the cold-start version."""
    from ml_backend.active_learning.plan import rank_scores
    from ml_backend.labelstudio.client import (
        LabelStudioError,
        delete_version_predictions,
        push_predictions,
        set_project_model_version,
    )

    order = coverage_queue(tasks, images, model, settings, device)
    if not order:
        return {"queue": "empty"}
    scores = rank_scores(order, order)
    try:
        deleted = delete_version_predictions(ls, pid, COLD_START_VERSION)
    except LabelStudioError as exc:  # older predictions stay; the new ones still order the queue (pushed last)
        log.warning("project %s: cold-start predictions not deleted (%s)", pid, exc)
        deleted = 0
    preds = [{"task": int(t), "result": [], "score": float(s), "model_version": COLD_START_VERSION}
             for t, s in zip(order, scores, strict=True)]  # fmt: skip
    push_predictions(ls, pid, preds)
    set_project_model_version(ls, pid, COLD_START_VERSION)
    log.info("project %s: first queue ordered for coverage (%d tasks, %d old cold-start predictions replaced)",
             pid, len(order), deleted)  # fmt: skip
    return {"queue": "coverage", "queued": len(order), "first": [int(t) for t in order[: settings.train_batch_size]]}


def _labelled(task: dict) -> bool:
    return any(not a.get("was_cancelled") for a in task.get("annotations") or [] if isinstance(a, dict))
