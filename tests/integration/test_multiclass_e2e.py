"""Several organelle classes end to end (``label_config/multiclass.xml``: Mitochondria = 1, Nuclei = 2) against the
real Label Studio 1.23.2, real Redis, the backend under gunicorn and a real ``rq worker``.

Generated multi-class EM-like tiles (``ml_backend.data.volume`` with ``multiclass=True``) are imported and the
project is set up with the backend; a batch of annotations painting BOTH classes (from the ground truth) is
submitted through the SDK; the webhook-triggered job trains a 3-class model and delivers, for every unlabelled task,
a prediction with a brush region per predicted class, the display-only uncertainty layer and a queue score. The
annotated tiles decode back to their 3-class ground truth.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile
from waiting import wait_until

from ml_backend.labelstudio.client import as_dict, list_tasks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
TILE = 64
BATCH = 4


@pytest.fixture(scope="module")
def multiclass_stack(tmp_path_factory):
    """A 3 x 128 x 128 multi-class volume (12 tiles of 64 x 64) and its 3-class ground truth per tile."""
    from ml_backend.data.volume import generate_volume

    base = tmp_path_factory.mktemp("multiclass-em")
    vol = generate_volume((3, 128, 128), seed=5, multiclass=True, nuclei=2)
    assert set(np.unique(vol.labels)) == {0, 1, 2}, "the generated volume must hold both organelle classes"
    tifffile.imwrite(base / "stack.tif", vol.image, photometric="minisblack")
    truth = {}
    for z in range(3):
        for y in (0, 64):
            for x in (0, 64):
                truth[(z, y, x)] = vol.labels[z, y : y + TILE, x : x + TILE].astype(np.int64)
    return base / "stack.tif", truth


def test_two_classes_train_and_predict_per_class(label_studio, ls, start_backend, scripts, multiclass_stack,
                                                 redis_url, tmp_path, start_rq_worker, worker_env):  # fmt: skip
    from ml_backend.labelstudio.labelconfig import parse_label_config
    from ml_backend.labelstudio.rle import mask_to_results, results_to_mask
    from ml_backend.store.registry import ModelRegistry

    stack, truth = multiclass_stack
    xml = (REPO / "label_config" / "multiclass.xml").read_text()
    config = parse_label_config(xml)
    assert config.num_classes == 3 and config.foreground_labels == ("Mitochondria", "Nuclei")
    model_dir = tmp_path / "models"
    env = {"REDIS_URL": redis_url, "TRAIN_BATCH_SIZE": str(BATCH), "TRAIN_STEPS": "40", "TRAIN_CROP": "64",
           "MODEL_WIDTH": "8", "MODEL_DEPTH": "3", "RESCORE_CHUNK": "4", "STRATEGY": "entropy", "AUDIT_FRACTION": "0",
           "UNCERTAINTY_MIN_PIXELS": "1", "UNCERTAINTY_THRESHOLDS": "0.05"}  # fmt: skip
    backend = start_backend(model_dir, **env)
    worker = start_rq_worker(worker_env(model_dir, **env), "mc")  # the documented `python -m ml_backend.cli worker`

    def logs() -> str:
        return (
            f"--- worker\n{worker.log_path.read_text(errors='replace')[-6000:]}\n--- backend\n{backend.log_tail(3000)}"
        )

    try:
        setup, importer = scripts("setup_project"), scripts("import_tiles")
        info = setup.setup_project(ls, title=f"multiclass {uuid.uuid4().hex[:6]}", label_config=xml,
                                   backend_url=backend.url, retrieve=False)  # fmt: skip
        pid = info["project"]
        imported = importer.import_tiles(ls, pid, [stack], document_root=label_studio.document_root, tile=TILE,
                                         progress=False)  # fmt: skip
        assert imported["created"] == 12
        tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
        # the batch: tiles where both classes are present (annotations paint both)
        both = [
            tid
            for tid, t in tasks.items()
            if {1, 2} <= set(np.unique(truth[(t["data"]["slice"], t["data"]["tile_y"], t["data"]["tile_x"])]))
        ]
        assert len(both) >= 1, "no tile holds both classes"
        batch = (both + [t for t in sorted(tasks) if t not in both])[:BATCH]
        registry = ModelRegistry(model_dir, pid)
        for tid in batch:
            d = tasks[tid]["data"]
            result = mask_to_results(truth[(d["slice"], d["tile_y"], d["tile_x"])], config)
            ls.annotations.create(id=tid, result=result)
        labels_sent = {r["value"]["brushlabels"][0] for tid in batch[:1] for r in
                       mask_to_results(truth[(tasks[tid]["data"]["slice"], tasks[tid]["data"]["tile_y"],
                                              tasks[tid]["data"]["tile_x"])], config)}  # fmt: skip
        assert labels_sent == {"Mitochondria", "Nuclei"}

        version = wait_until(registry.current_version, 600, "a 3-class model version", logs=logs)
        wait_until(lambda: as_dict(ls.projects.get(id=pid)).get("model_version") == version, 300,
              "the project's model_version", logs=logs)  # fmt: skip
        meta = registry.current_meta()
        assert meta["n_annotations"] == BATCH
        model, _ = registry.load(version)
        import torch

        with torch.no_grad():
            assert model.eval()(torch.zeros(1, 1, TILE, TILE)).shape[1] == 3  # one output channel per class

        # the annotated tiles decode back to their 3-class ground truth (what training saw)
        for tid in batch:
            ann = ls.annotations.list(id=tid)[0]
            d = tasks[tid]["data"]
            decoded = results_to_mask(as_dict(ann)["result"], config, TILE, TILE)
            np.testing.assert_array_equal(decoded, truth[(d["slice"], d["tile_y"], d["tile_x"])])

        # every unlabelled task: one prediction of the version, brush regions per class, uncertainty, a score
        tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
        unlabelled = [tid for tid in tasks if tid not in batch]
        seen_labels: set[str] = set()
        uncertainty_regions = 0
        scores = {}
        for tid in unlabelled:
            preds = [p for p in tasks[tid].get("predictions") or [] if p.get("model_version") == version]
            assert len(preds) == 1, f"task {tid}: {len(preds)} predictions of {version}: {logs()}"
            pred = preds[0]
            masks = [r for r in pred["result"] if r["from_name"] == config.from_name]
            labels = [r["value"]["brushlabels"][0] for r in masks]
            assert len(labels) == len(set(labels)), f"one brush region per class, got {labels}"
            assert set(labels) <= {"Mitochondria", "Nuclei"}
            seen_labels |= set(labels)
            uncertainty_regions += sum(r["from_name"] == "uncertainty" for r in pred["result"])
            scores[tid] = pred["score"]
            assert tasks[tid]["predictions_score"] == pytest.approx(pred["score"])
        assert seen_labels == {"Mitochondria", "Nuclei"}, f"a brush pre-annotation per class, got {seen_labels}"
        assert uncertainty_regions > 0, "no per-pixel uncertainty layer was delivered"
        assert len(set(scores.values())) > 1, f"queue scores do not differ: {scores}"
    finally:
        worker.stop()
