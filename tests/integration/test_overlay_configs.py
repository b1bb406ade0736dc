"""Every shipped overlay config against the real Label Studio 1.23.2 (issue 12): the project is created, a task with a
prediction holding the mask, the uncertainty layer and the suggestion rectangle is accepted, and an annotation with
all three round-trips and trains exactly as its mask control alone."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
H, W = 96, 128


def _classmap(num_classes: int) -> np.ndarray:
    cm = np.zeros((H, W), np.int64)
    cm[10:30, 10:40] = 1
    if num_classes > 2:
        cm[50:90, 60:120] = 2
    return cm


@pytest.mark.parametrize("name", ["dense_uncertainty.xml", "sparse_uncertainty.xml", "multiclass.xml", "dense_25d.xml"])
def test_overlay_config_round_trips_through_label_studio(label_studio, ls, name):
    from label_studio_sdk.label_interface import LabelInterface
    from PIL import Image

    from ml_backend.labelstudio.client import as_dict
    from ml_backend.labelstudio.overlays import (
        PixelRect,
        annotation_training_mask,
        parse_overlay_config,
        strip_non_label_results,
        suggestion_rect_from_results,
        suggestion_results,
        uncertainty_results,
    )
    from ml_backend.labelstudio.rle import mask_to_results, results_to_mask
    from ml_backend.training import IGNORE

    xml = (REPO / "label_config" / name).read_text()
    cfg = parse_overlay_config(xml)
    project = ls.projects.create(title=f"overlay config {name} {uuid.uuid4().hex[:4]}", label_config=xml)
    stored_config = as_dict(ls.projects.get(id=project.id))["label_config"]
    assert parse_overlay_config(stored_config).display_only == {"uncertainty", "suggestion"}

    folder = Path(label_studio.document_root) / f"overlay-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {}
    for key in ("image", "image_prev", "image_next"):
        Image.fromarray((rng.random((H, W)) * 255).astype(np.uint8)).save(folder / f"{key}.png")
        data[key] = f"/data/local-files/?d={folder.relative_to(label_studio.document_root)}/{key}.png"
    ls.import_storage.local.create(project=project.id, path=str(folder), regex_filter=r".*\.png", use_blob_urls=True)
    imported = ls.projects.import_tasks(id=project.id, request=[{"data": data}], return_task_ids=True)
    task_id = int(imported.task_ids[0])

    cm = _classmap(cfg.mask.num_classes)
    uncertainty = np.zeros((H, W))
    uncertainty[20:60, 30:90] = 0.9
    box = PixelRect(8, 6, 72, 54)
    labels = mask_to_results(cm, cfg.mask, score=0.7)
    result = labels + uncertainty_results(uncertainty, cfg) + suggestion_results(box, cfg, H, W)
    assert len(result) == len(labels) + 2

    # prediction accepted (no 400) and what Label Studio stored passes its own validator
    prediction = as_dict(ls.predictions.create(task=task_id, result=result, score=0.4, model_version="v0001-test"))
    assert len(prediction["result"]) == len(result)
    assert LabelInterface(stored_config).validate_prediction({"result": prediction["result"]}, return_errors=True) == []

    # an annotation holding all three round-trips; training sees only the mask control
    created = as_dict(ls.annotations.create(id=task_id, result=result))
    back = as_dict(ls.annotations.get(id=created["id"]))["result"]
    assert sorted(r["from_name"] for r in back) == sorted(r["from_name"] for r in result)
    assert suggestion_rect_from_results(back, cfg, H, W) == box
    mask = results_to_mask(back, cfg.mask, H, W)
    plain = results_to_mask(labels, cfg.mask, H, W)
    np.testing.assert_array_equal(mask, plain)
    np.testing.assert_array_equal(results_to_mask(strip_non_label_results(back, cfg), cfg.mask, H, W), plain)
    training = annotation_training_mask(back, cfg, H, W)
    if cfg.mask.mode == "sparse":  # the box limits a sparse annotation: outside unknown, unpainted inside background
        inside = np.zeros((H, W), bool)
        inside[box.slices] = True
        assert (training[~inside] == IGNORE).all()
        np.testing.assert_array_equal(training[inside], np.where(cm[inside] > 0, cm[inside], 0))
    else:
        np.testing.assert_array_equal(training, plain)
