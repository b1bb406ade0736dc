"""label-studio-sdk helpers: connect, read tasks and annotations, push predictions, set up projects.

Every call to Label Studio goes through ``call``: connection errors, timeouts and 502/503/504/429 answers are
retried with exponential backoff (0.5 s, 1 s, 2 s, ...; one tenacity policy, ``retry_policy``), then surface as
``LabelStudioUnavailable`` naming the URL and what was being done, so an RQ job or a script fails with a message a
person can act on. A rejected token is ``LabelStudioAuthError`` at once (retrying cannot fix it). The SDK's own
retries are turned off so the backoff policy lives in one place.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from ml_backend.labelstudio.errors import LabelStudioAuthError, LabelStudioError, LabelStudioUnavailable

__all__ = [
    "LabelStudioAuthError",
    "LabelStudioError",
    "LabelStudioUnavailable",
    "as_dict",
    "backend_webhook_url",
    "basic_auth_header",
    "call",
    "connect",
    "delete_prediction",
    "delete_version_predictions",
    "ensure_backend_webhook",
    "ensure_local_storage",
    "ensure_ml_backend",
    "ensure_view",
    "find_project",
    "latest_annotations",
    "list_tasks",
    "model_version_counts",
    "paged",
    "push_predictions",
    "retrieve_predictions",
    "retry_policy",
    "sdk_client",
    "set_project_model_version",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_ATTEMPTS = 5
RETRY_BASE_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 8.0
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
REQUEST_TIMEOUT_S = 60.0
PREDICTION_CHUNK = 200
BULK_DELETE_TIMEOUT_S = 900.0  # SQLite deletes ~120 predictions/s: a version of 2,000 tasks took 17 s


def _base_url(ls: Any) -> str:
    try:
        return str(ls._client_wrapper.get_base_url())
    except Exception:  # only used in messages
        return "Label Studio"


def _transport_errors() -> tuple[type[BaseException], ...]:
    import httpx
    import requests

    return (httpx.TransportError, requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)  # looked up at call time, so tests can replace time.sleep


def _transient(exc: BaseException) -> bool:
    """Worth another try: the connection failed or timed out, or Label Studio answered 429/502/503/504."""
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, ApiError):
        return (exc.status_code or 0) in RETRYABLE_STATUS
    return isinstance(exc, _transport_errors())


def retry_policy(*, attempts: int, base_delay: float, what: str, url: str) -> Retrying:
    """The project's one retry policy for Label Studio: ``attempts`` tries with exponential backoff
    (``base_delay`` x 1, 2, 4, ... capped at RETRY_MAX_DELAY_S) on transient failures only (``_transient``)."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning("Label Studio at %s: %s failed (%s); retry %d/%d in %.1f s",
                    url, what, _short(exc), state.attempt_number, attempts - 1, delay)  # fmt: skip

    return Retrying(
        stop=stop_after_attempt(max(1, attempts)),
        wait=wait_exponential(multiplier=base_delay, max=RETRY_MAX_DELAY_S),
        retry=retry_if_exception(_transient),
        before_sleep=before_sleep,
        sleep=_sleep,
        reraise=True,
    )


def call(
    ls: Any,
    fn: Callable[..., T],
    *args: Any,
    what: str,
    attempts: int = RETRY_ATTEMPTS,
    base_delay: float = RETRY_BASE_DELAY_S,
    **kwargs: Any,
) -> T:
    """``fn(*args, **kwargs)`` under ``retry_policy``; errors name the URL and ``what`` was being done.

    Annotations are never held only here: a job that fails with ``LabelStudioUnavailable`` re-reads everything from
    Label Studio on its next run.
    """
    from label_studio_sdk.core.api_error import ApiError

    url = _base_url(ls)
    attempts = max(1, attempts)
    try:
        return retry_policy(attempts=attempts, base_delay=base_delay, what=what, url=url)(fn, *args, **kwargs)
    except ApiError as exc:
        status = exc.status_code or 0
        if status in (401, 403):
            raise LabelStudioAuthError(
                f"Label Studio at {url} refused the API token while {what} (HTTP {status}): check "
                "LABEL_STUDIO_API_KEY (a legacy token also needs LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true on "
                "the server)"
            ) from exc
        if status not in RETRYABLE_STATUS:
            raise LabelStudioError(f"Label Studio at {url} answered HTTP {status} while {what}: {_body(exc)}") from exc
        last: BaseException = exc
    except Exception as exc:
        if not _transient(exc):
            raise
        last = exc
    raise LabelStudioUnavailable(
        f"Label Studio at {url} is unavailable: {what} failed {attempts} times ({_short(last)}); is the server "
        "running and LABEL_STUDIO_URL right?"
    ) from last


def _body(exc: Any, limit: int = 400) -> str:
    """An API error body for a message: HTML pages (wrong URL) summarised, long bodies cut."""
    text = str(getattr(exc, "body", "") or "").strip()
    if text.lower().startswith(("<!doctype html", "<html")):
        return "an HTML page, not the Label Studio API (is LABEL_STUDIO_URL the server's root URL?)"
    return text if len(text) <= limit else text[:limit] + "..."


def _short(exc: BaseException | None) -> str:
    if exc is None:
        return "no error"
    status = getattr(exc, "status_code", None)
    return f"HTTP {status}" if status else f"{type(exc).__name__}: {exc}"


def as_dict(obj: Any) -> dict:
    """SDK models (pydantic) and plain dicts alike as a JSON-like dict."""
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "dict"):
        return obj.dict()
    raise TypeError(f"cannot convert {type(obj).__name__} to dict")


def sdk_client(settings: Any, *, timeout: float = REQUEST_TIMEOUT_S) -> Any:
    """The one factory of SDK clients: ``LABEL_STUDIO_URL`` with ``LABEL_STUDIO_API_KEY``, no request made, no retries
    of its own (``call`` retries). ``connect`` adds the check that both work; the status page uses it as is, with
    its short timeout, so a slow Label Studio never holds the page."""
    from label_studio_sdk import LabelStudio

    url = str(getattr(settings, "label_studio_url", "") or "").rstrip("/")
    key = str(getattr(settings, "label_studio_api_key", "") or "")
    if not url:
        raise LabelStudioUnavailable("LABEL_STUDIO_URL is not set")
    if not key:
        raise LabelStudioAuthError(
            f"LABEL_STUDIO_API_KEY is not set: copy the token from {url}/user/account (Access Token) into it"
        )
    return LabelStudio(base_url=url, api_key=key, timeout=timeout, max_retries=0)


def connect(settings: Any, *, attempts: int = RETRY_ATTEMPTS, timeout: float = REQUEST_TIMEOUT_S) -> Any:
    """An SDK client for ``LABEL_STUDIO_URL`` with ``LABEL_STUDIO_API_KEY``, after checking both work (whoami)."""
    ls = sdk_client(settings, timeout=timeout)
    url = str(getattr(settings, "label_studio_url", "") or "").rstrip("/")
    try:
        call(ls, ls.users.whoami, what="checking the API token (GET /api/current-user/whoami)", attempts=attempts)
    except LabelStudioAuthError:
        raise
    except LabelStudioError as exc:
        if isinstance(exc, LabelStudioUnavailable):
            raise
        raise LabelStudioUnavailable(f"{url} does not answer like Label Studio: {exc}") from exc
    except Exception as exc:  # e.g. an HTML page where JSON was expected: wrong URL
        raise LabelStudioUnavailable(
            f"{url} does not answer like Label Studio ({type(exc).__name__}: {exc}); check LABEL_STUDIO_URL"
        ) from exc
    return ls


def paged(ls: Any, fn: Callable[..., Any], *, what: str, page_size: int = 100, **kwargs: Any) -> list[dict]:
    """All items of a paginated SDK list call, page by page (each page retried).

    The SDK's ``has_next`` only means "this page was not empty" and Label Studio answers 404 for a page past the
    end, so paging stops on the reported total (``total``/``count``) or on a short page.
    """
    items_all: list[dict] = []
    page = 1
    while True:
        pager = call(ls, fn, page=page, page_size=page_size, what=f"{what} (page {page})", **kwargs)
        items = list(pager.items or [])
        items_all.extend(as_dict(t) for t in items)
        response = getattr(pager, "response", None)
        total = getattr(response, "total", None) or getattr(response, "count", None)
        if not items or len(items) < page_size or (total is not None and len(items_all) >= int(total)):
            return items_all
        page += 1


def list_tasks(ls: Any, project_id: int, *, page_size: int = 100, fields: str = "all") -> list[dict]:
    """Every task of a project with its data, annotations and predictions (``fields="all"``)."""
    return paged(
        ls, ls.tasks.list, project=int(project_id), fields=fields, page_size=page_size,
        what=f"listing tasks of project {project_id}",
    )  # fmt: skip


def _annotation_time(ann: dict) -> tuple[str, int]:
    return (str(ann.get("updated_at") or ann.get("created_at") or ""), int(ann.get("id") or 0))


def latest_annotations(tasks: Iterable[dict]) -> dict[int, dict]:
    """The annotation to learn from per task: ``{task_id: annotation}``.

    Rules: skipped tasks (``was_cancelled``) are not annotations; a ground-truth annotation wins over others (a
    reviewer marked it as the reference); otherwise the most recently updated one (ties: highest id). An empty
    ``result`` is kept: in a dense config it means "no mitochondria on this tile", which is a label; the training
    job decides per config (sparse tiles without any painted pixel teach nothing and are skipped there).
    """
    chosen: dict[int, dict] = {}
    for task in tasks:
        task = as_dict(task)
        anns = [as_dict(a) for a in (task.get("annotations") or [])]
        usable = [a for a in anns if not a.get("was_cancelled")]
        if not usable:
            continue
        ground_truth = [a for a in usable if a.get("ground_truth")]
        pool = ground_truth or usable
        chosen[int(task["id"])] = max(pool, key=_annotation_time)
    return chosen


def push_predictions(ls: Any, project_id: int, predictions: list[dict], *, chunk: int = PREDICTION_CHUNK) -> int:
    """Bulk-create predictions ``[{task, result, score, model_version}]`` in chunks; returns how many were sent."""
    sent = 0
    for start in range(0, len(predictions), max(1, chunk)):
        part = predictions[start : start + chunk]
        for p in part:
            if "task" not in p or "result" not in p:
                raise ValueError(f"prediction needs 'task' and 'result', got keys {sorted(p)}")
        call(
            ls, ls.projects.import_predictions, id=int(project_id), request=part,
            what=f"uploading predictions {start}..{start + len(part) - 1} of project {project_id}",
        )  # fmt: skip
        sent += len(part)
    return sent


def set_project_model_version(ls: Any, project_id: int, version: str) -> None:
    """Make Label Studio order the queue by predictions of ``version`` (scores of other versions are ignored)."""
    call(ls, ls.projects.update, id=int(project_id), model_version=str(version),
         what=f"setting model_version={version!r} on project {project_id}")  # fmt: skip


def retrieve_predictions(ls: Any, project_id: int, *, timeout: float = 600.0) -> None:
    """Label Studio's "Retrieve predictions" action on all tasks: it sends them to the connected backend's /predict
    in one request and stores the answers (tasks already holding a prediction of the backend's version are
    skipped). Synchronous when Label Studio runs without Redis."""
    from label_studio_sdk.core.request_options import RequestOptions

    call(
        ls, ls.actions.create, id="retrieve_tasks_predictions", project=int(project_id),
        selected_items={"all": True, "excluded": []}, request_options=RequestOptions(timeout_in_seconds=int(timeout)),
        what=f"retrieving predictions for project {project_id}", attempts=1,
    )  # fmt: skip


def _api(ls: Any, method: str, path: str, *, json: Any = None, timeout: float = REQUEST_TIMEOUT_S) -> Any:
    """A raw authenticated API request through the SDK's HTTP client (for endpoints the SDK lacks); a non-2xx answer
    raises the SDK's ApiError so ``call`` retries or classifies it like any other."""
    from label_studio_sdk.core.api_error import ApiError
    from label_studio_sdk.core.request_options import RequestOptions

    resp = ls._client_wrapper.httpx_client.request(
        path, method=method, json=json, request_options=RequestOptions(timeout_in_seconds=int(timeout))
    )
    if not 200 <= resp.status_code < 300:
        raise ApiError(status_code=resp.status_code, headers=dict(resp.headers), body=resp.text)
    return resp.json() if resp.content else None


def model_version_counts(
    ls: Any, project_id: int, *, attempts: int = RETRY_ATTEMPTS, timeout: float = REQUEST_TIMEOUT_S
) -> dict[str, int]:
    """``{model_version: number of predictions}`` of a project (``GET /api/projects/{id}/model-versions/``);
    ``attempts=1`` and a short ``timeout`` for callers that bound their own time (the status page)."""
    data = call(ls, _api, ls, "GET", f"api/projects/{int(project_id)}/model-versions/", timeout=timeout,
                what=f"listing model versions of project {project_id}", attempts=attempts)  # fmt: skip
    return {str(k): int(v) for k, v in (data or {}).items()} if isinstance(data, dict) else {}


def delete_version_predictions(ls: Any, project_id: int, version: str) -> int:
    """Delete every prediction of ``version`` in the project in ONE call
    (``DELETE /api/projects/{id}/model-versions/``); returns how many were deleted."""
    data = call(ls, _api, ls, "DELETE", f"api/projects/{int(project_id)}/model-versions/",
                json={"model_version": str(version)}, timeout=BULK_DELETE_TIMEOUT_S,
                what=f"deleting the predictions of {version!r} in project {project_id}")  # fmt: skip
    return int((data or {}).get("deleted_predictions", 0)) if isinstance(data, dict) else 0


def delete_prediction(ls: Any, prediction_id: int) -> bool:
    """Delete one prediction; False when it is already gone (404)."""
    try:
        call(ls, ls.predictions.delete, id=int(prediction_id), what=f"deleting prediction {prediction_id}")
    except LabelStudioError as exc:
        if isinstance(exc, LabelStudioUnavailable) or "HTTP 404" not in str(exc):
            raise
        return False
    return True


# ---------------------------------------------------------------------- project set-up (idempotent helpers)
def find_project(ls: Any, title: str) -> dict | None:
    """The project with exactly this title (the lowest id if several), or None."""
    found = [p for p in paged(ls, ls.projects.list, what="listing projects") if p.get("title") == title]
    return min(found, key=lambda p: int(p["id"])) if found else None


def ensure_local_storage(ls: Any, project_id: int, path: str, *, regex_filter: str = r".*\.png$") -> dict:
    """A local-files import storage of ``path`` for the project (created once); /data/local-files needs it."""
    existing = call(ls, ls.import_storage.local.list, project=int(project_id), what="listing local storages")
    for storage in existing or []:
        storage = as_dict(storage)
        if str(storage.get("path", "")).rstrip("/") == str(path).rstrip("/"):
            return storage
    created = call(
        ls, ls.import_storage.local.create, project=int(project_id), path=str(path), regex_filter=regex_filter,
        use_blob_urls=True, title=f"tiles: {path}", what=f"creating a local storage for {path}",
    )  # fmt: skip
    return as_dict(created)


def ensure_ml_backend(
    ls: Any,
    project_id: int,
    url: str,
    *,
    title: str = "EM active-learning backend",
    basic_auth: tuple[str, str] | None = None,
) -> dict:
    """Connect the backend at ``url`` to the project once; an existing connection to the same URL is kept, its
    authentication brought up to date (Label Studio sends these credentials with /setup, /predict and "Start
    training"; the password is write-only in its API, so with ``basic_auth`` it is always re-sent). Updating a
    connection does not touch the webhook Label Studio created for it (``create_ml_webhook`` runs on creation only)."""
    url = url.rstrip("/")
    kwargs: dict[str, Any] = {"auth_method": "NONE"}
    if basic_auth:
        kwargs = {"auth_method": "BASIC_AUTH", "basic_auth_user": basic_auth[0], "basic_auth_pass": basic_auth[1]}
    existing = call(ls, ls.ml.list, project=int(project_id), what="listing ML backends")
    for backend in existing or []:
        backend = as_dict(backend)
        if str(backend.get("url", "")).rstrip("/") != url:
            continue
        if not basic_auth and backend.get("auth_method") in (None, "", "NONE"):
            return backend
        # Label Studio validates an update like a creation (health check and /setup with these credentials), so
        # the URL and project go along.
        updated = call(
            ls, ls.ml.update, id=int(backend["id"]), url=url, project=int(project_id),
            what=f"updating the authentication of ML backend {url}", **kwargs,
        )  # fmt: skip
        return as_dict(updated)
    created = call(
        ls, ls.ml.create, project=int(project_id), url=url, title=title, is_interactive=False,
        what=f"connecting the ML backend {url}", **kwargs,
    )  # fmt: skip
    return as_dict(created)


def basic_auth_header(user: str, password: str) -> str:
    """The value of an ``Authorization`` header for HTTP basic auth (RFC 7617, UTF-8)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def backend_webhook_url(backend_url: str) -> str:
    """The URL Label Studio 1.23.2 gives the webhook it creates for a connected ML backend (``ml/models.py``
    ``create_ml_webhook``: the backend URL without trailing slash + ``/webhook``)."""
    return backend_url.rstrip("/") + "/webhook"


def ensure_backend_webhook(ls: Any, project_id: int, backend_url: str, *, basic_auth: tuple[str, str] | None) -> dict:
    """Exactly one project webhook to ``<backend>/webhook`` that carries the backend's credentials; returns it as
    read back from Label Studio.

    Label Studio 1.23.2 posts annotation webhooks with the webhook's own ``headers`` only, never with the ML
    backend's basic auth, and creates the backend's webhook without headers: behind basic auth every
    ANNOTATION_* event would be answered 401 and nothing would train. So the webhook Label Studio created is given an
    ``Authorization: Basic`` header (any other header is kept; a stale one is replaced, and removed when auth is
    off). Label Studio never re-creates or resets it: ``create_ml_webhook`` runs only when a backend is created and
    skips a URL that already has a webhook. A missing one is created; duplicates to the same URL are deleted,
    since each would post every event once more.
    """
    pid = int(project_id)
    url = backend_webhook_url(backend_url)
    listed = call(ls, ls.webhooks.list, project=str(pid), what=f"listing the webhooks of project {pid}")
    hooks = sorted(
        (h for h in (as_dict(h) for h in listed or []) if str(h.get("url", "")).rstrip("/") == url
         and h.get("project") is not None and int(h["project"]) == pid),
        key=lambda h: int(h["id"]),
    )  # fmt: skip
    for extra in hooks[1:]:
        log.warning("project %s: deleting duplicate webhook %s to %s (each copy would post every event again)",
                    pid, extra["id"], url)  # fmt: skip
        call(ls, ls.webhooks.delete, id=int(extra["id"]), what=f"deleting duplicate webhook {extra['id']}")
    current = hooks[0] if hooks else None
    headers = {k: str(v) for k, v in ((current or {}).get("headers") or {}).items() if k.lower() != "authorization"}
    if basic_auth:
        headers["Authorization"] = basic_auth_header(*basic_auth)
    if current is None:
        log.info("project %s: creating the webhook to %s", pid, url)
        current = as_dict(call(
            ls, ls.webhooks.create, url=url, project=pid, send_payload=True, send_for_all_actions=True,
            headers=headers, what=f"creating the webhook to {url} for project {pid}",
        ))  # fmt: skip
    elif (current.get("headers") or {}) != headers or not current.get("send_payload"):
        # A partial update resets the webhook's action list unless it is sent along (WebhookSerializer.update).
        call(
            ls, ls.webhooks.update, id=int(current["id"]), headers=headers, send_payload=True,
            actions=list(current.get("actions") or []), what=f"setting the headers of webhook {current['id']}",
        )  # fmt: skip
    return as_dict(call(ls, ls.webhooks.get, id=int(current["id"]), what=f"reading webhook {current['id']}"))


def ensure_view(ls: Any, project_id: int, title: str, ordering: list[str]) -> dict:
    """A Data Manager tab named ``title`` ordered by ``ordering`` (e.g. ["tasks:predictions_score"])."""
    data = {"title": title, "ordering": ordering, "filters": {"conjunction": "and", "items": []}}
    for view in call(ls, ls.views.list, project=int(project_id), what="listing views") or []:
        view = as_dict(view)
        if (view.get("data") or {}).get("title") == title:
            if (view.get("data") or {}).get("ordering") != ordering:
                view = as_dict(call(ls, ls.views.update, id=view["id"], project=int(project_id), data=data,
                                    what=f"updating view {title!r}"))  # fmt: skip
            return view
    return as_dict(call(ls, ls.views.create, project=int(project_id), data=data, what=f"creating view {title!r}"))
