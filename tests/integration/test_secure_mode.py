"""Secure mode end to end (issue 16, item 1): the backend behind HTTP basic auth still learns from annotations.

Label Studio 1.23.2 posts annotation webhooks with the webhook's own headers only (``webhooks/utils.py``
``run_webhook_sync``), never with the ML backend's basic auth, and creates the backend's webhook without headers
(``ml/models.py`` ``create_ml_webhook``). Before the fix every ANNOTATION_* webhook was answered 401 and nothing
trained. Here: real Label Studio, the backend under gunicorn with BASIC_AUTH_USER/PASS, a real ``rq worker``, the
project set up by the product's set-up code; annotations created through Label Studio's API fire the real webhooks.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from waiting import scaled, wait_until

from ml_backend.labelstudio.client import as_dict, backend_webhook_url, basic_auth_header, find_project, list_tasks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
TILE = 64
BATCH = 3
USER = "ls-webhooks"
PASSWORD = secrets.token_urlsafe(18)
TRAIN_ENV = {  # tiny training, as in test_retrain_e2e
    "TRAIN_BATCH_SIZE": str(BATCH),
    "TRAIN_STEPS": "20",
    "TRAIN_CROP": "64",
    "MODEL_WIDTH": "8",
    "MODEL_DEPTH": "3",
    "RESCORE_CHUNK": "8",
    "STRATEGY": "entropy",
    "AUDIT_FRACTION": "0",
    "BN_CALIBRATION_TILES": "8",
}


@pytest.fixture(scope="module")
def secure_backend(start_backend, redis_server, tmp_path_factory):
    """The backend under gunicorn requiring basic auth (the session's Redis: ``redis_url`` empties it per test)."""
    model_dir = tmp_path_factory.mktemp("secure-models")
    return start_backend(model_dir, REDIS_URL=redis_server, BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD, **TRAIN_ENV)


@pytest.fixture(scope="module")
def dense_xml() -> str:
    return (REPO / "label_config" / "dense.xml").read_text()


def test_setup_refuses_a_backend_that_requires_auth_without_its_credentials(
    label_studio, ls, secure_backend, dense_xml
):
    from ml_backend.labelstudio.setup import SetupError, setup_project

    title = f"secure refused {uuid.uuid4().hex[:6]}"
    with pytest.raises(SetupError, match="requires HTTP basic auth.*--basic-auth-user"):
        setup_project(ls, title=title, label_config=dense_xml, backend_url=secure_backend.url)
    with pytest.raises(SetupError, match=f"refused the credentials of user '{USER}'"):
        setup_project(ls, title=title, label_config=dense_xml, backend_url=secure_backend.url,
                      basic_auth=(USER, "not-" + PASSWORD))  # fmt: skip
    assert find_project(ls, title) is None  # refused before anything was created in Label Studio

    # the documented command: a clear error and exit status 2, nothing connected
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASIC_AUTH")}
    proc = subprocess.run(
        [sys.executable, "-m", "ml_backend.cli", "setup", "--title", title, "--backend-url", secure_backend.url,
         "--url", label_studio.url, "--token", label_studio.api_key],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=scaled(120),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "requires HTTP basic auth" in proc.stderr and "BASIC_AUTH_USER" in proc.stderr
    assert find_project(ls, title) is None


def _webhooks(ls, pid: int, url: str) -> list[dict]:
    return [h for h in (as_dict(h) for h in ls.webhooks.list(project=str(pid))) if h["url"].rstrip("/") == url]


def test_annotations_train_a_backend_behind_basic_auth(
    label_studio, ls, secure_backend, scripts, dense_xml, redis_url, tmp_path, start_rq_worker, worker_env
):
    from ml_backend.data.synthetic import generate_em_like
    from ml_backend.labelstudio.labelconfig import parse_label_config
    from ml_backend.labelstudio.rle import mask_to_results
    from ml_backend.labelstudio.setup import STATUS_LINK_PREFIX
    from ml_backend.store.registry import ModelRegistry

    auth = (USER, PASSWORD)
    stack, masks = generate_em_like(2, 128, seed=5)  # 2 slices x 4 tiles of 64 x 64
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    worker = start_rq_worker(worker_env(secure_backend.model_dir, **TRAIN_ENV, REDIS_URL=redis_url), "secure")

    def logs() -> str:
        return f"--- worker log\n{worker.log(6000)}\n--- backend log\n{secure_backend.log_tail(3000)}"

    setup = scripts("setup_project")
    title = f"secure e2e {uuid.uuid4().hex[:6]}"
    info = setup.setup_project(ls, title=title, label_config=dense_xml, backend_url=secure_backend.url,
                               basic_auth=auth)  # fmt: skip
    pid = info["project"]
    assert info["basic_auth"] is True
    [backend] = [as_dict(b) for b in ls.ml.list(project=pid)]
    assert backend["auth_method"] == "BASIC_AUTH" and backend["basic_auth_user"] == USER
    hook_url = backend_webhook_url(secure_backend.url)
    [hook] = _webhooks(ls, pid, hook_url)  # the one Label Studio created on connecting, now with the login
    assert hook["id"] == info["webhook"] and hook["headers"]["Authorization"] == basic_auth_header(*auth)

    imported = scripts("import_tiles").import_tiles(ls, pid, [tmp_path / "stack.tif"],
                                                    document_root=label_studio.document_root, tile=TILE,
                                                    progress=False)  # fmt: skip
    assert imported["created"] == 8
    # A re-run (as after importing) keeps the one webhook and its header; so does Label Studio re-saving the
    # backend (an update re-validates it but create_ml_webhook only runs on creation).
    again = setup.setup_project(ls, title=title, label_config=dense_xml, backend_url=secure_backend.url,
                                basic_auth=auth)  # fmt: skip
    assert (again["project"], again["webhook"], again["ml_backend"]) == (pid, hook["id"], backend["id"])
    ls.ml.update(id=backend["id"], url=secure_backend.url, project=pid, auth_method="BASIC_AUTH",
                 basic_auth_user=USER, basic_auth_pass=PASSWORD, title="re-saved")  # fmt: skip
    [kept] = _webhooks(ls, pid, hook_url)
    assert kept["id"] == hook["id"] and kept["headers"] == {"Authorization": basic_auth_header(*auth)}
    assert [as_dict(h)["id"] for h in ls.webhooks.list(project=str(pid))] == [hook["id"]]  # no event posted twice

    # stale credentials (the login changed since the last set-up) and a second webhook to the backend: a re-run
    # replaces the one header, keeps the team's other headers and deletes the copy (every event would come twice)
    ls.webhooks.update(id=hook["id"], headers={"Authorization": basic_auth_header(USER, "old"), "X-Team": "em"})
    copy = as_dict(ls.webhooks.create(url=hook_url, project=pid, send_payload=True, send_for_all_actions=True))
    setup.setup_project(ls, title=title, label_config=dense_xml, backend_url=secure_backend.url, basic_auth=auth,
                        retrieve=False)  # fmt: skip
    [fixed] = _webhooks(ls, pid, hook_url)
    assert fixed["id"] == hook["id"] != copy["id"]
    assert fixed["headers"] == {"Authorization": basic_auth_header(*auth), "X-Team": "em"}
    # a webhook that would not deliver (disabled in Label Studio's settings) is reported, not silently kept
    ls.webhooks.update(id=hook["id"], is_active=False)
    with pytest.raises(setup.SetupError, match="would not reach .*disabled"):
        setup.setup_project(ls, title=title, label_config=dense_xml, backend_url=secure_backend.url, basic_auth=auth,
                            retrieve=False)  # fmt: skip
    ls.webhooks.update(id=hook["id"], is_active=True)

    # --- an annotator submits a batch through Label Studio's API: Label Studio posts the webhooks itself
    config = parse_label_config(dense_xml)
    registry = ModelRegistry(secure_backend.model_dir, pid)
    tasks = list_tasks(ls, pid)
    for task in tasks[:BATCH]:
        d = task["data"]
        truth = masks[d["slice"], d["tile_y"] : d["tile_y"] + TILE, d["tile_x"] : d["tile_x"] + TILE]
        ls.annotations.create(id=task["id"], result=mask_to_results(truth.astype(np.int64), config))

    version = wait_until(registry.current_version, 600, "a model version trained from the webhooks", logs=logs)
    meta = registry.current_meta()
    assert meta["n_annotations"] == BATCH and "new annotations" in meta["trigger"]
    wait_until(lambda: as_dict(ls.projects.get(id=pid)).get("model_version") == version, 300,
               "the new version published to the project", logs=logs)  # fmt: skip

    # every webhook Label Studio posted was accepted (one gunicorn worker: its counters are the backend's)
    metrics = httpx.get(secure_backend.url + "/metrics", auth=auth, timeout=30).json()
    assert metrics["requests"].get("/webhook", 0) >= BATCH, metrics
    assert not [k for k in metrics["errors"] if k.startswith("/webhook")], metrics["errors"]

    # the status page, from the link the set-up wrote into the project description
    description = as_dict(ls.projects.get(id=pid))["description"]
    prefix = STATUS_LINK_PREFIX
    [link] = [ln.removeprefix(prefix) for ln in description.splitlines() if ln.startswith(prefix)]
    assert re.fullmatch(rf"{re.escape(secure_backend.url)}/status/{pid}", link)
    assert httpx.get(link, timeout=30).status_code == 401
    page = httpx.get(link, auth=auth, timeout=60)
    assert page.status_code == 200 and version in page.text
    assert worker.process.poll() is None, logs()


def test_quickstart_login_is_generated_saved_privately_and_reused(tmp_path):
    from ml_backend.quickstart import GENERATED_USER, backend_login

    (user, password), path = backend_login(tmp_path)
    assert user == GENERATED_USER and len(password) >= 24
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert backend_login(tmp_path)[0] == (user, password)  # a re-run keeps the login the team has
    path.chmod(0o644)
    assert backend_login(tmp_path, "lab", "given-secret")[0] == ("lab", "given-secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and "given-secret" in path.read_text()
    with pytest.raises(ValueError, match="both --basic-auth-user and --basic-auth-pass"):
        backend_login(tmp_path, "lab", "")
    path.write_text("not json")
    with pytest.raises(ValueError, match="delete it to generate a new one"):
        backend_login(tmp_path)
