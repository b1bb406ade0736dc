"""Label efficiency measured where it happens (issue 17.6), end to end: real Label Studio 1.23.2, real Redis, the
backend under gunicorn and a real ``rq worker``.

Tasks get predictions of a known version (the ground truth moved by a few pixels); annotations are created through
Label Studio's API from those predictions (``parent_prediction``, which 1.23.2 accepts and returns), one without the
link (the project's version at the time is found instead), one of the wrong size and one on a task that never held a
prediction. The batch's webhooks train a version; the job measures every annotation once, the status page's JSON
shows the effort per tile for the serving version, and a second training ("Start training") measures nothing again.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from waiting import wait_until

from ml_backend.labelstudio.client import as_dict, list_tasks, set_project_model_version

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
TILE = 64
SERVED = "served-v1"  # the model version whose predictions the annotators start from


@pytest.fixture(scope="module")
def em_stack(tmp_path_factory):
    """A 2 x 128 x 128 EM-like TIFF stack (8 tiles of 64 x 64) and its ground truth per tile."""
    from ml_backend.data.synthetic import generate_em_like

    base = tmp_path_factory.mktemp("effort-em")
    stack, masks = generate_em_like(2, 128, seed=17)
    tifffile.imwrite(base / "stack.tif", stack, photometric="minisblack")
    truth = {
        (z, y, x): masks[z, y : y + TILE, x : x + TILE].astype(np.int64)
        for z in range(2)
        for y in (0, TILE)
        for x in (0, TILE)
    }
    return base / "stack.tif", truth


def test_effort_per_tile_of_the_serving_version_on_the_status_page(
    label_studio, ls, start_backend, scripts, em_stack, redis_url, tmp_path, start_rq_worker, worker_env
):
    from ml_backend.active_learning.effort import edit_effort
    from ml_backend.labelstudio.labelconfig import parse_label_config
    from ml_backend.labelstudio.rle import mask_to_results
    from ml_backend.store.effort import EffortLog
    from ml_backend.store.registry import ModelRegistry

    stack, truth = em_stack
    model_dir = tmp_path / "models"
    train_env = {
        "REDIS_URL": redis_url,
        "TRAIN_BATCH_SIZE": "5",
        "TRAIN_STEPS": "20",
        "TRAIN_CROP": "64",
        "MODEL_WIDTH": "8",
        "MODEL_DEPTH": "3",
        "STRATEGY": "entropy",
        "AUDIT_FRACTION": "0",
        "KEEP_PREDICTION_VERSIONS": "1",  # hygiene on: the measure must come before old predictions are pruned
    }
    backend = start_backend(model_dir, **train_env)
    worker = start_rq_worker(worker_env(model_dir, **train_env), "effort")

    def logs() -> str:
        return (
            f"--- worker log\n{worker.log_path.read_text(errors='replace')[-6000:]}\n"
            f"--- backend log\n{backend.log_tail(3000)}"
        )

    dense = (REPO / "label_config" / "dense.xml").read_text()
    config = parse_label_config(dense)
    setup = scripts("setup_project")
    info = setup.setup_project(ls, title=f"effort {uuid.uuid4().hex[:6]}", label_config=dense, backend_url=backend.url)
    pid = info["project"]
    imported = scripts("import_tiles").import_tiles(
        ls, pid, [stack], document_root=label_studio.document_root, tile=TILE, progress=False
    )
    assert imported["created"] == 8
    tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
    ids = sorted(tasks)
    gt = {tid: truth[(tasks[tid]["data"]["slice"], tasks[tid]["data"]["tile_y"], tasks[tid]["data"]["tile_x"])]
          for tid in ids}  # fmt: skip
    served = {tid: np.roll(gt[tid], 3, axis=1) for tid in ids}  # the "model" missed every outline by 3 px

    # --- the served version's predictions (tasks a..d), then the project's model_version names it
    a, b, c, d, e = sorted(ids, key=lambda t: -int(gt[t].sum()))[:5]  # the most mitochondria; e gets no prediction
    assert gt[b].any() and gt[c].any()
    preds = {}
    for tid in (a, b, c, d):
        pred = ls.predictions.create(task=tid, result=mask_to_results(served[tid], config), score=0.5,
                                     model_version=SERVED)  # fmt: skip
        preds[tid] = int(as_dict(pred)["id"])
    set_project_model_version(ls, pid, SERVED)

    # --- annotators submit the batch through the API; Label Studio posts the webhooks
    registry = ModelRegistry(model_dir, pid)
    created = {
        a: ls.annotations.create(id=a, result=mask_to_results(served[a], config), parent_prediction=preds[a]),
        b: ls.annotations.create(id=b, result=mask_to_results(gt[b], config), parent_prediction=preds[b]),
        c: ls.annotations.create(id=c, result=mask_to_results(gt[c], config)),  # no link: the project's version
        d: ls.annotations.create(
            id=d, result=mask_to_results(np.ones((32, 32), np.int64), config), parent_prediction=preds[d]
        ),  # drawn on a 32 x 32 image  # fmt: skip
        e: ls.annotations.create(id=e, result=mask_to_results(gt[e], config)),  # nothing was served
    }
    ann_ids = {tid: int(as_dict(ann)["id"]) for tid, ann in created.items()}
    # Label Studio 1.23.2 keeps and returns the link (what the labelling page sets when starting from a prediction)
    listed = {int(t["id"]): t for t in list_tasks(ls, pid)}
    assert [x.get("parent_prediction") for x in listed[a]["annotations"]] == [preds[a]]
    assert [x.get("parent_prediction") for x in listed[c]["annotations"]] == [None]

    version = wait_until(registry.current_version, 600, "a trained version", logs=logs)
    effort = EffortLog(model_dir, pid)
    wait_until(lambda: len(effort.read()[0]) == 5, 60, "five effort records", logs=logs)
    records, bad = effort.read()
    assert bad == 0
    by_task = {r["task"]: r for r in records}
    assert {tid: r["annotation"] for tid, r in by_task.items()} == ann_ids
    assert (by_task[a]["served_by"], by_task[a]["prediction"], by_task[a]["model_version"]) == (
        "parent_prediction", preds[a], SERVED
    )  # fmt: skip
    assert (by_task[a]["changed_pixels"], by_task[a]["boundary_edited"]) == (0, 0.0)  # accepted as served
    assert by_task[a]["effort_saved"] == 1.0
    assert by_task[b]["served_by"] == "parent_prediction"
    assert by_task[c]["served_by"] == "newest_before" and by_task[c]["prediction"] == preds[c]
    for tid in (b, c):
        rec = by_task[tid]
        assert rec["changed_pixels"] == int(np.count_nonzero(served[tid] != gt[tid])) > 0
        assert rec["boundary_edited"] == edit_effort(served[tid], gt[tid]).boundary_edited > 0
        assert rec["pixels"] == TILE * TILE and rec["model_version"] == SERVED
    assert by_task[d]["skipped"] == (
        "ValueError: the annotation was drawn on a 32x32 image, the served prediction on 64x64: not comparable"
    )
    assert by_task[d]["model_version"] == SERVED
    assert by_task[e]["skipped"] == "no prediction served: the task holds no prediction"

    # --- the status page's JSON view: effort per tile for the serving version, with counts
    resp = httpx.get(f"{backend.url}/status/{pid}", headers={"Accept": "application/json"}, timeout=60)
    resp.raise_for_status()
    (project,) = resp.json()["projects"]
    rows = {r["version"]: r for r in project["effort"]}
    row = rows[SERVED]
    assert (row["tiles"], row["skipped"], row["audit_tiles"]) == (3, 1, 0)
    measured = [by_task[t] for t in (a, b, c)]
    assert row["changed_fraction_mean"] == pytest.approx(np.mean([r["changed_fraction"] for r in measured]))
    assert row["boundary_edited_mean"] == pytest.approx(np.mean([r["boundary_edited"] for r in measured]))
    scratch = sum(r["boundary_scratch"] for r in measured)
    assert row["effort_saved"] == pytest.approx(1 - sum(r["boundary_edited"] for r in measured) / scratch)
    assert rows["(none)"]["skipped"] == 1 and rows["(none)"]["tiles"] == 0
    page = httpx.get(f"{backend.url}/status/{pid}", headers={"Accept": "text/html"}, timeout=60).text
    assert 'class="effort-curve"' in page and SERVED in page

    # --- "Start training": another job re-reads every annotation and measures none of them again
    (ml,) = [as_dict(x) for x in ls.ml.list(project=pid)]
    ls.ml.train(id=ml["id"])
    wait_until(lambda: (v := registry.current_version()) != version and v, 600, "START_TRAINING's version",
               logs=logs)  # fmt: skip
    assert effort.read() == (records, 0)
    assert "annotation effort of 0 new annotation(s) recorded" in worker.log_path.read_text(errors="replace")
    assert worker.process.poll() is None, logs()
