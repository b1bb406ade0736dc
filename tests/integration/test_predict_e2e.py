"""End to end against a real Label Studio 1.23.2: import tiles, set the project up, serve predictions under gunicorn.

The model is really trained (briefly, on generated EM-like tiles) and published through the registry, as a
training job would. Checks: every task holds a decodable mask of its tile's size that overlaps the ground truth, the
scores are stored, and both the "Active learning queue" view and /api/projects/<id>/next serve the tile with the
highest entropy first. Before the model exists (cold start) tasks get scores but no masks.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from ml_backend.labelstudio.client import as_dict, list_tasks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

TILE = 64


@pytest.fixture(scope="module")
def em_data(tmp_path_factory):
    """An 8-bit multi-page TIFF stack (3 x 128 x 128) and a folder of two 16-bit PNG slices (64 x 64) + masks."""
    from ml_backend.data.synthetic import generate_em_like

    base = tmp_path_factory.mktemp("em")
    stack, stack_masks = generate_em_like(3, 128, seed=21)
    tifffile.imwrite(base / "stack.tif", stack, photometric="minisblack")
    slices, slice_masks = generate_em_like(2, 64, seed=22)
    folder = base / "slices16"
    folder.mkdir()
    for i, img in enumerate(slices):
        Image.fromarray(img.astype(np.uint16) * 257).save(folder / f"slice_{i}.png")
    truth = {}  # (source name, slice, y, x) -> ground-truth tile mask
    for z in range(3):
        for y in (0, 64):
            for x in (0, 64):
                truth[("stack.tif", z, y, x)] = stack_masks[z, y : y + TILE, x : x + TILE]
    for z in range(2):
        truth[(f"slice_{z}.png", z, 0, 0)] = slice_masks[z]
    return [base / "stack.tif", folder], truth


@pytest.fixture(scope="module")
def trained(train_tiny_unet):
    """A small U-Net fine-tuned for real on generated tiles (about 15 s on CPU); returns (model, metrics)."""
    model, metrics = train_tiny_unet(n=16, seed=5, depth=3, steps=80, threads=2)
    assert metrics["val_iou"] > 0.3, metrics
    return model, metrics


def _predictions_of(task: dict, version: str) -> list[dict]:
    return [p for p in task.get("predictions") or [] if p.get("model_version") == version]


def _next_task(label_studio, project_id: int, view_id: int) -> int:
    """The task /next serves from the queue view (annotators label from it: sequential sampling over the view)."""
    resp = httpx.get(
        f"{label_studio.url}/api/projects/{project_id}/next",
        params={"view": view_id},
        headers={"Authorization": f"Token {label_studio.api_key}"},
        timeout=30,
    )
    resp.raise_for_status()
    return int(resp.json()["id"])


def _view_order(ls, project_id: int, view_id: int) -> list[int]:
    return [int(as_dict(t)["id"]) for t in ls.tasks.list(project=project_id, view=view_id, fields="task_only")]


def _retrieve(ls, project_id: int) -> None:
    ls.actions.create(id="retrieve_tasks_predictions", project=project_id, selected_items={"all": True, "excluded": []})


def test_predictions_end_to_end(label_studio, ls, start_backend, scripts, em_data, trained, tmp_path):
    from ml_backend.imaging import load_image
    from ml_backend.inference.tiling import predict_tiled
    from ml_backend.store.registry import ModelRegistry
    from ml_backend.strategies import pixel_entropy
    from ml_backend.training.metrics import iou

    setup = scripts("setup_project")
    importer = scripts("import_tiles")
    stacks, truth = em_data
    model_dir = tmp_path / "models"
    backend = start_backend(model_dir)
    dense = (importer.REPO_ROOT / "label_config" / "dense.xml").read_text()
    title = f"e2e predictions {uuid.uuid4().hex[:6]}"

    # --- project, tiles (idempotent), backend connected, queue view
    first = setup.setup_project(ls, title=title, label_config=dense, backend_url=backend.url)
    pid, view = first["project"], first["view"]
    assert first["created"] and first["model_version"] is None  # no tasks yet: nothing to set
    imported = importer.import_tiles(ls, pid, stacks, document_root=label_studio.document_root, tile=TILE,
                                     progress=False)  # fmt: skip
    assert (imported["tiles"], imported["created"]) == (14, 14)
    again = importer.import_tiles(ls, pid, stacks, document_root=label_studio.document_root, tile=TILE, progress=False)
    assert (again["created"], again["skipped"]) == (0, 14)
    tasks = list_tasks(ls, pid)
    assert len(tasks) == 14
    for t in tasks:
        assert {"image", "source", "slice", "tile_x", "tile_y"} <= set(t["data"])
    rerun = setup.setup_project(ls, title=title, label_config=dense, backend_url=backend.url, retrieve=False)
    assert (rerun["project"], rerun["created"]) == (pid, False)

    # --- cold start: scores for coverage, no masks
    _retrieve(ls, pid)
    assert setup.sync_model_version(ls, pid, "cold-start", retrieve=False) == "cold-start"
    cold = {int(t["id"]): _predictions_of(t, "cold-start") for t in list_tasks(ls, pid)}
    assert all(len(p) == 1 and p[0]["result"] == [] for p in cold.values())
    cold_order = sorted(cold, key=lambda tid: cold[tid][0]["score"])
    assert _view_order(ls, pid, view) == cold_order

    # --- a really trained model is published; Label Studio retrieves its predictions in one request
    model, metrics = trained
    version = ModelRegistry(model_dir, pid).publish(model, {"metrics": metrics, "trigger": "integration test"})
    _retrieve(ls, pid)
    synced = setup.setup_project(ls, title=title, label_config=dense, backend_url=backend.url, retrieve=False)
    assert synced["model_version"] == version
    assert as_dict(ls.projects.get(id=pid))["model_version"] == version

    tasks = list_tasks(ls, pid)
    entropy, ious = {}, []
    for t in tasks:
        preds = _predictions_of(t, version)
        assert len(preds) == 1, f"task {t['id']}: {len(preds)} predictions of {version}"
        pred = preds[0]
        assert 0.0 <= pred["score"] <= 1.0
        assert t["predictions_score"] == pytest.approx(pred["score"])  # stored and used by Label Studio
        data = t["data"]
        path = label_studio.document_root / data["image"].split("?d=", 1)[1]
        with Image.open(path) as img:
            width, height = img.size
        assert (width, height) == (data["tile_width"], data["tile_height"])
        assert len(pred["result"]) == 1
        region = pred["result"][0]
        assert region["value"]["brushlabels"] == ["Mitochondria"]
        assert (region["original_width"], region["original_height"]) == (width, height)
        mask = decode_rle(region["value"]["rle"]).reshape(height, width, 4)[:, :, 3] > 0
        gt = truth[(Path(data["source"]).name, data["slice"], data["tile_y"], data["tile_x"])]
        ious.append(iou(mask.astype(np.int64), gt.astype(np.int64)))
        probs = predict_tiled(model, load_image(path), tile=256, overlap=32)
        entropy[int(t["id"])] = float(pixel_entropy(probs).sum())
    assert np.mean(ious) > 0.3, ious  # meaningful masks, not noise

    most_uncertain_first = sorted(entropy, key=lambda tid: -entropy[tid])
    assert _view_order(ls, pid, view) == most_uncertain_first
    assert _next_task(label_studio, pid, view) == most_uncertain_first[0]

    # Label Studio sent the tasks in one request per round (cold start, trained), each answered in full
    metrics_body = httpx.get(backend.url + "/metrics", timeout=10).json()
    assert metrics_body["predict"]["requests"] == 2
    assert metrics_body["predict"]["tasks"] == 28 and metrics_body["predict"]["failed_tasks"] == 0


def test_label_studio_talks_to_a_backend_behind_basic_auth(label_studio, ls, start_backend, scripts, tmp_path):
    from ml_backend.data.synthetic import generate_em_like

    setup = scripts("setup_project")
    importer = scripts("import_tiles")
    backend = start_backend(tmp_path / "models", BASIC_AUTH_USER="ls-backend", BASIC_AUTH_PASS="s3cret")
    assert httpx.post(backend.url + "/setup", json={}, timeout=10).status_code == 401
    sparse = (importer.REPO_ROOT / "label_config" / "sparse.xml").read_text()
    title = f"e2e basic auth {uuid.uuid4().hex[:6]}"
    with pytest.raises(setup.SetupError, match="refused the credentials .*HTTP 401"):  # asked before connecting
        setup.setup_project(ls, title=title, label_config=sparse, backend_url=backend.url,
                            basic_auth=("ls-backend", "wrong"))  # fmt: skip
    info = setup.setup_project(ls, title=title, label_config=sparse, backend_url=backend.url,
                               basic_auth=("ls-backend", "s3cret"))  # fmt: skip
    pid = info["project"]
    images, _ = generate_em_like(1, 64, seed=3)
    tifffile.imwrite(tmp_path / "one.tif", images, photometric="minisblack")
    importer.import_tiles(ls, pid, [tmp_path / "one.tif"], document_root=label_studio.document_root, tile=TILE,
                          progress=False)  # fmt: skip
    again = setup.setup_project(ls, title=title, label_config=sparse, backend_url=backend.url,
                                basic_auth=("ls-backend", "s3cret"))  # fmt: skip
    assert again["project"] == pid and again["model_version"] == "cold-start"  # Label Studio called /predict
    (only,) = list_tasks(ls, pid)
    assert [p["model_version"] for p in only["predictions"]] == ["cold-start"]
