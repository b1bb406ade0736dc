"""RQ jobs: fine-tune a project's model from Label Studio's annotations, publish it, re-score the unlabelled pool.

``train_project(project_id)`` is what the webhook enqueues (JSON arguments only). Its steps, in order:

1. take the project's training lock (one training per project across all workers; a job that finds another one
   running sets the follow-up flag and returns), reset the webhook batch counter, then re-read EVERY task and its
   latest submitted annotation from Label Studio (the source of truth, so missed webhooks never lose a batch);
2. decode brush RLE masks (size checked against the image; a bad annotation is logged and skipped, never fatal);
3. fine-tune the current version (or a new U-Net the first time) with ``ml_backend.training.fine_tune``;
4. publish + promote the version atomically in the registry with its metadata, prune old versions;
5. re-score every unlabelled task with the project's strategy in chunks that idle workers share
   (``rescore_chunk`` jobs; the coordinator works through the chunks too, so one worker is enough), select over the
   whole pool (batch strategies need it), push predictions (mask, score, model_version) in bulk, and set the
   project's ``model_version`` so Label Studio orders its queue by the new scores.

Steps 3-5 are ``ml_backend.active_learning.run_round`` (the benchmark runs the same round with a ground-truth
oracle) with this module's plug-ins: ``AnnotatedTasks`` (labels), ``RegistryPublisher``, ``RedisPoolScorer``
and ``LabelStudioSink``. The project is read and written through ONE ``ProjectData``
(``labelstudio.project_data.LabelStudioProject``): tasks, annotations, label config, every model input (labelled
tiles, calibration and unlabelled crops, the re-scoring chunks' loaders handed to ``queue.rescoring``), delivery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml_backend.active_learning import LabelledSet, RoundPlan, TrainingError, run_round
from ml_backend.active_learning.audit import AuditGate, audit_task_ids, split_audit
from ml_backend.active_learning.candidates import (
    CandidateSampler,
    PredictionAgeLog,
    phase_candidate_pool,
    previous_best,
)
from ml_backend.active_learning.plan import log_plan, product_plan, product_selector
from ml_backend.active_learning.publisher import KeepVersion, RegistryPublisher
from ml_backend.config import Settings, get_settings, torch_device
from ml_backend.data.context import model_offsets
from ml_backend.inference.scoring import ScoringConfig
from ml_backend.labelstudio.annotations import annotation_signature, decode_annotations
from ml_backend.labelstudio.effort import measure_annotations
from ml_backend.labelstudio.loop import AnnotatedTasks, LabelStudioSink
from ml_backend.labelstudio.neighbours import NeighbourIndex
from ml_backend.labelstudio.project_data import LabelStudioProject
from ml_backend.labelstudio.tasks import calibration_crops
from ml_backend.queue.coordination import run_exclusive
from ml_backend.queue.locks import mark_dirty, take_pending
from ml_backend.queue.rescoring import RedisPoolScorer
from ml_backend.queue.status import JobProgress
from ml_backend.store.effort import EffortLog
from ml_backend.store.registry import ModelRegistry
from ml_backend.strategies.resolve import project_strategy  # THE lookup (also imported from here by jobs/backlog)
from ml_backend.training.recipe import ModelState

from .logs import ensure_logging

log = logging.getLogger(__name__)


def train_project(project_id: int, force: bool = False, reason: str = "manual") -> dict:
    """RQ entry point: train project ``project_id`` from everything Label Studio holds, then re-score its pool.

    Returns a JSON summary (status trained | up-to-date | deferred | no-annotations). Runs outside RQ too
    (``python -c 'from ml_backend.jobs import train_project; train_project(1, force=True)'``).
    """
    from rq import get_current_job

    ensure_logging()
    settings = get_settings()
    pid = int(project_id)
    job = get_current_job()

    def body(force: bool, progress: JobProgress, conn: Any, job_id: str) -> dict:
        return _train_and_rescore(pid, settings, conn, progress, force=force, reason=reason, job_id=job_id)

    return run_exclusive(pid, settings, job, body, force=bool(force), reason=reason)


@dataclass
class ProjectSnapshot:
    """What the job read from Label Studio and the registry, once, at its start (Label Studio is the truth)."""

    project: LabelStudioProject
    config: Any
    label_xml: str
    tasks: dict[int, dict]
    annotations: dict[int, dict]
    current: dict | None
    signature: str

    @property
    def unlabelled(self) -> list[int]:
        return sorted(tid for tid in self.tasks if tid not in self.annotations)

    def neighbours(self) -> NeighbourIndex:
        """Every task's tile by stack, window and slice (2.5D context), built once per job."""
        return self.project.neighbours()

    def load(self, offsets: tuple[int, ...]) -> Callable[[dict], np.ndarray]:
        """task -> model input with the slices ``offsets`` (``ProjectData.model_input``)."""
        return lambda task: self.project.model_input(task, offsets)


def _read_project(pid: int, settings: Settings, conn: Any, registry: ModelRegistry) -> ProjectSnapshot:
    """Reset the batch counter, then read the label config, every task and its latest annotation."""
    pending = take_pending(conn, pid)
    t0 = time.monotonic()
    project = LabelStudioProject(pid, settings)
    config, label_xml = project.label_config()
    tasks = project.tasks()
    annotations = project.latest_annotations()
    current = registry.current_meta()
    snap = ProjectSnapshot(project, config, label_xml, tasks, annotations, current, annotation_signature(annotations))
    log.info(
        "project %s: Label Studio holds %d tasks, %d with a submitted annotation (listed in %.1f s); current version "
        "%s used %d; %d submissions counted by webhooks since the last job",
        pid, len(tasks), len(annotations), time.monotonic() - t0, None if current is None else current["version"],
        0 if current is None else int(current.get("n_annotations", 0)), pending,
    )  # fmt: skip
    return snap


def _nothing_to_do(pid: int, snap: ProjectSnapshot, force: bool) -> tuple[dict | None, bool]:
    """(summary to return at once or None, resume): resume = re-deliver the current version instead of training
    (its job died or failed after publishing, before every prediction reached Label Studio)."""
    if not snap.annotations:
        log.warning("project %s: no submitted annotation in Label Studio: nothing to train", pid)
        return {"status": "no-annotations", "tasks": len(snap.tasks)}, False
    current = snap.current
    if force or current is None or current.get("annotation_signature") != snap.signature:
        return None, False
    if _delivered(snap.project, current["version"], snap.tasks, snap.annotations):
        log.info("project %s: annotations unchanged since %s: nothing to train", pid, current["version"])
        return {"status": "up-to-date", "version": current["version"]}, False
    log.warning(
        "project %s: %s is current but its predictions were not all delivered to Label Studio (the job that "
        "trained it died or failed while re-scoring or uploading): finishing that instead of training",
        pid, current["version"],
    )  # fmt: skip
    return None, True


def _decode(pid: int, snap: ProjectSnapshot, settings: Settings, offsets: tuple[int, ...] = (0,)) -> LabelledSet:
    """The usable labelled tiles (a bad annotation is skipped and listed, never fatal, unless none is usable);
    ``offsets`` other than (0,): (C, H, W) images with the neighbouring slices (2.5D context, CONTEXT_OFFSETS)."""
    t0 = time.monotonic()
    tiles, skipped = decode_annotations(snap.tasks, snap.annotations, snap.config, snap.load(offsets))
    log.info("project %s: %d annotated tiles decoded in %.1f s (%d skipped)", pid, len(tiles), time.monotonic() - t0,
             len(skipped))  # fmt: skip
    if not tiles:
        first = "; ".join(f"task {s['task']}: {s['error']}" for s in skipped[:3])
        raise TrainingError(f"project {pid}: none of the {len(snap.annotations)} annotations is usable ({first})")
    return LabelledSet(tiles, skipped)


def _resume_plan(
    registry: ModelRegistry, snap: ProjectSnapshot, strategy: Any, settings: Settings, progress: JobProgress
) -> tuple[RoundPlan, KeepVersion]:
    """Plan + publisher that re-deliver the current version (model and stored bootstrap members), nothing trained."""
    device = torch_device(settings.device)
    model, meta = registry.load(snap.current["version"], map_location=device)
    stored = [registry.load_extra(meta["version"], n, map_location=device) for n in meta.get("extra_models", [])]
    state = ModelState(model, meta["version"], "kept", stored)
    plan = RoundPlan(strategy, state, scoring=ScoringConfig.from_settings(settings), score_seed=settings.seed,
                     select_seed=settings.seed, candidates=CandidateSampler.from_settings(settings))  # fmt: skip
    return plan, KeepVersion(meta["version"], meta, announce=progress.published)


def _train_and_rescore(
    pid: int, settings: Settings, conn: Any, progress: JobProgress, *, force: bool, reason: str, job_id: str
) -> dict:
    """Read the project, then one ``run_round`` with Label Studio's plug-ins (see the module docstring)."""
    registry = ModelRegistry(settings.model_dir, pid)
    with progress.phase("read"):
        snap = _read_project(pid, settings, conn, registry)
        done, resume = _nothing_to_do(pid, snap, force)
        if done is not None:
            return done
        strategy = project_strategy(pid, settings)
        # The input slices of the model this round uses: the stored version's when re-delivering it, else
        # CONTEXT_OFFSETS (training.recipe.initial_model starts a new model when the stored one reads others).
        offsets = model_offsets((snap.current or {}).get("hparams") or {}) if resume else settings.context_offset_list
        labelled = _decode(pid, snap, settings, offsets)
    audit = audit_task_ids(sorted(snap.tasks), settings.audit_fraction, settings.seed)
    _record_effort(pid, snap, settings, labelled, audit)  # before the sink prunes the predictions it compares with
    train_tiles, audit_tiles = split_audit(labelled.tiles, set(audit))
    if not train_tiles and not resume:
        raise TrainingError(f"project {pid}: every usable annotation is on an audit task (kept out of training)")
    labelled = LabelledSet(train_tiles, labelled.skipped)
    evaluate = None
    select = product_selector(
        settings,
        snap.config.num_classes,
        snap.tasks,
        sorted(snap.annotations),
        [a for a in audit if a not in snap.annotations],
    )
    if resume:
        plan, publisher = _resume_plan(registry, snap, strategy, settings, progress)
    else:
        if settings.audit_fraction > 0:  # AUDIT_FRACTION=0: no audit split, every version is promoted
            evaluate = AuditGate(audit_tiles, lambda: _live(registry), settings, settings.audit_min_tiles,
                                 settings.promotion_tolerance)  # fmt: skip
        calibration = lambda: calibration_crops(snap.tasks, settings, snap.load(offsets))  # noqa: E731
        pool = [t for t in snap.unlabelled if t not in set(audit)]  # audit tiles stay unseen, even unlabelled
        unlabelled = lambda: unlabelled_crops({t: snap.tasks[t] for t in pool}, settings, snap.load(offsets))  # noqa: E731
        # The live ranking's top still unlabelled: kept in this round's candidate sample (issue 20.2).
        best = previous_best(snap.tasks, snap.annotations, (snap.current or {}).get("version"), settings.candidate_keep)
        # While batches are random draws, a smaller candidate sample (issue 18: the first version within minutes).
        sample = phase_candidate_pool(settings, select, len(snap.annotations))
        plan = product_plan(registry, snap.config, settings.replace(candidate_pool=sample), strategy,
                            calibration=calibration, progress=progress.train_step, unlabelled=unlabelled,
                            previous_best=best)  # fmt: skip
        log_plan(registry, plan, len(labelled.tiles))
        extra = {"annotation_signature": snap.signature, "skipped": labelled.skipped, "trigger": reason, "job": job_id}
        publisher = RegistryPublisher(
            registry, snap.config, settings, strategy, {**extra, "project": pid}, announce=progress.published
        )
    outcome = run_round(
        plan,
        AnnotatedTasks(labelled, snap.unlabelled),
        publisher=publisher,
        scorer=RedisPoolScorer(pid, snap.label_xml, snap.project.chunk_inputs(), settings, conn,
                               progress=progress.phase_step),  # fmt: skip
        select=select,
        sink=LabelStudioSink(snap.project, blank=frozenset(audit)),
        evaluate=evaluate,
        phase=progress.phase,
    )
    version, meta = outcome.version, publisher.meta
    evaluation = outcome.evaluation
    if not evaluation.promote:
        progress.update(promotion={"version": version, "promoted": False, "reason": evaluation.reason})
        log.warning("project %s: %s trained but %s", pid, version, evaluation.reason)
        return {
            "status": "not-promoted",
            "version": version,
            "live_version": registry.current_version(),
            "promoted": False,
            "promotion": {"promoted": False, "reason": evaluation.reason},
            "audit": evaluation.meta.get("audit"),
            "metrics": meta.get("metrics"),
            "n_annotations": len(labelled.tiles),
            "audit_annotations": len(audit_tiles),
            "skipped": len(labelled.skipped),
            "predictions": 0,
        }
    if evaluation.reason:
        progress.update(promotion={"version": version, "promoted": True, "reason": evaluation.reason})
    continued = _continue_first_version(pid, conn, meta)
    _record_prediction_age(pid, snap, settings, outcome)
    log.info("project %s: %d predictions of %s uploaded; project model_version set", pid, outcome.delivered, version)
    return {
        "promoted": True,
        "promotion": {"promoted": True, "reason": evaluation.reason},
        "audit": evaluation.meta.get("audit"),
        "audit_annotations": len(audit_tiles),
        "status": "delivered" if resume else "trained",
        "version": version,
        "metrics": meta.get("metrics"),
        "n_annotations": len(labelled.tiles),
        "skipped": len(labelled.skipped),
        "predictions": outcome.delivered,
        "candidates": {"pool": outcome.pool_size, "scored": 0 if outcome.scored is None else len(outcome.scored.ids)},
        "train_tiles_per_s": (meta.get("metrics") or {}).get("tiles_per_s"),
        "continued": continued,
    }


def _continue_first_version(pid: int, conn: Any, meta: dict) -> bool:
    """A first version (no parent) the clock stopped (FIRST_VERSION_TIME_BUDGET_S) short of its steps is live early;
    ask for one follow-up training on the same labels (the job's follow-up flag, forced: the annotations did not
    change), which fine-tunes it. Read from the version's metadata alone. True when asked."""
    metrics = meta.get("metrics") or {}
    if meta.get("parent") is not None or metrics.get("stopped") != "time_budget":
        return False
    mark_dirty(conn, pid, force=True)
    planned = ((meta.get("hyper_parameters") or {}).get("train") or {}).get("steps")
    log.info("project %s: first version %s stopped by its time budget after %s of %s steps: a follow-up training "
             "continues it", pid, meta.get("version"), meta.get("steps"), planned)  # fmt: skip
    return True


def unlabelled_crops(
    tasks: dict[int, dict], settings: Settings, load: Callable[[dict], np.ndarray]
) -> list[np.ndarray]:
    """TRAIN_CROP crops of a seeded sample of SEMI_UNLABELLED_TILES of ``tasks`` (the unlabelled pool) for the
    semi-supervised term; the same sampler as the BatchNorm calibration crops, another count. ``load``: the
    project's model input (``ProjectData.model_input``)."""
    sample = settings.replace(bn_calibration_tiles=settings.semi_unlabelled_tiles)
    return calibration_crops(tasks, sample, load)


def _record_effort(
    pid: int, snap: ProjectSnapshot, settings: Settings, labelled: LabelledSet, audit: list[int]
) -> None:
    """Measure each annotation not measured yet against the pre-annotation it was made from and append the records
    to MODEL_DIR/projects/<id>/effort.jsonl (issue 17.6, the status page's effort curve). Never fails the job."""
    try:
        store = EffortLog(settings.model_dir, pid)
        sizes = {t.task_id: (int(t.image.shape[-2]), int(t.image.shape[-1])) for t in labelled.tiles}
        records = measure_annotations(snap.tasks, snap.annotations, snap.config, sizes=sizes, audit=audit,
                                      measured=store.measured_keys())  # fmt: skip
        written = store.append(records)
    except Exception as exc:  # the effort record is a report: it must never cost a training
        log.warning("project %s: annotation effort not recorded: %s: %s", pid, type(exc).__name__, exc)
        return
    skipped = sum(1 for r in records if r.get("skipped"))
    log.info("project %s: annotation effort of %d new annotation(s) recorded (%d not measurable)", pid, written,
             skipped)  # fmt: skip


def _record_prediction_age(pid: int, snap: ProjectSnapshot, settings: Settings, outcome: Any) -> None:
    """How old each unlabelled task's prediction is after this delivery (issue 20.2: tiles outside the candidate
    sample keep their last one), for the status page. A report: never fails the job."""
    if outcome.scored is None or not outcome.delivered:
        return
    try:
        rec = PredictionAgeLog(settings.model_dir, pid).record(
            snap.tasks, snap.annotations, outcome.version, outcome.scored.ids, pool=outcome.pool_size,
            candidate_pool=settings.candidate_pool,
        )  # fmt: skip
    except Exception as exc:
        log.warning("project %s: prediction age not recorded: %s: %s", pid, type(exc).__name__, exc)
        return
    log.info("project %s: prediction age of the %d unlabelled tasks: %s", pid, outcome.pool_size, rec["ages"])


def _live(registry: ModelRegistry) -> tuple[Any, str] | None:
    """The live version's model (what the audit gate compares a new version with), None before the first one."""
    current = registry.load_current()
    return None if current is None else (current[0], current[1]["version"])


def _delivered(project: Any, version: str, tasks: dict[int, dict], annotations: dict[int, dict]) -> bool:
    """Whether the job that published ``version`` finished its upload: the project's ``model_version`` names it
    (set last, after every prediction), or there is no unlabelled task to predict."""
    if all(tid in annotations for tid in tasks):
        return True
    return project.model_version() == version
