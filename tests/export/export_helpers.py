"""Helpers of the export tests (imported by name, like tests/faults/fault_helpers.py): a model version in a
registry, annotations in Label Studio's JSON export format (the shape ``list_tasks`` returns) from the ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ml_backend.imaging import normalize
from ml_backend.inference.tiling import predict_batch
from ml_backend.labelstudio.importing import tile_origins
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.rle import mask_to_results
from ml_backend.model import build_model
from ml_backend.store.registry import ModelRegistry

REPO = Path(__file__).resolve().parents[2]
DENSE_XML = (REPO / "label_config" / "dense.xml").read_text()
SHAPE = (14, 80, 112)


def publish_model(model_dir: Path, project: str = "1", *, image: np.ndarray | None = None, **hparams) -> str:
    """A small U-Net (seeded) whose head bias makes ~10% of ``image``'s pixels foreground, so exports have objects
    without training; published as the project's live version."""
    torch.manual_seed(0)
    model = build_model("unet", **{"width": 4, "depth": 2, "norm": "batch", **hparams}).eval()
    if image is not None:
        x = normalize(image)
        channels = model.hparams["in_channels"]
        probs_in = np.repeat(x[None], channels, axis=0)[None]
        with torch.no_grad():
            logits = model(torch.from_numpy(probs_in.astype(np.float32)))[0]
        for c in range(1, logits.shape[0]):  # each foreground class wins on about 10% of the pixels
            diff = (logits[c] - logits[0]).numpy()
            model.head.bias.data[c] -= float(np.quantile(diff, 0.9))
        assert predict_batch(model, probs_in[:, :])[0].argmax(0).mean() > 0.02
    return ModelRegistry(model_dir, project).publish(model, {"note": "export test"})


def ls_export(labels: np.ndarray, stack_key: str, tile: int = 48, *, slices: list[int] | None = None,
              first_id: int = 1) -> list[dict]:  # fmt: skip
    """Tasks as Label Studio exports them, one per importer tile of every slice, annotated with ``labels``."""
    config = parse_label_config(DENSE_XML)
    tasks = []
    tid = first_id
    z_all = range(labels.shape[0]) if slices is None else slices
    for z in z_all:
        for y, x in tile_origins(labels.shape[1], labels.shape[2], tile):
            crop = labels[z, y : y + tile, x : x + tile]
            data = {"image": f"/data/local-files/?d=tiles/{z}_{y}_{x}.png", "stack": stack_key, "slice": z,
                    "tile_x": x, "tile_y": y, "tile_width": crop.shape[1], "tile_height": crop.shape[0]}  # fmt: skip
            ann = {"id": tid * 10, "created_at": "2026-01-01T00:00:00Z", "was_cancelled": False,
                   "result": mask_to_results(crop.astype(np.int64), config)}  # fmt: skip
            tasks.append({"id": tid, "data": data, "annotations": [ann]})
            tid += 1
    return tasks
