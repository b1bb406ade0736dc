"""The re-scoring job's bulk delivery carries the same layers as /predict (issue 12: "with every prediction"), against
the real Label Studio 1.23.2: ``loop.score_tiles`` (what each re-scoring chunk runs) builds the results from a really
trained model, ``loop.LabelStudioSink`` uploads them in bulk, and Label Studio stores and validates every layer."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SIZE = 128


def test_bulk_predictions_hold_mask_uncertainty_and_suggestion(label_studio, ls, train_tiny_unet):
    from label_studio_sdk.label_interface import LabelInterface
    from PIL import Image

    from ml_backend.active_learning.round import ScoredPool
    from ml_backend.active_learning.selection import Ranking
    from ml_backend.config import Settings
    from ml_backend.data.synthetic import generate_em_like
    from ml_backend.imaging import normalize
    from ml_backend.inference.scoring import PoolScores
    from ml_backend.labelstudio.client import as_dict, list_tasks
    from ml_backend.labelstudio.labelconfig import parse_label_config
    from ml_backend.labelstudio.loop import LabelStudioSink, score_tiles
    from ml_backend.labelstudio.project_data import LabelStudioProject
    from ml_backend.strategies import get_strategy

    xml = (REPO / "label_config" / "sparse_uncertainty.xml").read_text()
    config = parse_label_config(xml)
    project = as_dict(ls.projects.create(title=f"job overlays {uuid.uuid4().hex[:6]}", label_config=xml))
    pid = int(project["id"])
    images, _ = generate_em_like(3, SIZE, seed=8)
    folder = Path(label_studio.document_root) / f"job-overlays-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    data = []
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"t{i}.png")
        rel = folder.relative_to(label_studio.document_root) / f"t{i}.png"
        data.append({"data": {"image": f"/data/local-files/?d={rel}"}})
    ls.import_storage.local.create(project=pid, path=str(folder), regex_filter=r".*\.png", use_blob_urls=True)
    ids = [int(t) for t in ls.projects.import_tasks(id=pid, request=data, return_task_ids=True).task_ids]

    model, _metrics = train_tiny_unet(n=8, seed=5, depth=3, steps=40, threads=2)
    settings = Settings.from_env(device="cpu", suggest_min_tile=96, suggest_window=64)
    summary, results, pixels = score_tiles(model, [normalize(i) for i in images], get_strategy("entropy"), config,
                                            settings)  # fmt: skip
    scored = ScoredPool(ids, PoolScores(summary, pixels), results)
    ranking = Ranking(ids=ids, picked=list(ids), scores=np.array([0.1, 0.2, 0.3]))
    tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
    project_data = LabelStudioProject(pid, settings, ls, listed=tasks, config=config, label_xml=xml)
    assert LabelStudioSink(project_data).put("v0001-job", scored, ranking) == 3

    interface = LabelInterface(as_dict(ls.projects.get(id=pid))["label_config"])
    for task in list_tasks(ls, pid):
        (pred,) = task["predictions"]
        assert pred["model_version"] == "v0001-job"
        names = sorted({r["from_name"] for r in pred["result"]})
        assert names == ["suggestion", "tag", "uncertainty"], names
        assert interface.validate_prediction({"result": pred["result"]}, return_errors=True) == []
        (box,) = [r for r in pred["result"] if r["from_name"] == "suggestion"]
        assert box["value"]["width"] == pytest.approx(50.0) and box["original_width"] == SIZE
    assert np.isfinite(summary["value"]).all()
