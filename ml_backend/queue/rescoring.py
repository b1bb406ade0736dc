"""Re-scoring a project's pool after a training, shared between workers through Redis (the product's pool scorer).

The coordinating training job splits the unlabelled tasks into chunks, stores their context (strategy, image URLs,
label config) under ``rescore:<version>:ctx`` and enqueues ``rescore_chunk`` helper jobs at the front of the queue.
Each chunk is claimed (SET NX with a TTL, so a helper killed mid-chunk frees it) by a helper or by the coordinator
itself, scored with the loaders ``jobs/`` passes in (``ChunkInputs``; for Label Studio the Label Studio package's
``project_data.ChunkInputs``: the project's one model-input loader and ``loop.score_tiles``; this package never
imports the Label Studio package), and its summary + masks stored under ``result:<chunk>``. The
coordinator collects every chunk (redoing any whose helper died) and ``run_round`` selects over the whole pool.

The same chunks carry the /predict backlog (issue 16): tasks a large "Retrieve predictions" did not get done by
PREDICT_DEADLINE_S are claimed per task (``backlog:<version>:<task>``, SET NX with a TTL, so a second request does
not queue them twice) and enqueued in chunks (at least RESCORE_CHUNK, at most BACKLOG_JOBS per request) as
``ml_backend.jobs.backlog.predict_backlog`` jobs,
which predict them with the /predict pipeline and push them through ``LabelStudioSink`` (``enqueue_backlog``).
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ml_backend.active_learning import ScoredPool
from ml_backend.config import Settings
from ml_backend.data.context import model_offsets
from ml_backend.inference.scoring import PoolScores
from ml_backend.strategies import get_strategy
from ml_backend.training.recipe import TrainedModel

from .connection import get_connection, get_queue, redis_errors
from .keys import backlog_key, chunk_id, rescore_claim_key, rescore_ctx_key, rescore_result_key
from .scheduling import FAILURE_TTL_S, JOB_RETRY, RESCORE_FUNC

log = logging.getLogger(__name__)

CHUNK_CLAIM_TTL_S = 300  # a helper killed mid-chunk frees its chunk after this long; the coordinator redoes it
RESCORE_TTL_S = 24 * 3600
RESCORE_WAIT_S = 3600.0
BACKLOG_FUNC = "ml_backend.jobs.backlog.predict_backlog"
BACKLOG_CLAIM_TTL_S = 3600  # a backlog task whose job was lost is queued again by the next request after this long
BACKLOG_JOB_TIMEOUT_S = 3600
# A request's backlog goes into at most BACKLOG_JOBS jobs (each pays a work horse's start-up, importing torch and the
# SDK: 2-8 s on a busy CPU, more than predicting 50 small tiles) of RESCORE_CHUNK to BACKLOG_MAX_CHUNK tasks.
BACKLOG_JOBS = 16
BACKLOG_MAX_CHUNK = 500
_CLAIM_BATCH = 10_000  # SET NX per pipeline round trip


def _pack_summary(summary: dict[str, np.ndarray], pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, __pixels__=pixels, **summary)
    return buf.getvalue()


def _unpack_summary(data: bytes) -> tuple[dict[str, np.ndarray], np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    pixels = arrays.pop("__pixels__")
    return arrays, pixels


class ChunkInputs(Protocol):
    """What re-scoring needs from the labelling project, passed in by ``jobs/`` (the layer above)."""

    def describe(self, task_ids: list[int], offsets: Sequence[int]) -> tuple[dict, list[int]]:
        """(JSON entries of the chunk context from which ``load`` builds each task's model input, the ids that
        have an input); the coordinator's only."""
        ...

    def load(self, tid: int, ctx: dict, offsets: Sequence[int]) -> np.ndarray:
        """The model input of task ``tid`` (the project's one loader) from the chunk context."""
        ...

    def score(
        self, model: Any, images: list[np.ndarray], strategy: Any, *, ensemble: list[Any], seed: int
    ) -> tuple[dict[str, np.ndarray], list[list[dict]], np.ndarray]:
        """(summary in input order, prediction results per task, pixels per task) of one chunk."""
        ...


def compute_chunk(
    job: RescoreJob, task_ids: list[int], ctx: dict, model: Any, ensemble: list[Any], owner: str = ""
) -> None:
    """Score one chunk of ``job``'s pool and store its summary + masks in Redis for the coordinator (``owner``: who
    scored it, the claim's holder, kept with the result so a round can show that every chunk was scored exactly
    once)."""
    pid, version, inputs, settings, conn = job.pid, job.version, job.inputs, job.settings, job.conn

    strategy = get_strategy(ctx["strategy"], **ctx["strategy_params"])
    offsets = model_offsets(model)  # the version's input slices (2.5D context); (0,) = the tile alone
    images, ok_ids, failed = [], [], []
    for tid in task_ids:
        try:
            images.append(inputs.load(tid, ctx, offsets))
            ok_ids.append(tid)
        except Exception as exc:  # an unreadable image drops that task from this round only
            log.warning("project %s: task %s not scored: %s: %s", pid, tid, type(exc).__name__, exc)
            failed.append({"task": tid, "error": f"{type(exc).__name__}: {exc}"})
    record: dict[str, Any] = {"task_ids": json.dumps(ok_ids), "failed": json.dumps(failed), "owner": owner}
    if images:
        seed = settings.seed + int(chunk_id(task_ids), 16) % 1000
        summary, results, pixels = inputs.score(model, images, strategy, ensemble=ensemble, seed=seed)
        record["summary"] = _pack_summary(summary, pixels)
        record["results"] = json.dumps(results)
    rkey = rescore_result_key(pid, version, chunk_id(task_ids))
    pipe = conn.pipeline(transaction=True)
    pipe.hset(rkey, mapping=record)
    pipe.expire(rkey, RESCORE_TTL_S)
    pipe.execute()


def claim_chunk(conn: Any, pid: int, version: str, chunk: str, owner: str) -> bool:
    if conn.exists(rescore_result_key(pid, version, chunk)):
        return False
    return bool(conn.set(rescore_claim_key(pid, version, chunk), owner, nx=True, ex=CHUNK_CLAIM_TTL_S))


@dataclass
class RescoreRound:
    """One re-scoring of a project's pool for a version: its chunks, their shared context and the helper jobs."""

    pid: int
    version: str
    chunks: list[list[int]]
    ctx: dict
    helper_jobs: list[str] = field(default_factory=list)
    owners: dict[str, str] = field(default_factory=dict)  # chunk id -> who scored it (filled by collect_rescore)
    scored_here: int = 0  # chunks the coordinator scored itself


@dataclass(frozen=True)
class RescoreJob:
    """Which re-scoring ``start_rescore`` starts: project ``pid``'s pool for ``version``, its label config
    (``label_xml``), the project's loaders (``inputs``), the settings and the Redis connection."""

    pid: int
    version: str
    label_xml: str
    inputs: ChunkInputs
    settings: Settings
    conn: Any


def start_rescore(
    job: RescoreJob,
    strategy: Any,
    task_ids: list[int],
    *,
    n_ensemble: int = 0,
    helpers: bool = True,
    offsets: Sequence[int] = (0,),
) -> RescoreRound | None:
    """Split the pool into chunks, store their context in Redis and enqueue ``rescore_chunk`` helpers (at the front
    of the queue, for idle workers); None when no task has an image to score. ``inputs.describe`` puts what each
    task's model input is read from into the context (``offsets``: the model's input slices, 2.5D context)."""
    pid, version, label_xml, inputs, settings, conn = (
        job.pid, job.version, job.label_xml, job.inputs, job.settings, job.conn
    )  # fmt: skip
    described, ids = inputs.describe(list(task_ids), tuple(int(o) for o in offsets))
    if not ids:
        return None
    size = max(1, int(settings.rescore_chunk))
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    ctx = {
        "strategy": strategy.name,
        "strategy_params": strategy.params(),
        "label_config": label_xml,
        "urls": described.pop("urls", {}),
        "ensemble": [f"ensemble_{i}" for i in range(n_ensemble)],
        **described,
    }
    conn.set(rescore_ctx_key(pid, version), json.dumps(ctx), ex=RESCORE_TTL_S)
    rnd = RescoreRound(pid, version, chunks, ctx)
    if helpers and len(chunks) > 1:
        queue = get_queue(settings, conn)
        for chunk in chunks[1:]:  # the coordinator starts with chunk 0 itself
            job = queue.enqueue_call(
                RESCORE_FUNC,
                kwargs={"project_id": pid, "version": version, "task_ids": chunk},
                job_id=f"rescore-p{pid}-{uuid.uuid4().hex[:12]}",
                timeout=3600,
                result_ttl=3600,
                failure_ttl=FAILURE_TTL_S,
                at_front=True,
                description=f"rescore project {pid} {version} ({len(chunk)} tasks)",
            )
            rnd.helper_jobs.append(job.id)
    log.info("project %s: re-scoring %d unlabelled tasks with %s in %d chunk(s)", pid, len(ids), strategy, len(chunks))
    return rnd


def collect_rescore(
    rnd: RescoreRound,
    model: Any,
    inputs: ChunkInputs,
    settings: Settings,
    conn: Any,
    *,
    ensemble: list[Any] | None = None,
    progress: Callable[[dict], None] | None = None,
) -> ScoredPool:
    """Work through the chunks nobody has claimed, wait for the ones helpers hold (redoing any whose helper died),
    and return the whole pool's scores and masks (task order = chunk order). ``progress`` receives the phase's own
    {step, steps, unit "tasks", seconds, eta_s} whenever chunks complete (the status page's score phase)."""
    pid, version = rnd.pid, rnd.version
    owner = f"coordinator-{uuid.uuid4().hex[:8]}"
    done_local = 0
    t0 = time.monotonic()
    deadline = t0 + RESCORE_WAIT_S
    pending = {chunk_id(c): c for c in rnd.chunks}
    sizes = {k: len(c) for k, c in pending.items()}
    total = sum(sizes.values())
    collected: dict[str, dict] = {}
    finished: set[str] = set()  # chunks known to be scored (collected, or computed here and collected next pass)
    reported: set[int] = set()  # the task counts already reported

    def report() -> None:
        done = sum(sizes[k] for k in finished)
        if progress is not None and done not in reported:
            reported.add(done)
            seconds = time.monotonic() - t0
            eta = seconds / done * (total - done) if done else None
            progress({"step": done, "steps": total, "unit": "tasks", "seconds": round(seconds, 1),
                      "eta_s": None if eta is None else round(eta, 1)})  # fmt: skip

    while pending:
        report()
        progressed = False
        for chunk, chunk_ids in list(pending.items()):
            record = conn.hgetall(rescore_result_key(pid, version, chunk))
            if record:
                collected[chunk] = {k.decode(): v for k, v in record.items()}
                del pending[chunk]
                finished.add(chunk)
                progressed = True
                continue
            if claim_chunk(conn, pid, version, chunk, owner):
                job = RescoreJob(pid, version, rnd.ctx.get("label_config", ""), inputs, settings, conn)
                compute_chunk(job, chunk_ids, rnd.ctx, model, list(ensemble or []), owner=owner)
                done_local += 1
                finished.add(chunk)
                report()
                progressed = True
                log.info(
                    "project %s: scored a chunk of %d tasks here (%d of %d chunks scored here so far)",
                    pid, len(chunk_ids), done_local, len(rnd.chunks),
                )  # fmt: skip
        if pending and not progressed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"project {pid}: {len(pending)} re-scoring chunk(s) never completed")
            time.sleep(0.2)
    report()
    log.info("project %s: %d/%d chunks scored here, the rest by helpers", pid, done_local, len(rnd.chunks))
    rnd.scored_here = done_local
    rnd.owners = {c: (r.get("owner") or b"").decode() for c, r in collected.items()}

    all_ids: list[int] = []
    results: list[list[dict]] = []
    summaries: list[dict[str, np.ndarray]] = []
    pixels: list[np.ndarray] = []
    for chunk in (chunk_id(c) for c in rnd.chunks):
        record = collected[chunk]
        chunk_ids = json.loads(record["task_ids"])
        if not chunk_ids:
            continue
        summary, pix = _unpack_summary(record["summary"])
        all_ids.extend(chunk_ids)
        results.extend(json.loads(record["results"]))
        summaries.append(summary)
        pixels.append(pix)
    chunks = [chunk_id(c) for c in rnd.chunks]
    conn.delete(
        rescore_ctx_key(pid, version),
        *[rescore_result_key(pid, version, c) for c in chunks],
        *[rescore_claim_key(pid, version, c) for c in chunks],
    )
    if not all_ids:
        return ScoredPool([], PoolScores({}, np.zeros(0, dtype=np.int64)))
    summary = {k: np.concatenate([s[k] for s in summaries], axis=0) for k in summaries[0]}
    return ScoredPool(all_ids, PoolScores(summary, np.concatenate(pixels)), results)


@dataclass
class RedisPoolScorer:
    """The product's pool scorer: chunks of the pool shared with idle workers through Redis (``rescore_chunk``).

    The chunk seeds derive from SEED and each chunk's task ids (stable however the chunks are spread), so the
    round's ``score_seed`` is not used here.
    """

    pid: int
    label_xml: str
    inputs: ChunkInputs  # the project's loaders (``project_data.ChunkInputs``), passed in by jobs/
    settings: Settings
    conn: Any
    helpers: bool = True
    last: RescoreRound | None = None  # the last round's chunks and who scored them (benchmarks, tests)
    progress: Callable[[dict], None] | None = None  # the score phase's own progress (``collect_rescore``)

    def score(self, trained: TrainedModel, version: str, strategy: Any, ids: list[int], seed: int) -> ScoredPool:
        rnd = start_rescore(
            RescoreJob(self.pid, version, self.label_xml, self.inputs, self.settings, self.conn), strategy, ids,
            n_ensemble=len(trained.ensemble), helpers=self.helpers, offsets=model_offsets(trained.model),
        )  # fmt: skip
        self.last = rnd
        if rnd is None:
            return ScoredPool([], PoolScores({}, np.zeros(0, dtype=np.int64)))
        return collect_rescore(rnd, trained.model, self.inputs, self.settings, self.conn, ensemble=trained.ensemble,
                               progress=self.progress)  # fmt: skip


@dataclass
class BacklogReceipt:
    """What ``enqueue_backlog`` did: the tasks newly queued, the ones another request had queued, the job ids."""

    queued: list[int]
    already_queued: int
    jobs: list[str]


def enqueue_backlog(
    pid: int, version: str, task_ids: Sequence[int], settings: Settings, conn: Any = None
) -> BacklogReceipt:
    """Queue /predict's undone tasks for ``version`` in chunks of at least RESCORE_CHUNK (``predict_backlog`` jobs, at
    the back of the queue: a training or its re-scoring goes first and supersedes them). Tasks already claimed by an
    earlier request are not queued again. ``QueueUnavailable`` when Redis cannot be reached (nothing is claimed)."""
    with redis_errors(settings, "; the tasks were not queued (Label Studio asks for them again next time)"):
        conn = conn if conn is not None else get_connection(settings.redis_url)
        ids = list(dict.fromkeys(int(t) for t in task_ids))
        claimed: list[int] = []
        for start in range(0, len(ids), _CLAIM_BATCH):
            part = ids[start : start + _CLAIM_BATCH]
            pipe = conn.pipeline(transaction=False)
            for tid in part:
                pipe.set(backlog_key(pid, version, tid), "queued", nx=True, ex=BACKLOG_CLAIM_TTL_S)
            claimed.extend(tid for tid, ok in zip(part, pipe.execute(), strict=True) if ok)
        size = min(BACKLOG_MAX_CHUNK, max(1, int(settings.rescore_chunk), -(-len(claimed) // BACKLOG_JOBS)))
        chunks = [claimed[i : i + size] for i in range(0, len(claimed), size)]
        jobs: list[str] = []
        try:
            from rq import Retry

            queue = get_queue(settings, conn)
            pipe = conn.pipeline()
            for chunk in chunks:
                job = queue.enqueue_call(
                    BACKLOG_FUNC,
                    kwargs={"project_id": int(pid), "version": str(version), "task_ids": chunk},
                    job_id=f"backlog-p{pid}-{uuid.uuid4().hex[:12]}",
                    timeout=BACKLOG_JOB_TIMEOUT_S,
                    result_ttl=3600,
                    failure_ttl=FAILURE_TTL_S,
                    retry=Retry(**JOB_RETRY),
                    description=f"predict project {pid} {version} ({len(chunk)} tasks /predict did not finish)",
                    pipeline=pipe,
                )
                jobs.append(job.id)
            pipe.execute()
        except BaseException:
            release_backlog(conn, pid, version, claimed)  # queued nothing: the next request may queue them
            raise
    return BacklogReceipt(claimed, len(ids) - len(claimed), jobs)


def release_backlog(conn: Any, pid: int, version: str, task_ids: Sequence[int]) -> None:
    """Drop the claims of backlog tasks that were not delivered, so the next /predict queues them again."""
    ids = list(task_ids)
    for start in range(0, len(ids), _CLAIM_BATCH):
        conn.delete(*[backlog_key(pid, version, t) for t in ids[start : start + _CLAIM_BATCH]])
