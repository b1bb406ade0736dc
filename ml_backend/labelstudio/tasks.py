"""Images of Label Studio tasks: fetched through the media layer (validated, cached, size-bounded), and the seeded
sample of project crops that re-estimates BatchNorm statistics after a training."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ml_backend.config import Settings
from ml_backend.labelstudio.annotations import task_image_url
from ml_backend.labelstudio.media import fetch_image

log = logging.getLogger(__name__)


def load_task_image(task: dict, config: Any, settings: Settings) -> np.ndarray:
    """Normalised float32 (H, W) image of a task, fetched through Label Studio (cached on disk)."""
    return fetch_image(task_image_url(task, config), settings)  # same validated, bounded route as /predict


def calibration_crops(
    tasks: dict[int, dict],
    settings: Settings,
    load: Callable[[dict], np.ndarray],
    *,
    workers: int = 8,
) -> list[np.ndarray]:
    """Up to BN_CALIBRATION_TILES random TRAIN_CROP crops, one per task of a seeded sample of all the project's
    tasks: representative images for ``recalibrate_batchnorm``. A task whose image fails is skipped (logged).
    ``load(task)``: the project's model input (``ProjectData.model_input`` with the model's offsets: (C, crop,
    crop) crops with the neighbouring slices for a 2.5D model), as the model reads them."""
    n = min(settings.bn_calibration_tiles, len(tasks))
    if n <= 0:
        return []
    rng = np.random.default_rng([settings.seed, 7])
    ids = sorted(tasks)
    chosen = [ids[i] for i in sorted(rng.choice(len(ids), size=n, replace=False))]
    corners = rng.random((n, 2))
    load_input = load

    def one(k: int) -> np.ndarray | None:
        try:
            img = load_input(tasks[chosen[k]])
        except Exception as exc:  # calibration is best effort: a missing image must not fail the training
            log.warning("task %s: image unavailable for BatchNorm calibration: %s", chosen[k], exc)
            return None
        c = settings.train_crop
        y0 = int(corners[k, 0] * max(0, img.shape[-2] - c + 1))
        x0 = int(corners[k, 1] * max(0, img.shape[-1] - c + 1))
        return np.ascontiguousarray(img[..., y0 : y0 + c, x0 : x0 + c])

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # image fetches are I/O bound
        crops = list(pool.map(one, range(n)))
    return [c for c in crops if c is not None]
