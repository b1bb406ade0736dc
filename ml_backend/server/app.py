"""The Label Studio ML-backend protocol (as Label Studio 1.23 speaks it) on Flask, served by gunicorn.

    gunicorn --workers 2 --threads 4 --bind 0.0.0.0:9090 'ml_backend.server.app:create_app()'

Routes:

* ``POST /setup``  {project: "<id>.<ts>", schema: <XML>, extra_params} -> {"model_version"}; stores the project's
  label config and strategy (``extra_params``: {"strategy": "entropy", "aggregation": "sum"}). Label Studio calls it
  before every prediction round with a 3 s timeout, so it never loads a model.
* ``POST /predict`` {tasks, project, label_config} -> {"results": [one prediction per task, in order]} (see
  ``predict.py``); also ``model_version`` and ``errors`` (ignored by Label Studio, useful for people).
* ``GET /health`` -> {"status": "UP", "model_class": "UNet"} and nothing else (open, for Label Studio's 1 s probe and
  liveness checks); ``GET /health?details=1`` adds model directory, device and strategy and needs basic auth when it
  is configured. ``GET /metrics`` -> JSON counters of this process, ``/metrics?format=prometheus`` the same in
  Prometheus' text format (both behind basic auth when configured; the counters are ``metrics.py``).
* ``POST /webhook`` -> ``ml_backend.queue.handle_webhook``: annotation events and START_TRAINING; answers at once
  (Label Studio waits 1 s), 503 with a reason when Redis is down (the next trigger re-reads Label Studio anyway).
  A payload with an id that cannot exist (not in 1..2**31-1) is answered 400 and never reaches Redis: Label Studio
  ignores webhook answers and never sends such ids, so a 400 only ever informs a caller that is not Label Studio.
* ``GET /versions`` -> the project's model versions (Label Studio's model-version picker).
* ``GET /status`` and ``GET /status/<project_id>`` -> the status page (``status_page.py``) behind the same basic auth:
  live version, running job's progress, queue and Label Studio counts (bounded by STATUS_LS_TIMEOUT_S: the page
  renders with a note when Label Studio or Redis is slow or down), learning curve, promotion, the recent per-task
  /predict errors of this worker process, versions with rollback hints. HTML, or JSON for ``Accept:
  application/json``; an unknown project answers 404 with the reason. ``status_source.py`` gathers the data.

Every error is JSON ``{"status": "error", "reason": ...}``: 4xx when the request is at fault, 5xx otherwise; the
server keeps serving. Bodies are validated at the edge (``schemas.py``): size (MAX_REQUEST_BYTES, 413), content type
(415), JSON nesting depth (checked before parsing; per task as it is read for /predict), bounded ids and strings
(400). /predict takes any number of tasks up to the MAX_TASKS protection and answers within PREDICT_DEADLINE_S:
tasks not done by then are answered with an empty list (Label Studio stores nothing) and finished in the background
by RQ jobs (``predict.queue_undone``); without Redis they get a per-task error instead. Models come from a
per-process ``ModelCache`` (loaded once, reloaded when the project's current version changes).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from ml_backend.config import Settings, torch_device
from ml_backend.labelstudio.labelconfig import LabelConfigError, parse_label_config
from ml_backend.labelstudio.prediction import COLD_START_VERSION, ModelConfigMismatch, predict_tasks
from ml_backend.labelstudio.project import stored_label_config
from ml_backend.queue import QueueUnavailable, handle_webhook
from ml_backend.store.cache import ModelCache
from ml_backend.store.registry import ModelRegistry
from ml_backend.strategies.resolve import StrategyError, project_strategy

from .auth import check_basic_auth, details_requested
from .metrics import Metrics, prometheus_text
from .predict import parse_predict_body, queue_undone
from .projects import ProjectError, ProjectStore, parse_project_id, strategy_from_params
from .schemas import (
    BadRequest,
    PredictRequest,
    SetupRequest,
    UnsupportedMediaType,
    WebhookRequest,
    parse_json_body,
    validate,
)
from .status_page import render_not_found, render_status_page, rollback_cli
from .status_source import StatusSource, TaskErrorLog, backend_warnings

__all__ = ["BadRequest", "Metrics", "create_app"]  # BadRequest re-exported from schemas

log = logging.getLogger("ml_backend.server")

MODEL_CLASS = "UNet"


def _error(reason: str, status: int, **extra: Any) -> tuple[Response, int]:
    return jsonify({"status": "error", "reason": reason, **extra}), status


def _json_body() -> dict:
    """The request's JSON object (size, content type and depth checked); BadRequest/415 otherwise."""
    return parse_json_body(request.get_data(cache=True), request.content_type)


def create_app(settings: Settings | None = None) -> Flask:
    """The backend's Flask app (also gunicorn's entry point: ``'ml_backend.server.app:create_app()'``)."""
    settings = settings or Settings.from_env()
    # The heavy modules (torch, strategies, inference) come with this module's imports; the SDK's are imported now:
    # the first /setup must answer within Label Studio's 3 s even on a busy machine, and gunicorn workers should pay
    # this at boot, not on a request.
    import label_studio_sdk.converter.brush  # noqa: F401
    import label_studio_sdk.label_interface  # noqa: F401

    if not logging.getLogger().handlers:
        logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"),
                            format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")  # fmt: skip
    app = Flask("ml_backend")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes  # Flask answers 413 beyond it
    app.json.sort_keys = False
    store = ProjectStore(settings.model_dir)
    cache = ModelCache(settings.model_dir, device=torch_device(settings.device))
    metrics = Metrics()
    errors = TaskErrorLog(settings.status_errors_kept)
    app.extensions["ml_backend"] = {
        "settings": settings, "store": store, "cache": cache, "metrics": metrics, "errors": errors,
    }  # fmt: skip

    @app.before_request
    def _auth() -> Any:
        if not check_basic_auth(request, settings.basic_auth):
            resp, status = _error("basic authentication required (BASIC_AUTH_USER/BASIC_AUTH_PASS)", 401)
            resp.headers["WWW-Authenticate"] = 'Basic realm="ml-backend"'
            return resp, status
        return None

    @app.after_request
    def _count(response: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "other"
        metrics.record(rule, response.status_code)
        return response

    @app.errorhandler(BadRequest)
    def _bad_request(exc: BadRequest) -> Any:
        return _error(str(exc), 415 if isinstance(exc, UnsupportedMediaType) else 400)

    @app.errorhandler(RecursionError)
    def _too_deep(exc: RecursionError) -> Any:  # a last line of defence; the depth scan should come first
        return _error("request nests too deeply", 400)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        return _error(exc.description or exc.name, exc.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(f"internal error: {type(exc).__name__}: {exc}", 500)

    def current_version(pid: str) -> str:
        # A broken CURRENT pointer raises RegistryError -> 500 with its reason, which Label Studio shows on the
        # backend's card: louder than silently serving cold-start predictions.
        return ModelRegistry(settings.model_dir, pid).current_version() or COLD_START_VERSION

    @app.get("/")
    @app.get("/health")
    def health() -> Any:
        # Label Studio probes this unauthenticated with a 1 s timeout; it needs only a 200. Anything about the
        # deployment (paths, device, strategy) is behind auth: ``?details=1``.
        if not details_requested(request):
            return jsonify(status="UP", model_class=MODEL_CLASS)
        return jsonify(
            status="UP",
            model_class=MODEL_CLASS,
            model_dir=str(settings.model_dir),
            device=str(torch_device(settings.device)),
            default_strategy=settings.strategy,
            basic_auth=settings.basic_auth is not None,
            warnings=backend_warnings(settings),
        )

    @app.get("/metrics")
    def metrics_route() -> Any:
        snap = metrics.snapshot()
        snap["model_loads"] = cache.loads
        if request.args.get("format") == "prometheus":  # for a Prometheus scraper (with the basic-auth credentials)
            return Response(prometheus_text(snap), mimetype="text/plain; version=0.0.4; charset=utf-8")
        return jsonify(snap)

    @app.post("/setup")
    def setup() -> Any:
        req: SetupRequest = validate(SetupRequest, _json_body())
        pid = str(req.project)
        try:
            xml = req.xml
            if xml:
                config = parse_label_config(xml)
            else:
                config, xml = stored_label_config(store, pid)  # re-setup without a schema: keep the stored config
            # Setting a strategy: refused (400) unless it resolves. Without one, the stored choice is kept as it is
            # (the readers' one lookup, strategies.resolve.project_strategy, falls back when it no longer resolves);
            # an explicit one replaces a damaged state file.
            stored = store.state(pid) if req.extra_params is None else {}
            if req.extra_params is None and stored.get("strategy"):
                name, params = stored["strategy"], stored.get("strategy_params") or {}
            else:
                name, params = strategy_from_params(req.extra_params, settings.strategy, settings.aggregation)
            store.save(pid, xml, config, strategy=name, strategy_params=params)
        except (LabelConfigError, ProjectError) as exc:
            return _error(str(exc), 400)
        version = current_version(pid)
        log.info("project %s set up: %s config (%s), strategy %s, model %s",
                 pid, config.mode, ", ".join(config.labels), name, version)  # fmt: skip
        return jsonify(model_version=version)

    @app.post("/predict")
    def predict() -> Any:
        t0 = time.perf_counter()
        deadline = time.monotonic() + float(settings.predict_deadline_s)
        # Read task by task, each slimmed to id + data (any size Label Studio sends; predict.parse_predict_body).
        request.max_content_length = max(settings.max_request_bytes, settings.predict_max_request_bytes)
        body = parse_predict_body(request.get_data(cache=False), request.content_type)
        req: PredictRequest = validate(PredictRequest, body)
        del body
        tasks = req.tasks
        if not tasks:
            return jsonify(results=[])
        pid = str(req.project)
        try:
            config, _xml = stored_label_config(store, pid, req.label_config or None)
            strategy = project_strategy(pid, settings, store=store)  # a stored choice that became invalid: default
        except (LabelConfigError, ProjectError) as exc:
            return _error(str(exc), 400)
        except StrategyError as exc:  # only an invalid deployment default (STRATEGY) gets here
            return _error(f"project {pid}: {exc}", 400)
        entry = cache.get(pid)
        try:
            outcome = predict_tasks(tasks, config, entry, strategy, settings, deadline=deadline)
        except ModelConfigMismatch as exc:
            return _error(str(exc), 409)
        queue_undone(req.project, outcome, tasks, settings)  # not done by the deadline: answered [], finished by RQ
        errors.add(pid, outcome.errors)
        seconds = time.perf_counter() - t0
        queued = int((outcome.queued or {}).get("tasks", 0))
        metrics.record_predict(seconds, len(tasks), len(outcome.errors), cold=entry is None, queued=queued)
        log.info("project %s: %d task(s) predicted with %s in %.2f s (%d failed, %d queued) %s", pid, len(tasks),
                 outcome.model_version, seconds, len(outcome.errors), queued, outcome.timings)  # fmt: skip
        extra = {"queued": outcome.queued} if outcome.queued else {}
        return jsonify(results=outcome.results, model_version=outcome.model_version, errors=outcome.errors, **extra)

    @app.post("/webhook")
    def webhook() -> Any:
        body = _json_body()
        validate(WebhookRequest, body)
        try:
            WebhookRequest.check_ids(body)  # before Redis: an id that cannot exist must not become a key
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        try:
            result = handle_webhook(body, settings)
        except QueueUnavailable as exc:
            log.error("webhook %s not queued: %s", body.get("action"), exc)
            return _error(str(exc), 503, action=body.get("action"))
        status = 202 if result.get("status") in ("queued", "coalesced") else 200
        return jsonify(result), status

    @app.route("/versions", methods=["GET", "POST"])
    def versions() -> Any:
        body = _json_body() if request.method == "POST" and request.content_length else {}
        project = body.get("project") or request.args.get("project")
        if not project:
            return jsonify(versions=[], reason="pass ?project=<id> to list a project's versions")
        try:
            pid = parse_project_id(project)
        except ProjectError as exc:
            return _error(str(exc), 400)
        reg = ModelRegistry(settings.model_dir, pid)
        return jsonify(versions=[m.get("version") for m in reg.versions()], current=reg.current_version())

    status_source = StatusSource(settings, store, errors)

    @app.get("/status")
    def status_all() -> Any:
        status = status_source.status(status_source.known_projects())
        return _status_answer(status)

    @app.get("/status/<project>")
    def status_one(project: str) -> Any:
        known = status_source.known_projects()
        try:
            pid = parse_project_id(project)
        except ProjectError as exc:
            pid, reason = None, f"{project[:40]!r} is not a project id: {exc}"
        else:
            reason = f"no project {pid} on this backend: it was never set up here (no label config, no model version)"
        if pid is None or pid not in known:
            return _not_found(project[:40], known, reason)
        return _status_answer(status_source.status([pid]))

    return app


def _wants_json() -> bool:
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" or request.args.get("format") == "json"


def _status_answer(status: dict) -> Any:
    if _wants_json():
        return jsonify(status)
    return Response(render_status_page(status, cli=rollback_cli()), mimetype="text/html")


def _not_found(project: str, known: list[str], reason: str) -> Any:
    if _wants_json():
        return _error(reason, 404, known_projects=known)
    return Response(render_not_found(project, known), status=404, mimetype="text/html")
