"""Set a Label Studio project up for the active-learning loop (idempotent: run it as often as you like).

1. the project (found by title, else created) with a label config from ``label_config/`` (default
   ``dense_uncertainty.xml``: the mask, the uncertainty layer and the suggested region), one annotation per task
   and "Uncertainty sampling": every way of asking Label Studio 1.23.2 for the next task ("Label All Tasks" from any
   tab, ``/next`` with or without ``view=``) serves each annotator the unlocked task with the LOWEST prediction
   score of the project's model version (see ``SHARED_QUEUE`` for why, and what must not be changed);
2. optionally a local storage for a tile folder (``--storage-path``; ``import_tiles.py`` makes its own);
3. the ML backend connected (``--backend-url``; basic auth from BASIC_AUTH_USER/BASIC_AUTH_PASS when set), and
   its annotation webhook carrying the same credentials as an ``Authorization: Basic`` header: Label Studio
   1.23.2 posts webhooks with the webhook's own headers only, so without it every annotation is answered 401 by
   a backend behind basic auth. A backend that requires credentials is refused before anything is changed when
   none (or wrong ones) are given; re-run this after changing the backend's credentials;
4. the project's ``model_version`` set to the backend's current version: connecting a backend overwrites it with
   the backend's title, and Label Studio ignores the scores of predictions of any other version;
5. a Data Manager tab "Active learning queue" sorted by ascending prediction score;
6. the backend's status page (``<backend url>/status/<project id>``: live version, training progress, learning
   curve) linked from the project description, so the team finds it from Label Studio (``--public-url`` when the
   browser reaches the backend under another address than Label Studio does).

    python -m ml_backend.labelstudio.setup --title "EM mitochondria" \\
        --label-config label_config/dense_uncertainty.xml --backend-url http://127.0.0.1:9090
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from ml_backend.config import Settings
from ml_backend.labelstudio.client import (
    LabelStudioError,
    as_dict,
    basic_auth_header,
    call,
    connect,
    ensure_backend_webhook,
    ensure_local_storage,
    ensure_ml_backend,
    ensure_view,
    find_project,
    retrieve_predictions,
    set_project_model_version,
)
from ml_backend.labelstudio.labelconfig import LabelConfigError, parse_label_config

REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("setup_project")

QUEUE_VIEW_TITLE = "Active learning queue"
QUEUE_ORDERING = ["tasks:predictions_score"]  # ascending: lowest score (most informative) first
SAMPLING = "Uncertainty sampling"  # lowest score first from every tab and from /next without view=; see SHARED_QUEUE
DEFAULT_LABEL_CONFIG = REPO_ROOT / "label_config" / "dense_uncertainty.xml"  # issue 18: annotators see why a tile


class SetupError(RuntimeError):
    """The project cannot be set up (message says what to fix)."""


def check_backend_auth(backend_url: str, auth: tuple[str, str] | None, timeout: float = 10.0) -> bool:
    """Whether the backend requires basic auth, asked on an authenticated route (``/health?details=1``) before
    anything is changed in Label Studio. Raises ``SetupError`` when it requires credentials and none or wrong ones
    were given: connecting it anyway would leave every webhook answered 401, so nothing would ever train."""
    url = backend_url.rstrip("/") + "/health"
    try:
        resp = requests.get(url, params={"details": "1"}, auth=auth, timeout=timeout)
    except requests.RequestException as exc:
        raise SetupError(f"ML backend at {backend_url} is unreachable: {exc}") from exc
    if resp.status_code == 401:
        if auth is None:
            raise SetupError(
                f"the ML backend at {backend_url} requires HTTP basic auth: pass its credentials with "
                "--basic-auth-user/--basic-auth-pass (or BASIC_AUTH_USER/BASIC_AUTH_PASS), the ones it was started "
                "with; without them Label Studio's webhooks would be refused and nothing would train"
            )
        raise SetupError(f"the ML backend at {backend_url} refused the credentials of user {auth[0]!r} (HTTP 401): "
                         "give the BASIC_AUTH_USER/BASIC_AUTH_PASS it was started with")  # fmt: skip
    if resp.status_code != 200:
        raise SetupError(f"ML backend at {backend_url} answered /health?details=1 with HTTP {resp.status_code}: "
                         f"{resp.text[:300]}")  # fmt: skip
    try:
        requires = bool(resp.json().get("basic_auth"))
    except ValueError as exc:
        raise SetupError(f"{url} does not answer like this ML backend (no JSON): {resp.text[:200]!r}") from exc
    if not requires:
        log.warning("the ML backend at %s does not require credentials (BASIC_AUTH_USER/BASIC_AUTH_PASS unset): "
                    "anyone who can reach it may call every route; keep it on a private network",
                    backend_url)  # fmt: skip
    return requires


def verify_webhook(hook: dict, backend_url: str, auth: tuple[str, str] | None) -> None:
    """Raise ``SetupError`` unless the webhook, as read back from Label Studio, will deliver annotation events to
    the backend with its credentials (active, with payload, for all or the annotation actions)."""
    problems = []
    if auth is not None and (hook.get("headers") or {}).get("Authorization") != basic_auth_header(*auth):
        problems.append("it does not carry the backend's credentials (Authorization header)")
    if not hook.get("is_active", True):
        problems.append("it is disabled (is_active=false)")
    if not hook.get("send_payload", True):
        problems.append("it sends no payload")
    if not hook.get("send_for_all_actions", True) and not {"ANNOTATION_CREATED", "ANNOTATION_UPDATED"} <= set(
        hook.get("actions") or []
    ):
        problems.append("it is not sent for ANNOTATION_CREATED and ANNOTATION_UPDATED")
    if problems:
        raise SetupError(f"Label Studio's webhook {hook.get('id')} to {hook.get('url')} would not reach "
                         f"{backend_url} as needed: {'; '.join(problems)}. Fix it under the project's Settings > "
                         "Webhooks or delete it and run set-up again")  # fmt: skip


def backend_model_version(backend_url: str, project: dict, auth: tuple[str, str] | None, timeout: float = 10.0) -> str:
    """Ask the backend (POST /setup, as Label Studio does) which model version it serves for this project."""
    try:  # Label Studio's project uid: "<id>.<created_at as unix seconds>"
        stamp = int(datetime.fromisoformat(str(project.get("created_at")).replace("Z", "+00:00")).timestamp())
    except ValueError:
        stamp = 0
    body = {"project": f"{project['id']}.{stamp}", "schema": project["label_config"]}
    try:
        resp = requests.post(backend_url.rstrip("/") + "/setup", json=body, auth=auth, timeout=timeout)
    except requests.RequestException as exc:
        raise SetupError(f"ML backend at {backend_url} is unreachable: {exc}") from exc
    if resp.status_code != 200:
        raise SetupError(f"ML backend at {backend_url} answered /setup with HTTP {resp.status_code}: {resp.text[:300]}")
    return str(resp.json()["model_version"])


def sync_model_version(ls: Any, project_id: int, version: str, *, retrieve: bool = True) -> str | None:
    """Set the project's ``model_version`` to the backend's ``version``; returns it, or None when not possible yet.

    Label Studio accepts a project model version only when predictions of that version exist (or an ML backend
    has that title), so with ``retrieve`` the backend is first asked for predictions of all tasks ("Retrieve
    predictions"). A project without tasks keeps its version until the next run (after importing tiles).
    """
    project = as_dict(call(ls, ls.projects.get, id=int(project_id), what=f"reading project {project_id}"))
    if not project.get("task_number"):
        log.warning("project %s has no tasks yet: run this again after importing tiles to set model_version=%s "
                    "(Label Studio only accepts versions that have predictions)", project_id, version)  # fmt: skip
        return version if project.get("model_version") == version else None
    if retrieve:  # tasks that already hold a prediction of this version are skipped by Label Studio
        retrieve_predictions(ls, int(project_id))
    if project.get("model_version") == version:
        return version
    try:
        set_project_model_version(ls, int(project_id), version)
    except LabelStudioError as exc:
        log.warning("project %s: model_version=%s not accepted yet (%s); no predictions of that version exist",
                    project_id, version, exc)  # fmt: skip
        return None
    log.info("project %s: model_version=%s (the queue orders by its prediction scores)", project_id, version)
    return version


# Every way of getting the next task serves the queue (issues 12, 18), read off Label Studio 1.23.2's code:
# - "Label All Tasks" (any tab) posts the next_task action with an EMPTY body (dm:labelstream:mode "all": no
#   filters, no ordering, no view), and /next without view= (an SDK script) has no ordering either: under
#   "Sequential sampling" both serve tasks in id order (issue 18: tasks 1-20, the first two slices).
# - Under "Uncertainty sampling" /next (any tab, with or without view=, dm_queue false) orders the tasks holding a
#   prediction of the project's model_version by its score, LOWEST first, and takes the first one not locked by
#   someone else (``_try_uncertainty_sampling``). It draws at random only when ``project.annotators()`` counts more
#   than one; in the open-source edition that count is of team members (Enterprise) and project members
#   (``add_collaborator``, never called by the open-source server), so it is 0 there whatever the number of users:
#   the lowest score is served (checked with two users in tests/integration/test_first_hour.py).
# - /next locks the task it serves (TASK_LOCK_TTL) and skips tasks others hold once maximum_annotations (the
#   overlap) is reached, so concurrent annotators get different tasks; no overlap-first reordering.
# "Label Tasks As Displayed" follows the tab's own ordering: the "Active learning queue" tab sorts by score.
SHARED_QUEUE = {"maximum_annotations": 1, "sampling": SAMPLING, "show_overlap_first": False}


def configure_shared_queue(ls: Any, project_id: int) -> dict[str, Any]:
    """Put the project's queue into the configuration where concurrent annotators get different informative tasks
    (``SHARED_QUEUE``); returns what was changed."""
    project = as_dict(call(ls, ls.projects.get, id=int(project_id), what=f"reading project {project_id}"))
    changes = {k: v for k, v in SHARED_QUEUE.items() if project.get(k) != v}
    if changes:
        call(ls, ls.projects.update, id=int(project_id), what=f"configuring the shared queue of project {project_id}",
             **changes)  # fmt: skip
    return changes


STATUS_LINK_PREFIX = "Model status (ML backend): "


def status_url(backend_url: str, project_id: int) -> str:
    """The backend's status page of one project."""
    return f"{backend_url.rstrip('/')}/status/{int(project_id)}"


def ensure_status_link(ls: Any, project: dict, url: str) -> bool:
    """Put ``STATUS_LINK_PREFIX + url`` as the last line of the project description (replacing an older such line,
    keeping whatever else the team wrote there); True when the description changed."""
    description = str(project.get("description") or "")
    kept = [line for line in description.splitlines() if not line.startswith(STATUS_LINK_PREFIX)]
    while kept and not kept[-1].strip():
        kept.pop()
    wanted = "\n".join([*kept, STATUS_LINK_PREFIX + url])
    if wanted == description:
        return False
    pid = int(project["id"])
    call(ls, ls.projects.update, id=pid, description=wanted, what=f"linking the status page from project {pid}")
    return True


def setup_project(
    ls: Any,
    *,
    title: str,
    label_config: str,
    backend_url: str | None = None,
    basic_auth: tuple[str, str] | None = None,
    storage_path: str | None = None,
    backend_title: str = "EM active-learning backend",
    retrieve: bool = True,
    public_url: str | None = None,
) -> dict[str, Any]:
    """Create or update the project; returns {"project", "created", "ml_backend", "model_version", "view", ...}.

    Parameters: the keyword options are ``ml-backend setup``'s flags (title, label config, backend URL and basic
    auth, backend title, storage path, retrieve, public URL), passed by name by the CLI and the quick start.
    """
    try:
        parse_label_config(label_config)
    except LabelConfigError as exc:
        raise SetupError(f"label config cannot be used: {exc}") from exc
    requires_auth = check_backend_auth(backend_url, basic_auth) if backend_url else False
    existing = find_project(ls, title)
    created = existing is None
    if created:
        project = as_dict(call(ls, ls.projects.create, title=title, label_config=label_config, sampling=SAMPLING,
                               what=f"creating project {title!r}"))  # fmt: skip
        log.info("created project %s (%r)", project["id"], title)
    else:
        pid = int(existing["id"])
        changes: dict[str, Any] = {}
        if existing.get("sampling") != SAMPLING:
            changes["sampling"] = SAMPLING
        if (existing.get("label_config") or "").strip() != label_config.strip():
            changes["label_config"] = label_config
        if changes:
            call(ls, ls.projects.update, id=pid, what=f"updating project {pid} ({', '.join(changes)})", **changes)
        project = as_dict(call(ls, ls.projects.get, id=pid, what=f"reading project {pid}"))
        log.info("project %s (%r) exists; updated: %s", pid, title, ", ".join(changes) or "nothing")
    pid = int(project["id"])
    summary: dict[str, Any] = {"project": pid, "created": created, "title": title}
    if storage_path:
        summary["storage"] = ensure_local_storage(ls, pid, str(Path(storage_path).expanduser().resolve())).get("id")
    if backend_url:
        backend = ensure_ml_backend(ls, pid, backend_url, title=backend_title, basic_auth=basic_auth)
        summary["ml_backend"] = backend.get("id")
        if backend.get("state") == "ER":
            raise SetupError(f"Label Studio reports the ML backend at {backend_url} in error: "
                             f"{backend.get('error_message')}")  # fmt: skip
        hook = ensure_backend_webhook(ls, pid, backend_url, basic_auth=basic_auth)
        verify_webhook(hook, backend_url, basic_auth)
        summary["webhook"] = hook.get("id")
        summary["basic_auth"] = requires_auth
        log.info("project %s: webhook %s posts to %s%s", pid, hook.get("id"), hook.get("url"),
                 " with the backend's credentials" if basic_auth else "")  # fmt: skip
        version = backend_model_version(backend_url, project, basic_auth)
        summary["backend_version"] = version
        summary["model_version"] = sync_model_version(ls, pid, version, retrieve=retrieve)
    view = ensure_view(ls, pid, QUEUE_VIEW_TITLE, QUEUE_ORDERING)
    summary["view"] = view.get("id")
    if public_url or backend_url:
        summary["status_url"] = status_url(str(public_url or backend_url), pid)
        ensure_status_link(ls, project, summary["status_url"])
    summary["shared_queue"] = configure_shared_queue(ls, pid)
    return summary


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--title", default="EM mitochondria (active learning)")
    parser.add_argument("--label-config", default=str(DEFAULT_LABEL_CONFIG),
                        help="label config XML file (default label_config/dense_uncertainty.xml; any config of "
                        "label_config/)")  # fmt: skip
    parser.add_argument("--backend-url", default=None, help="ML backend URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--storage-path", default=None, help="tile folder for a local storage (optional)")
    parser.add_argument("--url", default=settings.label_studio_url, help="LABEL_STUDIO_URL")
    parser.add_argument("--token", default=settings.label_studio_api_key, help="LABEL_STUDIO_API_KEY")
    parser.add_argument("--basic-auth-user", default=settings.basic_auth_user, help="BASIC_AUTH_USER")
    parser.add_argument("--basic-auth-pass", default=settings.basic_auth_pass, help="BASIC_AUTH_PASS")
    parser.add_argument("--no-retrieve", action="store_true", help="do not ask the backend for predictions")
    parser.add_argument("--public-url", default=settings.public_url or None,
                        help="backend URL as the team's browsers reach it, for the status link in the project "
                        "description (BACKEND_PUBLIC_URL; default --backend-url)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        label_config = Path(args.label_config).read_text()
    except OSError as exc:
        print(f"error: cannot read the label config: {exc}", file=sys.stderr)
        return 2
    auth = (args.basic_auth_user, args.basic_auth_pass) if args.basic_auth_user else None
    try:
        ls = connect(Settings.from_env(label_studio_url=args.url, label_studio_api_key=args.token))
        summary = setup_project(
            ls, title=args.title, label_config=label_config, backend_url=args.backend_url, basic_auth=auth,
            storage_path=args.storage_path, retrieve=not args.no_retrieve, public_url=args.public_url,
        )  # fmt: skip
    except (LabelStudioError, SetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"project {summary['project']} ({'created' if summary['created'] else 'updated'}): "
          f"{args.url.rstrip('/')}/projects/{summary['project']}/data?tab={summary['view']}  "
          f"model_version={summary.get('model_version', '-')}")  # fmt: skip
    if summary.get("status_url"):
        print(f"status page: {summary['status_url']}" + ("  (basic auth: the backend's login)" if auth else ""))
    if summary.get("webhook"):
        print(f"webhook {summary['webhook']}: annotations are posted to {args.backend_url.rstrip('/')}/webhook"
              + (" with the backend's credentials" if auth else " (no auth: the backend is open)"))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
