"""THE prediction pipeline of ``/predict`` and the backlog jobs: fetch every task's model input, run the scoring
pipeline, build brush masks (RLE), overlays and queue scores (``predict_tasks``). The HTTP side (the request body,
handing undone tasks to the background) is ``server/predict.py``; ``jobs/backlog.py`` runs this same pipeline.

Why it is shaped like this:

* Label Studio's "Retrieve predictions" sends all selected tasks in ONE request, so images are fetched concurrently
  (I/O bound) while inference runs one image at a time under a lock (CPU/GPU bound; the model is shared by the
  threads of the process and MC-dropout passes toggle its mode).
* One bad task (missing field, unknown or corrupt image, too large) fails alone: it is logged with the reason and
  answered with an empty list, so Label Studio stores no prediction for it and retries it next time, while the
  others get theirs.
* Scores: ``score`` is the queue score (LOWER = served first, see ``ml_backend.strategies.queue``). Pixel-uncertainty
  strategies (entropy, least_confidence, margin; bald on images up to ``MC_MAX_PIXELS``) use the absolute mapping,
  so scores of separate requests compare. Batch strategies (kmeans, coreset, ...) only have ranks within a whole
  pool: /predict scores such projects by entropy, and the RQ re-scoring job (``ml_backend.jobs``) pushes the
  strategy's pool-wide order after each training.
* Overlays (issue 12): when the project's label config has the display-only controls, each prediction also holds
  the uncertainty layer and, on large tiles, the suggested region (``labelstudio.overlays.prediction_results``, the
  builder the re-scoring job uses too); an overlay that would be rejected is dropped, the mask is still sent.
* Cold start (no trained version): no masks at all (never masks from random weights), ``model_version`` =
  ``COLD_START_VERSION`` and coverage-order scores from ``cold_start_scores`` (a seeded hash of the task id, stable
  across requests and when tasks are added).
* Any size (issue 16): "Retrieve predictions" on a 2,000-task project sends 2,000 tasks at once. The body is parsed
  task by task (``parse_predict_body``: each task is reduced to its ``id`` and ``data`` as soon as it is read, so
  the old predictions and annotations Label Studio serialises with every task never pile up in memory), images
  stream through in windows of a few dozen, and the request answers what is done by PREDICT_DEADLINE_S. Tasks
  not done by then (``PredictionOutcome.undone``) are answered with an EMPTY LIST: Label Studio 1.23.2
  (``ml/models.py::_get_predictions_from_ml_backend``) stores one prediction per item of a task's entry, so an
  empty list stores nothing, and "Retrieve predictions" asks again for every task without a prediction of the
  current model version. An entry ``{"result": [], "model_version": v}`` would instead be stored as a prediction
  of ``v`` and the task never asked for again. The undone tasks are then finished in the background
  (``server.predict.queue_undone``: RQ jobs ``ml_backend.jobs.backlog.predict_backlog``, this same pipeline, pushed
  in bulk through ``labelstudio.loop.LabelStudioSink``).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ml_backend.config import torch_device
from ml_backend.data.context import model_offsets
from ml_backend.ids import MAX_ID, parse_id
from ml_backend.imaging import ImageDecodeError
from ml_backend.inference.scoring import ScoringConfig, score_images
from ml_backend.labelstudio.labelconfig import BrushConfig
from ml_backend.labelstudio.media import MediaError
from ml_backend.labelstudio.neighbours import NeighbourIndex, load_context_image
from ml_backend.labelstudio.overlays import prediction_results
from ml_backend.strategies import cold_start_scores, uncertainty_to_queue_score
from ml_backend.strategies.resolve import predict_strategy

__all__ = [
    "COLD_START_VERSION",
    "MAX_IMAGE_URL_CHARS",
    "DeadlineExceeded",
    "ModelConfigMismatch",
    "PredictionOutcome",
    "TaskError",
    "deadline_error",
    "fail_task",
    "predict_tasks",
]

log = logging.getLogger(__name__)

MAX_IMAGE_URL_CHARS = 8192  # a longer image reference fails its task alone
COLD_START_VERSION = "cold-start"
FETCH_WORKERS = 8
MC_MAX_PIXELS = 1024 * 1024  # BALD in /predict only up to this size (larger: crops for the score + tiles for the mask)
INFERENCE_RESERVE = 0.25  # share of PREDICT_DEADLINE_S kept for inferring the images that arrived in time

_inference_lock = threading.Lock()


class TaskError(ValueError):
    """One task cannot be predicted (its own fault: missing field, bad image); the others go on."""


class DeadlineExceeded(TaskError):
    """The request's overall deadline (PREDICT_DEADLINE_S) passed before this task was done."""


class ModelConfigMismatch(RuntimeError):
    """The project's model predicts a different number of classes than its label config has labels."""


@dataclass
class PredictionOutcome:
    results: list[Any]  # one entry per task, in order: a prediction dict, or [] for a failed or undone task
    errors: list[dict] = field(default_factory=list)  # {"index", "task", "reason"}
    model_version: str = COLD_START_VERSION
    timings: dict[str, float] = field(default_factory=dict)
    undone: list[int] = field(default_factory=list)  # indices of tasks not done by the deadline (answered [])
    queued: dict[str, Any] | None = None  # what ``queue_undone`` queued for the background


def _task_id(task: Any, index: int) -> int:
    if not isinstance(task, dict):
        raise TaskError(f"task #{index} is {type(task).__name__}, expected an object with 'id' and 'data'")
    try:
        return parse_id(task.get("id"), "the id")
    except ValueError as exc:
        raise TaskError(f"task #{index} has no integer 'id' in 1..{MAX_ID}: {exc}") from None


def _image_url(task: dict, config: BrushConfig) -> str:
    data = task.get("data")
    if not isinstance(data, dict):
        raise TaskError("task has no 'data' object")
    url = data.get(config.image_key)
    if isinstance(url, str) and len(url) > MAX_IMAGE_URL_CHARS:
        raise TaskError(
            f"image URL under {config.image_key!r} is {len(url):,} characters long (at most {MAX_IMAGE_URL_CHARS:,})"
        )
    if not isinstance(url, str) or not url.strip():
        names = sorted(str(k)[:40] for k in list(data)[:20])
        keys = ", ".join(names) + (", ..." if len(data) > 20 else "") if names else "none"
        raise TaskError(
            f"task data has no image under {config.image_key!r} (from the label config's "
            f'<Image value="${config.image_key}">; task data keys: {keys})'
        )
    return url


def _load(
    task: dict, config: BrushConfig, settings: Any, offsets: tuple[int, ...] = (0,), index: Any = None
) -> np.ndarray:
    """The model input of a task: its image, plus the neighbouring slices as channels when the model reads 2.5D
    context (``offsets`` other than (0,); ``index``: the request's other tasks). The project's one loader,
    ``labelstudio.neighbours.load_context_image`` (what ``ProjectData.model_input`` runs: a neighbour that cannot be
    had is the tile itself, never a task error); a request's own checks first (``TaskError``)."""
    _image_url(task, config)  # a clear TaskError for a missing or oversized image reference
    try:  # validated, bounded fetch; decodes (only images are cached)
        return load_context_image(task, config, settings, offsets, index)
    except (MediaError, ImageDecodeError) as exc:
        raise TaskError(str(exc)) from exc


def _score_group(model: Any, images: list[np.ndarray], strategy: Any, settings: Any, device: Any, seed: int) -> list:
    """[(probs (C, H, W), queue score)] for equal-size normalised images, through THE scoring pipeline
    (``inference.scoring.score_images``: tiles batched, larger images tiled with bounded memory)."""
    h, w = images[0].shape[-2:]  # (H, W), or (C, H, W) with 2.5D context
    strategy = predict_strategy(strategy, settings.aggregation, pixels=h * w, mc_max_pixels=MC_MAX_PIXELS)
    probs_all: list[Any] = [None] * len(images)

    def keep(i: int, probs: np.ndarray) -> None:
        probs_all[i] = probs

    scored = score_images(model, images, strategy, ScoringConfig.from_settings(settings), seed=seed, on_probs=keep)
    max_value = strategy.max_value(probs_all[0].shape[0], h * w)
    scores = uncertainty_to_queue_score(scored.summary["value"], max_value)
    return [(p, float(sc)) for p, sc in zip(probs_all, scores, strict=True)]


def _score_members(
    model: Any,
    images: dict[int, np.ndarray],
    members: list[int],
    strategy: Any,
    settings: Any,
    device: Any,
    seed: int,
    deadline: float = float("inf"),
) -> list[tuple[int, Any]]:
    """[(task index, (probs, score) or the exception)]: the group in one go, one by one if that fails.

    Waits for the inference lock (other requests of this process) only until ``deadline`` (``time.monotonic``).
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not _inference_lock.acquire(timeout=min(remaining, threading.TIMEOUT_MAX)):
        return [(i, deadline_error(settings)) for i in members]
    try:
        try:
            scored = _score_group(model, [images[i] for i in members], strategy, settings, device, seed)
        finally:
            _inference_lock.release()
        return list(zip(members, scored, strict=True))
    except Exception as exc:
        if len(members) == 1:
            log.exception("task #%d: inference failed", members[0])
            return [(members[0], exc)]
        log.warning("a batch of %d images failed (%s); scoring them one by one", len(members), exc)
    out: list[tuple[int, Any]] = []
    for i in members:
        out.extend(_score_members(model, images, [i], strategy, settings, device, seed, deadline))
    return out


def deadline_error(settings: Any) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"deadline exceeded: not processed within PREDICT_DEADLINE_S={float(settings.predict_deadline_s):g} s of "
        "the request (no prediction; Label Studio asks again next time)"
    )


def _prediction(probs: np.ndarray, score: float, config: BrushConfig, version: str, settings: Any, tid: Any) -> dict:
    """The mask, plus the uncertainty layer and suggested region when the label config has their controls."""
    result = prediction_results(probs, config, settings, label=f"task {tid}")
    return {"result": result, "score": score, "model_version": version}


def predict_tasks(
    tasks: list[Any],
    config: BrushConfig,
    model_entry: tuple[Any, dict] | None,
    strategy: Any,
    settings: Any,
    *,
    deadline: float | None = None,
) -> PredictionOutcome:
    """Predictions for ``tasks`` in order (see the module docstring for the rules).

    ``deadline`` (``time.monotonic()`` value; default now + PREDICT_DEADLINE_S) bounds the whole call: tasks whose
    image has not arrived by ``deadline - INFERENCE_RESERVE * PREDICT_DEADLINE_S`` or that are not inferred by the
    deadline fail alone with "deadline exceeded", and the call returns without waiting for their downloads (those
    threads end with media's own per-fetch deadline, FETCH_DEADLINE_S).
    """
    n = len(tasks)
    outcome = PredictionOutcome(results=[[] for _ in range(n)])
    ids: list[int | None] = [None] * n
    urls_ok: list[bool] = [False] * n
    for i, task in enumerate(tasks):
        try:
            ids[i] = _task_id(task, i)
            _image_url(task, config)
            urls_ok[i] = True
        except TaskError as exc:
            fail_task(outcome, i, task, exc)
    good = [i for i in range(n) if urls_ok[i]]
    if not good:
        return outcome

    if model_entry is None:
        scores = cold_start_scores([ids[i] for i in good], seed=settings.seed)
        for i, score in zip(good, scores, strict=True):
            outcome.results[i] = {"result": [], "score": float(score), "model_version": COLD_START_VERSION}
        return outcome

    model, meta = model_entry
    version = str(meta.get("version") or "unknown")
    outcome.model_version = version
    classes = _model_classes(model)
    if classes is not None and classes != config.num_classes:
        raise ModelConfigMismatch(
            f"model {version} predicts {classes} classes but the label config has {config.num_classes} "
            f"(background + {', '.join(config.foreground_labels)}); the label config changed after training: "
            "retrain (Start training) or roll back"
        )

    request_strategy = predict_strategy(strategy, settings.aggregation)  # one policy: strategies.resolve
    device = torch_device(settings.device)
    # 2.5D context: the model's input slices; neighbours from the tasks' <image>_prev/_next, else from the other
    # tasks of this request (labelstudio.neighbours), else the tile itself.
    offsets = model_offsets(model)
    index = None
    if offsets != (0,):
        index = NeighbourIndex.from_tasks([tasks[i] for i in good], config.image_key)

    if deadline is None:
        deadline = time.monotonic() + float(settings.predict_deadline_s)
    # Stop waiting for images a little before the deadline, so that the images that did arrive are still inferred
    # when a few never do (a slow host must not cost the whole request its predictions).
    fetch_cutoff = deadline - INFERENCE_RESERVE * float(settings.predict_deadline_s)
    wait_s = infer_s = 0.0
    window = 2 * max(FETCH_WORKERS, int(settings.inference_batch))  # images in memory at once: bounded
    windows = [good[k : k + window] for k in range(0, len(good), window)]
    # Not a ``with`` block: leaving it would wait for downloads still running after the deadline.
    pool = ThreadPoolExecutor(max_workers=min(FETCH_WORKERS, len(good)), thread_name_prefix="predict-fetch")
    try:
        def submit(idx: list[int]) -> dict[int, Future]:
            return {i: pool.submit(_load, tasks[i], config, settings, offsets, index) for i in idx}

        pending = submit(windows[0])
        for w, idx in enumerate(windows):
            current = pending
            if w + 1 < len(windows):  # the next window downloads while this one is on the model
                pending = submit(windows[w + 1]) if time.monotonic() < fetch_cutoff else {}
            t0 = time.perf_counter()
            images: dict[int, np.ndarray] = {}
            for i in idx:
                future = current.get(i)
                try:
                    if future is None:
                        raise deadline_error(settings)
                    try:
                        images[i] = future.result(timeout=max(0.0, fetch_cutoff - time.monotonic()))
                    except FutureTimeout:
                        future.cancel()
                        raise deadline_error(settings) from None
                except DeadlineExceeded:
                    outcome.undone.append(i)
                except TaskError as exc:
                    fail_task(outcome, i, tasks[i], exc)
                except Exception as exc:  # anything unexpected in one task still fails only that task
                    log.exception("task %s: unexpected error while loading its image", ids[i])
                    fail_task(outcome, i, tasks[i], TaskError(f"{type(exc).__name__}: {exc}"))
            t1 = time.perf_counter()
            wait_s += t1 - t0
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, image in images.items():
                groups.setdefault(image.shape, []).append(i)
            for members in groups.values():
                seed = settings.seed + int(ids[members[0]] or 0)
                scored = _score_members(model, images, members, request_strategy, settings, device, seed, deadline)
                for i, item in scored:
                    if isinstance(item, DeadlineExceeded):
                        outcome.undone.append(i)
                    elif isinstance(item, TaskError):
                        fail_task(outcome, i, tasks[i], item)
                    elif isinstance(item, Exception):
                        fail_task(outcome, i, tasks[i], TaskError(f"inference failed: {type(item).__name__}: {item}"))
                    else:
                        outcome.results[i] = _prediction(item[0], item[1], config, version, settings, ids[i])
            infer_s += time.perf_counter() - t1
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    outcome.undone.sort()
    if outcome.undone:
        log.info("%d of %d task(s) not done within PREDICT_DEADLINE_S=%g s", len(outcome.undone), n,
                 float(settings.predict_deadline_s))  # fmt: skip
    outcome.timings = {"fetch_wait_s": round(wait_s, 4), "inference_s": round(infer_s, 4)}
    return outcome


def _model_classes(model: Any) -> int | None:
    hparams = getattr(model, "hparams", None) or {}
    value = hparams.get("num_classes", getattr(model, "num_classes", None))
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else None


def fail_task(outcome: PredictionOutcome, index: int, task: Any, exc: Exception, *, quiet: bool = False) -> None:
    tid = task.get("id") if isinstance(task, dict) else None
    try:
        tid = parse_id(tid, "id")
    except ValueError:  # echo only ids that can exist: never a 5,000-digit number back into the answer and the log
        tid = None
    if not quiet:
        log.warning("task %s (#%d): no prediction: %s", tid, index, exc)
    outcome.results[index] = []
    outcome.errors.append({"index": index, "task": tid, "reason": str(exc)})
