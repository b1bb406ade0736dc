"""Issue 16, items 6 and 7a, with the real processes: Label Studio 1.23.2, the backend under gunicorn.

* Item 6: with auth off, anyone may POST /predict. An image URL of ``/api/projects/<id>/next/`` made the backend GET
  that API path with its own token, and Label Studio locked a task for 24 hours. Now that task gets a per-task error
  and Label Studio's task-lock table stays empty (checked in its database; the same request made directly, with the
  token, does lock a task: the check can see a lock).
* Item 7a: MODEL_DIR/cache is a regular file, so nothing can be created under it (even as root, which ignores file
  modes). Images that Label Studio really serves from an upload (``/data/upload/<project>/<file>``, the URL form
  verified here on the real server) are still predicted; /health?details=1 and /status carry the warning.
"""

from __future__ import annotations

import io
import re
import sqlite3
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ml_backend.labelstudio.client import as_dict, list_tasks
from ml_backend.store.registry import ModelRegistry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
DENSE = (REPO / "label_config" / "dense.xml").read_text()


def _png(seed: int) -> bytes:
    from ml_backend.data.synthetic import generate_em_like

    images, _ = generate_em_like(1, 64, seed=seed)
    buf = io.BytesIO()
    Image.fromarray(images[0].astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _publish(model_dir: Path, pid: int) -> str:
    """An (untrained) model as the project's live version: with one, /predict fetches every task's image."""
    from ml_backend.model import build_model

    return ModelRegistry(model_dir, pid).publish(build_model("unet", width=4, depth=2), {"note": "media paths test"})


@pytest.fixture(scope="module")
def backend(start_backend, tmp_path_factory):
    """The real backend (auth off, the default) whose MODEL_DIR/cache cannot be created: it is a regular file."""
    model_dir = tmp_path_factory.mktemp("media-paths") / "models"
    model_dir.mkdir()
    (model_dir / "cache").write_bytes(b"a file where the image cache directory should be")
    return start_backend(model_dir)


def _project(ls, label_studio) -> int:
    return int(as_dict(ls.projects.create(title=f"media paths {uuid.uuid4().hex[:6]}", label_config=DENSE))["id"])


def _upload(label_studio, pid: int, name: str, data: bytes) -> None:
    """A file uploaded through Label Studio's import API, as a person dragging it into the project does."""
    resp = httpx.post(
        f"{label_studio.url}/api/projects/{pid}/import",
        headers={"Authorization": f"Token {label_studio.api_key}"},
        files={"file": (name, data, "image/png")},
        timeout=60,
    )
    assert resp.status_code in (200, 201), resp.text[:500]


def _predict(backend, pid: int, tasks: list[dict]) -> dict:
    body = {"tasks": tasks, "project": f"{pid}.1700000000", "label_config": DENSE}
    resp = httpx.post(f"{backend.url}/predict", json=body, timeout=120)  # no credentials: auth is off
    assert resp.status_code == 200, resp.text[:1000]
    return resp.json()


def _locks(label_studio, pid: int) -> int:
    """Task locks of the project, read from Label Studio's own database (TaskLock rows)."""
    db = sqlite3.connect(f"file:{label_studio.data_dir / 'label_studio.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        table = db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name LIKE '%tasklock%'").fetchone()
        assert table is not None, "Label Studio's task-lock table not found"
        sql = f"SELECT COUNT(*) FROM {table[0]} l JOIN task t ON t.id = l.task_id WHERE t.project_id = ?"
        return int(db.execute(sql, (pid,)).fetchone()[0])
    finally:
        db.close()


def test_uploads_are_predicted_with_an_unwritable_cache(backend, label_studio, ls):
    pid = _project(ls, label_studio)
    _upload(label_studio, pid, "tile-a.png", _png(1))
    _upload(label_studio, pid, "tile b.png", _png(2))
    tasks = [{"id": t["id"], "data": t["data"]} for t in list_tasks(ls, pid)]
    assert len(tasks) == 2
    for t in tasks:  # the URL form Label Studio 1.23.2 gives an upload: one of the media paths the backend fetches
        assert re.fullmatch(rf"/data/upload/{pid}/[0-9a-f]+-tile[-_ ]?[ab]\.png", t["data"]["image"]), t["data"]
    version = _publish(backend.model_dir, pid)

    for _ in range(2):  # nothing is cached: the second round downloads again, and works again
        out = _predict(backend, pid, tasks)
        assert out["errors"] == [], out["errors"]
        assert [r["model_version"] for r in out["results"]] == [version, version]
        assert all(isinstance(r["score"], float) for r in out["results"])
    assert (backend.model_dir / "cache").is_file()  # still broken: the predictions above went around it

    health = httpx.get(f"{backend.url}/health", params={"details": "1"}, timeout=30).json()
    assert any("cannot be written" in w and "Not a directory" in w for w in health["warnings"]), health
    page = httpx.get(f"{backend.url}/status/{pid}", timeout=60)
    assert page.status_code == 200 and 'class="warn page-warning"' in page.text and "cannot be written" in page.text


def test_predict_never_requests_label_studio_api_paths(backend, label_studio, ls):
    pid = _project(ls, label_studio)
    _upload(label_studio, pid, "tile-c.png", _png(3))
    (task,) = list_tasks(ls, pid)
    _publish(backend.model_dir, pid)
    assert _locks(label_studio, pid) == 0

    hostile = [
        f"/api/projects/{pid}/next/",
        f"{label_studio.url}/api/projects/{pid}/next/",
        f"/data/upload/{pid}/%2e%2e/%2e%2e/api/projects/{pid}/next/",
        f"/data/upload/..%2F..%2Fapi/projects/{pid}/next/",
        f"/data%2Fupload%2F..%2F..%2Fapi%2Fprojects%2F{pid}%2Fnext%2F",
    ]
    tasks = [{"id": task["id"], "data": {"image": url}} for url in hostile]
    tasks.append({"id": task["id"], "data": task["data"]})  # the real upload, in the same request
    out = _predict(backend, pid, tasks)
    errors = {e["index"]: e["reason"] for e in out["errors"]}
    assert sorted(errors) == list(range(len(hostile))), out["errors"]
    for reason in errors.values():
        assert "refused before connecting" in reason and label_studio.api_key not in reason
    assert out["results"][-1]["model_version"] != "cold-start" and "score" in out["results"][-1]
    assert _locks(label_studio, pid) == 0  # Label Studio locked nothing: /next was never requested

    # The check can see a lock: the same request made with the token does lock the task.
    resp = httpx.get(f"{label_studio.url}/api/projects/{pid}/next/",
                     headers={"Authorization": f"Token {label_studio.api_key}"}, timeout=30)  # fmt: skip
    assert resp.status_code == 200 and resp.json()["id"] == task["id"]
    assert _locks(label_studio, pid) == 1
