"""Issue 16 item 2 against the real Label Studio 1.23.2: "Retrieve predictions" on a 2,000-task project.

Label Studio sends all 2,000 tasks in ONE /predict (the backend used to refuse more than 1,000 with a 400, so no task
got a prediction). Now, with gunicorn, a real Redis and a real ``rq worker``:

1. the request answers what it did within PREDICT_DEADLINE_S (1 s here, against 2,000 images fetched over HTTP
   from Label Studio) and queues the rest; Label Studio stores a prediction for exactly the tasks done;
2. the tasks not done hold NO prediction of the live version, so a second "Retrieve predictions" sends exactly
   those again (they are not queued twice);
3. the rq worker finishes them: every one of the 2,000 tasks ends with exactly one prediction of the live version;
4. a third "Retrieve predictions" then has nothing to ask for (Label Studio does not call /predict at all).
"""

from __future__ import annotations

import json
import urllib.request
import uuid

import numpy as np
import pytest
import tifffile
from waiting import wait_until

from ml_backend.labelstudio.client import list_tasks, retrieve_predictions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
N_SLICES, SIDE, TILE = 125, 128, 32  # 125 slices x 16 tiles of 32 x 32 = 2,000 tasks: inference is cheap
N_TASKS = N_SLICES * (SIDE // TILE) ** 2


def _metrics(backend) -> dict:
    with urllib.request.urlopen(backend.url + "/metrics", timeout=30) as resp:
        return json.load(resp)["predict"]


def _holding(ls, pid: int, version: str) -> dict[int, int]:
    """{task id: how many predictions of ``version`` it holds} over the whole project."""
    return {
        int(t["id"]): sum(p.get("model_version") == version for p in t.get("predictions") or [])
        for t in list_tasks(ls, pid)
    }


def test_retrieve_predictions_on_2000_tasks_ends_with_every_task_predicted(
    label_studio, ls, start_backend, scripts, redis_url, start_rq_worker, worker_env, tmp_path
):
    from ml_backend.data.synthetic import generate_em_like
    from ml_backend.model import build_model
    from ml_backend.store.registry import ModelRegistry

    images, _ = generate_em_like(N_SLICES, SIDE, seed=16)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, images, photometric="minisblack")
    model_dir = tmp_path / "models"
    env = {"REDIS_URL": redis_url, "PREDICT_DEADLINE_S": "1", "RESCORE_CHUNK": "50", "STRATEGY": "entropy"}
    backend = start_backend(model_dir, **env)

    dense = (REPO / "label_config" / "dense.xml").read_text()
    setup = scripts("setup_project").setup_project(
        ls, title=f"large predict {uuid.uuid4().hex[:6]}", label_config=dense, backend_url=backend.url, retrieve=False
    )
    pid = int(setup["project"])
    imported = scripts("import_tiles").import_tiles(
        ls, pid, [stack], document_root=label_studio.document_root, tile=TILE, progress=False
    )
    assert imported["created"] == N_TASKS == 2_000
    model = build_model("unet", width=4, depth=2, num_classes=2).eval()
    version = ModelRegistry(model_dir, pid).publish(model, {"trigger": "integration test: large /predict"})

    env_of_worker = worker_env(model_dir, **env, DEVICE="cpu")
    worker = None

    def logs() -> str:
        worker_log = worker.log() if worker is not None else "(no worker yet)"
        return f"--- worker log\n{worker_log}\n--- backend log\n{backend.log_tail(6000)}"

    # 1. One request of 2,000 tasks: 200, what is done is stored, the rest queued (no worker runs yet).
    retrieve_predictions(ls, pid)
    first = _metrics(backend)
    assert (first["requests"], first["tasks"]) == (1, N_TASKS), logs()
    held = _holding(ls, pid, version)
    assert len(held) == N_TASKS and set(held.values()) <= {0, 1}
    done = {t for t, n in held.items() if n}
    assert first["queued_tasks"] == N_TASKS - len(done) - first["failed_tasks"], (first, len(done), logs())
    assert first["failed_tasks"] == 0 and first["queued_tasks"] > 0, (first, logs())

    # 2. Undone tasks are not marked as predicted: Label Studio sends exactly them again; none is queued twice.
    retrieve_predictions(ls, pid)
    second = _metrics(backend)
    assert second["tasks"] - first["tasks"] == N_TASKS - len(done), (second, logs())
    assert second["queued_tasks"] == first["queued_tasks"], (second, logs())

    # 3. The worker finishes the backlog: every task ends with exactly one prediction of the live version.
    worker = start_rq_worker(env_of_worker, "backlog")

    def all_predicted() -> dict[int, int] | None:
        counts = _holding(ls, pid, version)
        return counts if all(n >= 1 for n in counts.values()) else None

    final = wait_until(all_predicted, 600, "every task to hold a prediction of the live version", poll=5, logs=logs)
    assert len(final) == N_TASKS and set(final.values()) == {1}, logs()
    tasks = list_tasks(ls, pid)
    preds = [p for t in tasks for p in t["predictions"] if p["model_version"] == version]
    assert all(isinstance(p["score"], float) and 0.0 <= p["score"] <= 1.0 for p in preds)
    assert all(isinstance(p["result"], list) for p in preds)  # masks where the (untrained) model sees foreground
    assert np.isfinite([t["predictions_score"] for t in tasks]).all()  # Label Studio orders the queue by them

    # 4. Nothing left to ask for: Label Studio does not even call /predict.
    retrieve_predictions(ls, pid)
    assert _metrics(backend)["requests"] == second["requests"], logs()
