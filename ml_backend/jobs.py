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
and ``LabelStudioSink``. The pure part (annotations -> masks -> fine_tune -> publish) is
``decode_annotations`` + ``train_version``: they take
plain data and a registry, so they are tested without Label Studio or Redis.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend import queue as q
from ml_backend.active_learning import (
    LabelledSet,
    LabelledTile,
    QueueOrder,
    RoundPlan,
    ScoredPool,
    TrainingError,
    run_round,
)
from ml_backend.active_learning.plan import log_plan, product_plan
from ml_backend.config import Settings, get_settings, torch_device
from ml_backend.inference.scoring import PoolScores, ScoringConfig, embed_images
from ml_backend.labelstudio.annotations import annotation_signature, decode_annotations, task_image_url
from ml_backend.labelstudio.loop import AnnotatedTasks, LabelStudioSink, predictions_for, score_tiles
from ml_backend.labelstudio.tasks import calibration_crops, load_task_image
from ml_backend.registry import ModelRegistry
from ml_backend.store.publisher import KeepVersion, RegistryPublisher
from ml_backend.training.recipe import (
    ENSEMBLE_MEMBERS,
    ModelState,
    TrainedModel,
    initial_model,
    train_config,
    train_ensemble,
)

__all__ = [  # what lives in the packages of its concept, re-exported for callers of jobs (and queued job paths)
    "ENSEMBLE_MEMBERS",
    "AnnotatedTasks",
    "KeepVersion",
    "LabelStudioSink",
    "LabelledTile",
    "RegistryPublisher",
    "TrainingError",
    "annotation_signature",
    "calibration_crops",
    "decode_annotations",
    "embed_images",
    "initial_model",
    "load_task_image",
    "product_plan",
    "score_tiles",
    "task_image_url",
    "train_config",
    "train_ensemble",
]

log = logging.getLogger(__name__)

CHUNK_CLAIM_TTL_S = 300  # a helper killed mid-chunk frees its chunk after this long; the coordinator redoes it
RESCORE_TTL_S = 24 * 3600
RESCORE_WAIT_S = 3600.0


class ProjectNotFound(TrainingError):
    """Label Studio answers 404 for the project (or the id is out of range): no retry can help, so the job fails at
    once instead of being retried (``run_exclusive`` sets ``retries_left = 0``)."""


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status behind a Label Studio error (the SDK's ApiError is its cause)."""
    for err in (exc, exc.__cause__):
        status = getattr(err, "status_code", None)
        if isinstance(status, int):
            return status
    return None


@dataclass
class TrainOutcome:
    version: str
    meta: dict
    model: Any
    ensemble: list[Any] = field(default_factory=list)


def train_version(
    registry: ModelRegistry,
    tiles: list[LabelledTile],
    config: Any,
    settings: Settings,
    *,
    strategy: Any = None,
    progress: Callable[[dict], None] | None = None,
    extra_meta: dict | None = None,
    train_overrides: dict | None = None,
    calibration: Callable[[], list[np.ndarray]] | None = None,
) -> TrainOutcome:
    """Fine-tune on ``tiles``, publish + promote the version with full metadata, prune old versions.

    Pure with respect to Label Studio and Redis (the tested core of the training job): ``run_round`` without the
    scoring half. When the strategy needs a bootstrap ensemble (suggestive annotation), ENSEMBLE_MEMBERS copies are
    fine-tuned on resamples and stored with the version. ``calibration()`` returns unlabelled crops of the project
    that re-estimate BatchNorm statistics; it is called only for a model that has BatchNorm layers.
    """
    if not tiles:
        raise TrainingError("no usable annotated tile to train on")
    plan = product_plan(
        registry, config, settings, strategy, train_overrides=train_overrides, calibration=calibration,
        progress=progress, score=False,
    )  # fmt: skip
    log_plan(registry, plan, len(tiles))
    publisher = RegistryPublisher(registry, config, settings, strategy, extra_meta)
    outcome = run_round(plan, AnnotatedTasks(LabelledSet(tiles), []), publisher=publisher)
    return TrainOutcome(outcome.version, publisher.meta, outcome.trained.model, outcome.trained.ensemble)


def _pack_summary(summary: dict[str, np.ndarray], pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, __pixels__=pixels, **summary)
    return buf.getvalue()


def _unpack_summary(data: bytes) -> tuple[dict[str, np.ndarray], np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    pixels = arrays.pop("__pixels__")
    return arrays, pixels


# ---------------------------------------------------------------------- Label Studio glue
def project_label_config(ls: Any, project_id: int, settings: Settings) -> tuple[Any, str]:
    """(BrushConfig, XML): the project's label config from Label Studio, else the one /setup stored."""
    from ml_backend.labelstudio.client import LabelStudioError, call
    from ml_backend.labelstudio.labelconfig import parse_label_config

    xml = None
    try:
        project = call(ls, ls.projects.get, id=int(project_id), what=f"reading project {project_id}")
        xml = getattr(project, "label_config", None)
    except LabelStudioError as exc:  # e.g. no permission on the project: fall back to the stored /setup config
        if _http_status(exc) == 404:
            raise ProjectNotFound(f"project {project_id} does not exist in Label Studio (HTTP 404): {exc}") from exc
        log.warning("project %s: cannot read the label config from Label Studio: %s", project_id, exc)
    stored = Path(settings.model_dir) / "projects" / str(project_id) / "label_config.xml"  # written by /setup
    if not xml and stored.is_file():
        xml = stored.read_text()
    if not xml:
        raise TrainingError(f"project {project_id}: no label config (neither in Label Studio nor stored by /setup)")
    return parse_label_config(xml), xml


def project_strategy(project_id: int, settings: Settings) -> Any:
    """The project's acquisition strategy: the one stored by /setup (extra_params), else STRATEGY (one resolver and
    one error policy for /setup, /predict and the jobs: ``strategies.resolve``)."""
    from ml_backend.strategies.resolve import resolve_strategy

    name, params = None, None
    state = Path(settings.model_dir) / "projects" / str(project_id) / "state.json"
    if state.is_file():
        try:
            stored = json.loads(state.read_text())
            name, params = stored.get("strategy"), stored.get("strategy_params")
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("project %s: unreadable %s (%s); using STRATEGY=%s", project_id, state, exc, settings.strategy)
    return resolve_strategy(name, params, default_name=settings.strategy, default_aggregation=settings.aggregation)


# ---------------------------------------------------------------------- the RQ jobs
class _Progress:
    """Job progress into ``job.meta`` (visible to `cli status` and rq dashboards) and into the worker's log."""

    def __init__(self, job: Any, project_id: int) -> None:
        self.job, self.project_id = job, project_id
        self.timings: dict[str, float] = {}

    def update(self, **fields: Any) -> None:
        if self.job is None:
            return
        self.job.meta.update(fields)
        with contextlib.suppress(Exception):  # progress must never kill the training
            self.job.save_meta()

    def published(self, version: str, meta: dict) -> None:
        """The round's version is live: `cli status` shows it (and its metrics) while the pool is re-scored."""
        self.update(version=version, metrics=meta.get("metrics"))
        log.info(
            "project %s: serving %s, val IoU %s", self.project_id, version, (meta.get("metrics") or {}).get("val_iou")
        )

    def train_step(self, info: dict) -> None:
        self.update(phase="train", progress=info)
        val = info.get("val_iou")
        log.info(
            "project %s: step %s/%s loss %.4f val IoU %s",
            self.project_id, info.get("step"), info.get("steps"), info.get("loss") or float("nan"),
            "n/a" if val is None else f"{val:.4f}",
        )  # fmt: skip

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.update(phase=name)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.timings[f"{name}_s"] = round(time.monotonic() - t0, 3)
            self.update(timings=self.timings)


def _ensure_logging() -> None:
    """`rq worker` configures only its own logger: give the backend's loggers a handler so training progress shows
    in the worker's output (unless the application configured logging itself)."""
    pkg = logging.getLogger("ml_backend")
    if logging.getLogger().handlers or pkg.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)


def _redis_for_job(job: Any, settings: Settings):
    if job is not None:
        return job.connection
    return q.get_connection(settings.redis_url, socket_timeout=10.0)


def train_project(project_id: int, force: bool = False, reason: str = "manual") -> dict:
    """RQ entry point: train project ``project_id`` from everything Label Studio holds, then re-score its pool.

    Returns a JSON summary (status trained | up-to-date | deferred | no-annotations). Runs outside RQ too
    (``python -c 'from ml_backend.jobs import train_project; train_project(1, force=True)'``).
    """
    from rq import get_current_job

    _ensure_logging()
    settings = get_settings()
    pid = int(project_id)
    job = get_current_job()

    def body(force: bool, progress: _Progress, conn: Any, job_id: str) -> dict:
        return _train_and_rescore(pid, settings, conn, progress, force=force, reason=reason, job_id=job_id)

    return run_exclusive(pid, settings, job, body, force=bool(force), reason=reason)


def run_exclusive(
    pid: int,
    settings: Settings,
    job: Any,
    body: Callable[[bool, _Progress, Any, str], dict],
    *,
    force: bool,
    reason: str,
    conn: Any = None,
    job_id: str | None = None,
) -> dict:
    """The coordination around one training: queued slot, per-project lock + heartbeat, follow-up flag.

    A job that finds another training of the project running marks the follow-up flag and returns "deferred"; the
    running job, when it ends (success or failure), schedules exactly one follow-up if the flag is set. Separate
    from the training itself so the protocol is tested with a real Redis and no Label Studio.
    """
    job_id = job_id or (job.id if job is not None else f"local-{uuid.uuid4().hex[:12]}")
    if not q.valid_id(pid):
        if job is not None:
            job.retries_left = 0
        raise ProjectNotFound(f"project id must be an integer in 1..{q.MAX_ID}, got {pid!r}")
    conn = conn if conn is not None else _redis_for_job(job, settings)
    q.release_queued_slot(conn, pid, job_id)
    force = force or q.take_force_flag(conn, pid, job_id)
    while not q.acquire_training_lock(conn, pid, job_id):
        other = q.running_job(conn, pid)
        q.mark_dirty(conn, pid, force=force)
        if q.running_job(conn, pid) is not None:
            log.info("project %s: training %s is running; %s becomes its follow-up", pid, other, job_id)
            return {"status": "deferred", "project": pid, "running": other}
        q.take_dirty(conn, pid)  # the other job ended between our two looks: nobody will read the flag, run now
    progress = _Progress(job, pid)
    summary: dict[str, Any] = {"project": pid, "job": job_id, "reason": reason, "force": force}
    try:
        with q.LockHeartbeat(conn, pid, job_id):
            summary.update(body(force, progress, conn, job_id))
        summary["timings"] = progress.timings
        q.record_job(conn, pid, {**summary, "finished": time.time()})
        return summary
    except Exception as exc:
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}", timings=progress.timings)
        if isinstance(exc, ProjectNotFound) and job is not None:
            job.retries_left = 0  # RQ reads this when the job raises: straight to the failed registry, no retry
        with contextlib.suppress(Exception):
            q.record_job(conn, pid, {**summary, "finished": time.time()})
            if job is not None and (job.retries_left or 0) > 0:
                conn.set(q.key(pid, "queued"), job_id, nx=True, ex=q.QUEUED_TTL_S)  # new events join the retry
        log.error("project %s: training job %s failed: %s", pid, job_id, summary["error"])
        raise
    finally:
        q.release_training_lock(conn, pid, job_id)
        follow = q.take_dirty(conn, pid)
        if follow:
            try:
                out = q.schedule_training(
                    pid, settings, reason="follow-up of events during training", force=follow == "force",
                    connection=conn,
                )  # fmt: skip
                log.info("project %s: follow-up training %s (%s)", pid, out.get("job_id"), out.get("status"))
            except Exception as exc:  # the next webhook or START_TRAINING re-reads everything anyway
                log.error("project %s: could not schedule the follow-up training: %s", pid, exc)


def _train_and_rescore(
    pid: int, settings: Settings, conn: Any, progress: _Progress, *, force: bool, reason: str, job_id: str
) -> dict:
    from ml_backend.labelstudio.client import (
        connect,
        latest_annotations,
        list_tasks,
    )

    registry = ModelRegistry(settings.model_dir, pid)
    with progress.phase("read"):
        pending = q.take_pending(conn, pid)
        t0 = time.monotonic()
        ls = connect(settings)
        config, label_xml = project_label_config(ls, pid, settings)
        tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
        t_list = time.monotonic() - t0
        annotations = {int(k): v for k, v in latest_annotations(list(tasks.values())).items()}
        current = registry.current_meta()
        signature = annotation_signature(annotations)
        used = 0 if current is None else int(current.get("n_annotations", 0))
        log.info(
            "project %s: Label Studio holds %d tasks, %d with a submitted annotation; current version %s used %d; "
            "%d submissions counted by webhooks since the last job",
            pid, len(tasks), len(annotations), None if current is None else current["version"], used, pending,
        )  # fmt: skip
        if not annotations:
            log.warning("project %s: no submitted annotation in Label Studio: nothing to train", pid)
            return {"status": "no-annotations", "tasks": len(tasks)}
        resume = False
        if not force and current is not None and current.get("annotation_signature") == signature:
            if _delivered(ls, pid, current["version"], tasks, annotations):
                log.info("project %s: annotations unchanged since %s: nothing to train", pid, current["version"])
                return {"status": "up-to-date", "version": current["version"]}
            resume = True  # the job that made it died or failed after publishing: deliver its predictions now
            log.warning(
                "project %s: %s is current but its predictions were not all delivered to Label Studio (the job that "
                "trained it died or failed while re-scoring or uploading): finishing that instead of training",
                pid, current["version"],
            )  # fmt: skip
        strategy = project_strategy(pid, settings)
        t0 = time.monotonic()
        tiles, skipped = decode_annotations(tasks, annotations, config, lambda t: load_task_image(t, config, settings))
        log.info(
            "project %s: tasks listed in %.1f s; %d annotated tiles decoded in %.1f s (%d skipped)",
            pid, t_list, len(tiles), time.monotonic() - t0, len(skipped),
        )  # fmt: skip
        if not tiles:
            first = "; ".join(f"task {s['task']}: {s['error']}" for s in skipped[:3])
            raise TrainingError(f"project {pid}: none of the {len(annotations)} annotations is usable ({first})")
    if resume:
        model, meta = registry.load(current["version"], map_location=torch_device(settings.device))
        stored = [registry.load_extra(meta["version"], n, map_location=torch_device(settings.device))
                  for n in meta.get("extra_models", [])]  # fmt: skip
        plan = RoundPlan(
            strategy, ModelState(model, meta["version"], "kept", stored), scoring=ScoringConfig.from_settings(settings),
            score_seed=settings.seed, select_seed=settings.seed,
        )  # fmt: skip
        publisher: Any = KeepVersion(meta["version"], meta, announce=progress.published)
    else:
        calibration = lambda: calibration_crops(tasks, config, settings)  # noqa: E731
        plan = product_plan(registry, config, settings, strategy, calibration=calibration, progress=progress.train_step)
        log_plan(registry, plan, len(tiles))
        extra = {"annotation_signature": signature, "skipped": skipped, "trigger": reason, "job": job_id}
        publisher = RegistryPublisher(
            registry, config, settings, strategy, {**extra, "project": pid}, announce=progress.published
        )

    unlabelled = sorted(tid for tid in tasks if tid not in annotations)
    outcome = run_round(
        plan,
        AnnotatedTasks(LabelledSet(tiles, skipped), unlabelled),
        publisher=publisher,
        scorer=RedisPoolScorer(pid, config, label_xml, tasks, settings, conn),
        select=QueueOrder(config.num_classes),
        sink=LabelStudioSink(ls, pid, tasks),
        phase=progress.phase,
    )
    version, meta = outcome.version, publisher.meta
    log.info("project %s: %d predictions of %s uploaded; project model_version set", pid, outcome.delivered, version)
    return {
        "status": "delivered" if resume else "trained",
        "version": version,
        "metrics": meta.get("metrics"),
        "n_annotations": len(tiles),
        "skipped": len(skipped),
        "predictions": outcome.delivered,
        "train_tiles_per_s": (meta.get("metrics") or {}).get("tiles_per_s"),
    }


@dataclass
class RedisPoolScorer:
    """The product's pool scorer: chunks of the pool shared with idle workers through Redis (``rescore_chunk``).

    The chunk seeds derive from SEED and each chunk's task ids (stable however the chunks are spread), so the
    round's ``score_seed`` is not used here.
    """

    pid: int
    config: Any
    label_xml: str
    tasks: dict[int, dict]
    settings: Settings
    conn: Any
    helpers: bool = True

    def score(self, trained: TrainedModel, version: str, strategy: Any, ids: list[int], seed: int) -> ScoredPool:
        rnd = start_rescore(
            self.pid, version, self.config, self.label_xml, strategy, self.tasks, ids, self.settings, self.conn,
            n_ensemble=len(trained.ensemble), helpers=self.helpers,
        )  # fmt: skip
        if rnd is None:
            return ScoredPool([], PoolScores({}, np.zeros(0, dtype=np.int64)))
        return collect_rescore(rnd, trained.model, self.config, self.settings, self.conn, ensemble=trained.ensemble)


def _delivered(ls: Any, pid: int, version: str, tasks: dict[int, dict], annotations: dict[int, dict]) -> bool:
    """Whether the job that published ``version`` finished its upload: the project's ``model_version`` names it
    (set last, after every prediction), or there is no unlabelled task to predict."""
    from ml_backend.labelstudio.client import as_dict, call

    if all(tid in annotations for tid in tasks):
        return True
    project = as_dict(call(ls, ls.projects.get, id=int(pid), what=f"reading project {pid}"))
    return project.get("model_version") == version


# ---------------------------------------------------------------------- chunked re-scoring
def _chunk_id(task_ids: list[int]) -> str:
    return hashlib.sha1(",".join(map(str, task_ids)).encode()).hexdigest()[:16]


def _rescore_key(pid: int, version: str, name: str) -> str:
    return q.key(pid, f"rescore:{version}:{name}")


def _compute_chunk(
    pid: int, version: str, task_ids: list[int], ctx: dict, model: Any, ensemble: list[Any], config: Any,
    settings: Settings, conn: Any,
) -> None:  # fmt: skip
    """Score one chunk and store its summary + masks in Redis for the coordinator."""
    from ml_backend.strategies import get_strategy

    strategy = get_strategy(ctx["strategy"], **ctx["strategy_params"])
    images, ok_ids, failed = [], [], []
    for tid in task_ids:
        task = {"id": tid, "data": {config.image_key: ctx["urls"][str(tid)]}}
        try:
            images.append(load_task_image(task, config, settings))
            ok_ids.append(tid)
        except Exception as exc:  # an unreadable image drops that task from this round only
            log.warning("project %s: task %s not scored: %s: %s", pid, tid, type(exc).__name__, exc)
            failed.append({"task": tid, "error": f"{type(exc).__name__}: {exc}"})
    record: dict[str, Any] = {"task_ids": json.dumps(ok_ids), "failed": json.dumps(failed)}
    if images:
        seed = settings.seed + int(_chunk_id(task_ids), 16) % 1000
        summary, results, pixels = score_tiles(model, images, strategy, config, settings, ensemble=ensemble, seed=seed)
        record["summary"] = _pack_summary(summary, pixels)
        record["results"] = json.dumps(results)
    rkey = _rescore_key(pid, version, f"result:{_chunk_id(task_ids)}")
    pipe = conn.pipeline(transaction=True)
    pipe.hset(rkey, mapping=record)
    pipe.expire(rkey, RESCORE_TTL_S)
    pipe.execute()


def _claim(conn: Any, pid: int, version: str, chunk: str, owner: str) -> bool:
    if conn.exists(_rescore_key(pid, version, f"result:{chunk}")):
        return False
    return bool(conn.set(_rescore_key(pid, version, f"claim:{chunk}"), owner, nx=True, ex=CHUNK_CLAIM_TTL_S))


def rescore_chunk(project_id: int, version: str, task_ids: list[int]) -> dict:
    """RQ helper job: score one chunk of the pool for ``version`` if nobody has claimed it yet.

    The coordinating ``train_project`` job stored the chunk's context (strategy, image URLs) in Redis and collects
    the result; a helper that finds the chunk taken (or the round over) returns at once.
    """
    from rq import get_current_job

    from ml_backend.labelstudio.labelconfig import parse_label_config

    _ensure_logging()
    settings = get_settings()
    pid = int(project_id)
    ids = [int(t) for t in task_ids]
    job = get_current_job()
    conn = _redis_for_job(job, settings)
    raw = conn.get(_rescore_key(pid, version, "ctx"))
    if raw is None:
        return {"status": "expired", "project": pid, "version": version}
    ctx = json.loads(raw)
    chunk = _chunk_id(ids)
    owner = job.id if job is not None else f"local-{uuid.uuid4().hex[:8]}"
    if not _claim(conn, pid, version, chunk, owner):
        return {"status": "taken", "project": pid, "chunk": chunk}
    try:
        registry = ModelRegistry(settings.model_dir, pid)
        device = torch_device(settings.device)
        model, _meta = registry.load(version, map_location=device)
        ensemble = [registry.load_extra(version, name, map_location=device) for name in ctx.get("ensemble", [])]
        config = parse_label_config(ctx["label_config"])
        _compute_chunk(pid, version, ids, ctx, model, ensemble, config, settings, conn)
    except BaseException:
        conn.delete(_rescore_key(pid, version, f"claim:{chunk}"))  # let the coordinator redo it now
        raise
    return {"status": "scored", "project": pid, "chunk": chunk, "tasks": len(ids)}


@dataclass
class RescoreRound:
    """One re-scoring of a project's pool for a version: its chunks, their shared context and the helper jobs."""

    pid: int
    version: str
    chunks: list[list[int]]
    ctx: dict
    helper_jobs: list[str] = field(default_factory=list)


def start_rescore(
    pid: int,
    version: str,
    config: Any,
    label_xml: str,
    strategy: Any,
    tasks: dict[int, dict],
    task_ids: list[int],
    settings: Settings,
    conn: Any,
    *,
    n_ensemble: int = 0,
    helpers: bool = True,
) -> RescoreRound | None:
    """Split the pool into chunks, store their context in Redis and enqueue ``rescore_chunk`` helpers (at the front
    of the queue, for idle workers); None when no task has an image to score."""
    urls: dict[str, str] = {}
    for tid in task_ids:
        try:
            urls[str(tid)] = task_image_url(tasks[tid], config)
        except ValueError as exc:
            log.warning("project %s: %s", pid, exc)
    ids = [tid for tid in task_ids if str(tid) in urls]
    if not ids:
        return None
    size = max(1, int(settings.rescore_chunk))
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    ctx = {
        "strategy": strategy.name,
        "strategy_params": strategy.params(),
        "label_config": label_xml,
        "urls": urls,
        "ensemble": [f"ensemble_{i}" for i in range(n_ensemble)],
    }
    conn.set(_rescore_key(pid, version, "ctx"), json.dumps(ctx), ex=RESCORE_TTL_S)
    rnd = RescoreRound(pid, version, chunks, ctx)
    if helpers and len(chunks) > 1:
        queue = q.get_queue(settings, conn)
        for chunk in chunks[1:]:  # the coordinator starts with chunk 0 itself
            job = queue.enqueue_call(
                q.RESCORE_FUNC,
                kwargs={"project_id": pid, "version": version, "task_ids": chunk},
                job_id=f"rescore-p{pid}-{uuid.uuid4().hex[:12]}",
                timeout=3600,
                result_ttl=3600,
                failure_ttl=q.FAILURE_TTL_S,
                at_front=True,
                description=f"rescore project {pid} {version} ({len(chunk)} tasks)",
            )
            rnd.helper_jobs.append(job.id)
    log.info("project %s: re-scoring %d unlabelled tasks with %s in %d chunk(s)", pid, len(ids), strategy, len(chunks))
    return rnd


def collect_rescore(
    rnd: RescoreRound,
    model: Any,
    config: Any,
    settings: Settings,
    conn: Any,
    *,
    ensemble: list[Any] | None = None,
) -> ScoredPool:
    """Work through the chunks nobody has claimed, wait for the ones helpers hold (redoing any whose helper died),
    and return the whole pool's scores and masks (task order = chunk order)."""
    pid, version = rnd.pid, rnd.version
    owner = f"coordinator-{uuid.uuid4().hex[:8]}"
    done_local = 0
    deadline = time.monotonic() + RESCORE_WAIT_S
    pending = {_chunk_id(c): c for c in rnd.chunks}
    collected: dict[str, dict] = {}
    while pending:
        progressed = False
        for chunk, chunk_ids in list(pending.items()):
            record = conn.hgetall(_rescore_key(pid, version, f"result:{chunk}"))
            if record:
                collected[chunk] = {k.decode(): v for k, v in record.items()}
                del pending[chunk]
                progressed = True
                continue
            if _claim(conn, pid, version, chunk, owner):
                _compute_chunk(pid, version, chunk_ids, rnd.ctx, model, list(ensemble or []), config, settings, conn)
                done_local += 1
                progressed = True
                log.info(
                    "project %s: scored a chunk of %d tasks here (%d of %d chunks scored here so far)",
                    pid, len(chunk_ids), done_local, len(rnd.chunks),
                )  # fmt: skip
        if pending and not progressed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"project {pid}: {len(pending)} re-scoring chunk(s) never completed")
            time.sleep(0.2)
    log.info("project %s: %d/%d chunks scored here, the rest by helpers", pid, done_local, len(rnd.chunks))

    all_ids: list[int] = []
    results: list[list[dict]] = []
    summaries: list[dict[str, np.ndarray]] = []
    pixels: list[np.ndarray] = []
    for chunk in (_chunk_id(c) for c in rnd.chunks):
        record = collected[chunk]
        chunk_ids = json.loads(record["task_ids"])
        if not chunk_ids:
            continue
        summary, pix = _unpack_summary(record["summary"])
        all_ids.extend(chunk_ids)
        results.extend(json.loads(record["results"]))
        summaries.append(summary)
        pixels.append(pix)
    keys = ["ctx"] + [f"result:{_chunk_id(c)}" for c in rnd.chunks] + [f"claim:{_chunk_id(c)}" for c in rnd.chunks]
    conn.delete(*[_rescore_key(pid, version, k) for k in keys])
    if not all_ids:
        return ScoredPool([], PoolScores({}, np.zeros(0, dtype=np.int64)))
    summary = {k: np.concatenate([s[k] for s in summaries], axis=0) for k in summaries[0]}
    return ScoredPool(all_ids, PoolScores(summary, np.concatenate(pixels)), results)


def finish_rescore(
    rnd: RescoreRound,
    model: Any,
    config: Any,
    strategy: Any,
    settings: Settings,
    conn: Any,
    *,
    ensemble: list[Any] | None = None,
    labelled_embeddings: np.ndarray | None = None,
) -> list[dict]:
    """``collect_rescore``, then select over the whole pool and return ``[{task, result, score, model_version}]``."""
    scored = collect_rescore(rnd, model, config, settings, conn, ensemble=ensemble)
    if not scored.ids:
        return []
    ranking = QueueOrder(config.num_classes)(
        strategy, scored.ids, scored.scores, labelled_embeddings=labelled_embeddings, seed=settings.seed
    )
    return predictions_for(rnd.version, scored, ranking)


def rescore_pool(
    pid: int,
    version: str,
    model: Any,
    config: Any,
    label_xml: str,
    strategy: Any,
    tasks: dict[int, dict],
    task_ids: list[int],
    settings: Settings,
    conn: Any,
    *,
    ensemble: list[Any] | None = None,
    labelled_embeddings: np.ndarray | None = None,
    helpers: bool = True,
) -> list[dict]:
    """Score ``task_ids`` (chunks shared with idle workers), select over the whole pool, return the predictions."""
    ensemble = list(ensemble or [])
    rnd = start_rescore(
        pid, version, config, label_xml, strategy, tasks, task_ids, settings, conn,
        n_ensemble=len(ensemble), helpers=helpers,
    )  # fmt: skip
    if rnd is None:
        return []
    return finish_rescore(
        rnd, model, config, strategy, settings, conn, ensemble=ensemble, labelled_embeddings=labelled_embeddings
    )
