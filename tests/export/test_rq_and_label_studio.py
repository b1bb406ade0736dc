"""The export's two outside connections, for real: chunk jobs on a real `rq worker` (the documented
``ml-backend worker``) against a real Redis, and annotations read from a real Label Studio 1.23.2 project whose
tiles were imported by ``ml-backend import`` (positions from the task data)."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import tifffile
from export_helpers import DENSE_XML, publish_model

from ml_backend.config import Settings
from ml_backend.export.cli import main as export_main
from ml_backend.export.driver import export_stack

OPTS = {"project": "1", "tile": 48, "overlap": 8, "progress": False}


@pytest.mark.timeout(600)
def test_chunks_as_rq_jobs_equal_a_local_export(tmp_path, stack_file, model_dir, redis_url, start_rq_worker):
    queue = f"export-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "REDIS_URL": redis_url, "RQ_QUEUE": queue, "MODEL_DIR": str(model_dir), "OMP_NUM_THREADS": "1"}
    start_rq_worker(env, "export")
    start_rq_worker(env, "export")
    settings = Settings.from_env(redis_url=redis_url, queue_name=queue)
    local = export_stack(stack_file, tmp_path / "local", model_dir=model_dir, chunk_slices=3, **OPTS)
    on_rq = export_stack(stack_file, tmp_path / "rq", model_dir=model_dir, chunk_slices=3, executor="rq",
                         settings=settings, **OPTS)  # fmt: skip
    assert on_rq["objects"] == local["objects"] and local["objects"]["foreground"] > 0
    for name in ("segmentation.tif", "objects.tif"):
        assert np.array_equal(tifffile.imread(tmp_path / "rq" / name), tifffile.imread(tmp_path / "local" / name))
    assert (tmp_path / "rq" / "objects_foreground.csv").read_text() == \
        (tmp_path / "local" / "objects_foreground.csv").read_text()  # fmt: skip


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_annotations_from_a_real_label_studio_project(tmp_path, volume, label_studio, ls, monkeypatch):
    """Import the stack as 48 px tiles, annotate two tiles through Label Studio's API, export with
    --from-label-studio and no stack argument: the stack path comes from the tasks, the two annotated windows hold
    the annotation, everything else the model's prediction."""
    from ml_backend.labelstudio.client import list_tasks
    from ml_backend.labelstudio.importing import import_tiles
    from ml_backend.labelstudio.labelconfig import parse_label_config
    from ml_backend.labelstudio.rle import mask_to_results

    stack = label_studio.document_root / f"export-{uuid.uuid4().hex[:6]}" / "stack.tif"
    stack.parent.mkdir(parents=True)
    tifffile.imwrite(stack, volume.image[:6])
    project = ls.projects.create(title=f"export {uuid.uuid4().hex[:6]}", label_config=DENSE_XML)
    pid = int(project.id)
    model_dir = tmp_path / "models"
    publish_model(model_dir, str(pid), image=volume.image[0])
    imported = import_tiles(ls, pid, [stack], document_root=label_studio.document_root, tile=48, progress=False)
    assert imported["created"] == 6 * 2 * 3
    config = parse_label_config(DENSE_XML)
    tasks = sorted(list_tasks(ls, pid), key=lambda t: t["id"])
    painted = {}
    for task in (tasks[4], tasks[20]):
        d = task["data"]
        mask = np.zeros((d["tile_height"], d["tile_width"]), dtype=np.int64)
        mask[5:30, 10:40] = 1
        ls.annotations.create(id=task["id"], result=mask_to_results(mask, config))
        painted[(d["slice"], d["tile_y"], d["tile_x"])] = mask
    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.api_key)
    monkeypatch.setenv("TILE_SIZE", "48")
    monkeypatch.setenv("TILE_OVERLAP", "8")
    out = tmp_path / "out"
    assert export_main(["--project", str(pid), "--from-label-studio", "-o", str(out), "--chunk-slices", "4",
                        "--quiet"]) == 0  # fmt: skip
    assert export_main(["--project", str(pid), str(stack), "-o", str(tmp_path / "plain"), "--quiet"]) == 0
    seg = tifffile.imread(out / "segmentation.tif")
    plain = tifffile.imread(tmp_path / "plain" / "segmentation.tif")
    assert seg.shape == (6, *volume.image.shape[1:])
    outside = np.ones(seg.shape, dtype=bool)
    for (z, y, x), mask in painted.items():
        h, w = mask.shape
        assert np.array_equal(seg[z, y : y + h, x : x + w], mask)
        outside[z, y : y + h, x : x + w] = False
    assert np.array_equal(seg[outside], plain[outside])
    assert (out / "objects_mitochondria.csv").is_file()
