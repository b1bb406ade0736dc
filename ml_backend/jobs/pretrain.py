"""RQ job: the cold start of a project (issues 11, 18) — a spread first queue at once, self-supervised pretraining,
then a coverage-ordered first queue, every phase bounded by a setting rather than by the stack's size.

``pretrain_project(project_id)`` is enqueued after tiles are imported (``ml_backend.queue.scheduling
.schedule_pretraining``: the import command and the quick start). Its phases, each with its own progress (step,
steps, unit, ETA) in the job's meta (``phase``, ``progress``, ``phases``), which the status page shows:

0. skip when a trained version already serves (pretraining is for the first fine-tuning only);
1. ``spread``: unless the quick start already did it, publish the position-spread order
   (``active_learning.plan.cold_start_order``: farthest-first over stack, slice and field of view, audit tasks at
   their rate) as queue scores under the cold-start version, so that whoever labels before pretraining ends gets
   tiles spread over the stack, not tasks 1-20 (issue 18). ``publish_spread_queue`` is the same step for callers
   that do not wait for the worker (the quick start, right after its import);
2. ``read``: read the images of the first ``max(COLDSTART_EMBED_TILES, PRETRAIN_TILES)`` tasks of that spread order
   only (a bounded sample spread over the stack; never the whole stack);
3. ``pretrain``: a fresh U-Net of the project's architecture on a seeded sample of PRETRAIN_TILES of them
   (``training.pretrain``: masked-image + denoising reconstruction, SimMIM / Models Genesis), bounded by
   PRETRAIN_STEPS and PRETRAIN_TIME_BUDGET_S, checkpointed under ``<MODEL_DIR>/projects/<id>/pretrain/`` so a
   re-run resumes; it yields (stops early) once a training waits for it and it has run PRETRAIN_YIELD_AFTER_S: a
   labelled batch is worth more than more pretraining. The weights are written to ``pretrained.pt`` and the first
   training starts from them (``active_learning.plan.product_plan``);
4. ``embed`` and ``order``: the bottleneck embeddings of at most COLDSTART_EMBED_TILES unlabelled tiles (the spread
   sample), ordered by ``strategies.batch.coverage_order(method="random")`` under the stack/feature exclusions (on a
   stack with ~4% foreground TypiClust's typical tiles are background and did not beat random; random order with the
   exclusions on pretrained embeddings did); the other tasks follow in the spread order;
5. ``publish``: the order pushed as queue scores with an EMPTY result under the cold-start version (never masks from
   a model not trained on labels). Skipped when a training is already waiting for this job (its annotations came
   from the spread queue and its own queue replaces this one minutes later) or a version was trained meanwhile.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ml_backend.active_learning.audit import audit_task_ids
from ml_backend.active_learning.plan import batch_config, cold_start_order, positions_of, pretrained_path, rank_scores
from ml_backend.active_learning.project import ProjectData
from ml_backend.config import Settings, get_settings, torch_device
from ml_backend.inference.scoring import embed_images
from ml_backend.labelstudio.errors import LabelStudioError
from ml_backend.labelstudio.project_data import LabelStudioProject
from ml_backend.queue.coordination import run_exclusive
from ml_backend.queue.keys import decode, dirty_key, pending_key, queued_key
from ml_backend.queue.scheduling import WAITING_STATUSES, _job_status
from ml_backend.queue.status import JobProgress
from ml_backend.store.atomic import write_atomic
from ml_backend.store.registry import ModelRegistry
from ml_backend.strategies.batch import coverage_order, thumbnail
from ml_backend.training.pretrain import PretrainConfig, pretrain
from ml_backend.training.recipe import new_model

from .logs import ensure_logging

log = logging.getLogger(__name__)

COLD_START_VERSION = "cold-start"  # the same name /predict answers with before the first trained version
PHASES = ("spread", "read", "pretrain", "embed", "order", "publish")
EMBED_CHUNK = 32  # tiles per embedding progress report
PUBLISH_CHUNK = 200  # predictions per upload call and progress report


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
        return cold_start(pid, settings, progress, conn=conn)

    return run_exclusive(pid, settings, get_current_job(), body, force=False, reason="pretrain")


def _sample(ids: list[int], n: int, seed: int) -> list[int]:
    rng = np.random.default_rng([seed, 0x9E7])
    return sorted(rng.permutation(ids)[:n].tolist()) if len(ids) > n else list(ids)


def pretrain_config(settings: Settings, min_side: int) -> Any:
    return PretrainConfig(
        steps=settings.pretrain_steps,
        time_budget_s=settings.pretrain_time_budget_s,
        crop=max(8, min(settings.pretrain_crop, min_side)),
        seed=settings.seed,
        device=settings.device,
    )


class PhaseProgress:
    """One phase's own progress in the job's meta: ``progress = {step, steps, unit, seconds, eta_s}`` replaced at
    every phase (issue 18: the status page showed pretraining's last step and "ETA 9 s" through a 6-minute
    embedding), and ``phases`` = the cold start's phases with the done ones' durations."""

    def __init__(self, progress: JobProgress, name: str, total: int, unit: str, done: dict[str, float]) -> None:
        self.progress, self.name, self.total, self.unit, self.done = progress, name, int(total), unit, done
        self.t0 = time.monotonic()

    def report(self, step: int, *, eta_s: float | None = None, **extra: Any) -> None:
        """``step`` of ``total`` done; the ETA is ``eta_s`` when the phase knows better (pretraining: its time
        budget), else this phase's remaining time at its rate so far."""
        elapsed = time.monotonic() - self.t0
        eta = eta_s
        if eta is None and step > 0 and self.total >= step:
            eta = elapsed / step * (self.total - step)
        info = {"step": int(step), "steps": self.total, "unit": self.unit, "seconds": round(elapsed, 1),
                "eta_s": None if eta is None else round(eta, 1), **extra}  # fmt: skip
        self.progress.update(phase=self.name, progress=info, phases=self.phases())

    def phases(self) -> list[dict]:
        out = []
        for name in PHASES:
            state = "done" if name in self.done else "running" if name == self.name else "waiting"
            out.append({"name": name, "state": state, "seconds": self.done.get(name)})
        return out


@contextlib.contextmanager
def _phase(progress: JobProgress, done: dict[str, float], name: str, total: int, unit: str) -> Iterator[PhaseProgress]:
    tracker = PhaseProgress(progress, name, total, unit, done)
    with progress.phase(name):
        tracker.report(0)
        yield tracker
    done[name] = round(time.monotonic() - tracker.t0, 1)
    progress.update(phases=tracker.phases())  # this phase is done, with its duration


def _skip_rest(progress: JobProgress, done: dict[str, float]) -> None:
    """Mark the phases that will not run as skipped in the job's meta (the status page's phase list)."""
    states = [{"name": n, "state": "done" if n in done else "skipped", "seconds": done.get(n)} for n in PHASES]
    progress.update(phases=states)


def _pending_training(pid: int, settings: Settings, conn: Any) -> bool:
    """Whether a training waits for this job (enough annotations arrived, or it was asked for): then its queue,
    minutes away, replaces the cold start's, and pushing a coverage order first only delays it."""
    if conn is None:
        return False

    try:
        pending = int(conn.scard(pending_key(pid)))
        queued = decode(conn.get(queued_key(pid)))
        flagged = conn.get(dirty_key(pid)) is not None or (
            bool(queued) and _job_status(conn, queued) in WAITING_STATUSES
        )
    except Exception as exc:  # the queue state is advice here, never a reason to fail the cold start
        log.warning("project %s: queue state unreadable (%s); publishing the coverage order", pid, exc)
        return False
    return flagged or pending >= int(settings.train_batch_size)


def cold_start(
    pid: int, settings: Settings, progress: JobProgress | None = None, *, ls: Any = None, conn: Any = None
) -> dict:
    """Phases 0-5 of the module docstring; returns a JSON summary."""
    import torch

    progress = progress or JobProgress(None, pid)
    registry = ModelRegistry(settings.model_dir, pid)
    if registry.current_version() is not None:
        return {"status": "skipped", "reason": f"{registry.current_version()} serves already: nothing to pretrain"}
    t0 = time.monotonic()
    done: dict[str, float] = {}
    project = LabelStudioProject(pid, settings, ls)  # ProjectData: tasks, label config, model inputs, delivery
    config, _ = project.label_config()
    tasks = project.tasks()
    if not tasks:
        return {"status": "no-tasks"}
    unlabelled = [t for t in sorted(tasks) if not _labelled(tasks[t])]
    spread = cold_start_order(unlabelled, tasks, settings)
    summary: dict[str, Any] = {}
    with _phase(progress, done, "spread", len(spread), "tasks") as ph:
        if _spread_in_place(project, tasks, unlabelled):
            summary["spread"] = "in place"
        else:
            summary["spread"] = publish_order(project, spread, report=ph.report)
    audit = set(audit_task_ids(sorted(tasks), settings.audit_fraction, settings.seed))
    embed_ids = [t for t in spread if t not in audit][: settings.coldstart_embed_tiles]
    embedded, open_ = set(embed_ids), set(unlabelled)
    extra = [t for t in spread if t not in embedded] + [t for t in sorted(tasks) if t not in open_]
    read_ids = embed_ids + extra[: max(0, settings.pretrain_tiles - len(embed_ids))]
    offsets = settings.context_offset_list  # 2.5D context: the new model reads these slices as channels
    images: dict[int, np.ndarray] = {}
    with _phase(progress, done, "read", len(read_ids), "tiles") as ph:
        for i, tid in enumerate(read_ids, 1):
            try:
                images[tid] = project.model_input(tasks[tid], offsets)
            except Exception as exc:  # an unreadable tile is left out of pretraining and of the coverage sample
                log.warning("project %s: task %s not read for pretraining: %s", pid, tid, exc)
            if i % 16 == 0 or i == len(read_ids):
                ph.report(i)
    if not images:
        return {**summary, "status": "no-images", "tasks": len(tasks)}
    sample = _sample(sorted(images), settings.pretrain_tiles, settings.seed)
    model = new_model(settings, config.num_classes)
    cfg = pretrain_config(settings, min(min(images[t].shape[-2:]) for t in sample))
    folder = pretrained_path(registry).parent
    with _phase(progress, done, "pretrain", cfg.steps, "steps") as ph:
        def report(info: dict) -> None:
            ph.report(int(info["step"]), loss=info["loss"], eta_s=info.get("eta_s"))
            log.info("project %s: pretraining step %s/%s loss %.4f", pid, info["step"], info["steps"], info["loss"])

        def yield_to_training(elapsed: float) -> bool:  # a labelled batch waits: the first version comes first
            return elapsed >= settings.pretrain_yield_after_s and _pending_training(pid, settings, conn)

        result = pretrain(model, [images[t] for t in sample], cfg, checkpoint_path=folder / "checkpoint.pt",
                          progress=report, should_stop=yield_to_training)  # fmt: skip
        save_pretrained(registry, model, result)
    summary.update({
        "status": "pretrained",
        "steps": result.steps,
        "stopped": result.stopped,
        "resumed_from": result.resumed_from,
        "pretrain_seconds": round(result.seconds, 1),
        "tiles": len(sample),
        "final_loss": result.losses[-1] if result.losses else None,
    })  # fmt: skip
    if registry.current_version() is not None:  # a version was trained meanwhile: its queue wins
        _skip_rest(progress, done)
        return {**summary, "queue": "kept (a trained version serves)", "phases": done}
    if _pending_training(pid, settings, conn):
        _skip_rest(progress, done)
        return {**summary, "queue": "spread kept (a training waits: its queue comes next)", "phases": done}
    device = torch_device(settings.device)
    embed_images_ = {t: images[t] for t in embed_ids if t in images}
    with torch.no_grad():
        order = coverage_queue(tasks, embed_images_, model, settings, device, progress=progress, done=done)
    if registry.current_version() is not None:
        _skip_rest(progress, done)
        return {**summary, "queue": "kept (a trained version serves)", "phases": done}
    with _phase(progress, done, "publish", len(order), "tasks") as ph:
        summary.update(publish_order(project, order, report=ph.report))
    summary.update(queue="coverage", embedded=len(embed_images_), first=order[: settings.train_batch_size])
    log.info("project %s: first queue ordered for coverage (%d tasks, %d embedded)", pid, len(order),
             len(embed_images_))  # fmt: skip
    summary["seconds"] = round(time.monotonic() - t0, 1)
    summary["phases"] = done
    return summary


def save_pretrained(registry: ModelRegistry, model: Any, result: Any) -> None:
    """Write the weights the first fine-tuning starts from (``active_learning.plan.load_pretrained``), atomically."""
    import torch

    buf = io.BytesIO()
    torch.save({"hparams": dict(model.hparams), "state_dict": result.state_dict, "steps": result.steps,
                "stopped": result.stopped}, buf)  # fmt: skip
    write_atomic(pretrained_path(registry), buf.getvalue(), durable=True)


def coverage_queue(
    tasks: dict[int, dict],
    images: dict[int, np.ndarray],
    model: Any,
    settings: Settings,
    device: Any,
    *,
    progress: JobProgress | None = None,
    done: dict[str, float] | None = None,
) -> list[int]:
    """The first queue: the unlabelled tasks of ``images`` (the embedded sample) in ``coverage_order(method=
    "random")`` on the pretrained embeddings under the stack/feature exclusions, then every other unlabelled task
    in the spread order, audit tasks at their rate (``plan.cold_start_order``)."""
    progress = progress or JobProgress(None, 0)
    done = {} if done is None else done
    unlabelled = [t for t in sorted(tasks) if not _labelled(tasks[t])]
    audit = set(audit_task_ids(sorted(tasks), settings.audit_fraction, settings.seed))
    open_ = set(unlabelled)
    rest = [t for t in sorted(images) if t in open_ and t not in audit]
    head: list[int] = []
    if rest:
        chunks = []
        with _phase(progress, done, "embed", len(rest), "tiles") as ph:
            for start in range(0, len(rest), EMBED_CHUNK):
                part = rest[start : start + EMBED_CHUNK]
                chunks.append(embed_images(model, [images[t] for t in part], device, batch_size=16))
                ph.report(start + len(part))
        emb = np.concatenate(chunks, axis=0)
        with _phase(progress, done, "order", len(rest), "tiles") as ph:
            thumbs = np.stack([thumbnail(images[t]) for t in rest])  # the "auto" z radius is measured on them
            idx = coverage_order(emb, positions_of(rest, tasks), settings.train_batch_size,
                                 config=batch_config(settings), seed=settings.seed, method="random",
                                 z_features=thumbs)  # fmt: skip
            head = [rest[i] for i in idx]
            ph.report(len(rest))
    return cold_start_order(unlabelled, tasks, settings, head=head)


def publish_order(project: ProjectData, order: list[int], *, report: Any = None) -> dict:
    """Replace the project's cold-start predictions by ``order`` as queue scores (rank / n, lower = served first,
    EMPTY results) and set its ``model_version`` to the cold-start version. Uploaded in served order, so while it
    runs the tasks already pushed are the first ones of the queue."""
    if not order:
        return {"queue": "empty"}
    scores = rank_scores(order, order)
    try:
        deleted = project.delete_version(COLD_START_VERSION)
    except LabelStudioError as exc:  # older predictions stay; the new ones still order the queue (pushed last)
        log.warning("project %s: cold-start predictions not deleted (%s)", project.pid, exc)
        deleted = 0
    preds = [{"task": int(t), "result": [], "score": float(s), "model_version": COLD_START_VERSION}
             for t, s in zip(order, scores, strict=True)]  # fmt: skip
    for start in range(0, len(preds), PUBLISH_CHUNK):
        project.push_predictions(preds[start : start + PUBLISH_CHUNK])
        if start == 0:  # the head of the queue is in: make Label Studio order by it now
            project.set_model_version(COLD_START_VERSION)
        if report is not None:
            report(min(len(preds), start + PUBLISH_CHUNK))
    return {"queued": len(order), "replaced": deleted}


def publish_spread_queue(ls: Any, pid: int, settings: Settings) -> dict:
    """Publish the position-spread order of the project's unlabelled tasks at once (seconds, no image read, no
    model): what the quick start calls right after importing, so that the first batch is worth labelling before
    the cold start's worker even starts. The cold start's first phase skips it when it is in place. ``ls``: an SDK
    client (None: connect with ``settings``); the project is read and written through its ``ProjectData``."""
    registry = ModelRegistry(settings.model_dir, pid)
    if registry.current_version() is not None:
        return {"queue": "kept (a trained version serves)"}
    project = LabelStudioProject(pid, settings, ls)
    tasks = project.tasks()
    order = cold_start_order([t for t in sorted(tasks) if not _labelled(tasks[t])], tasks, settings)
    return {**publish_order(project, order), "first": order[: settings.train_batch_size]}


def _spread_in_place(project: ProjectData, tasks: dict[int, dict], unlabelled: list[int]) -> bool:
    """Whether every unlabelled task holds exactly one cold-start prediction and the project orders by it."""
    if project.model_version() != COLD_START_VERSION:
        return False
    for t in unlabelled:
        preds = [p for p in tasks[t].get("predictions") or [] if isinstance(p, dict)]
        if sum(1 for p in preds if p.get("model_version") == COLD_START_VERSION) != 1:
            return False
    return True


def _labelled(task: dict) -> bool:
    return any(not a.get("was_cancelled") for a in task.get("annotations") or [] if isinstance(a, dict))
