"""A real browser on the real Label Studio 1.23.2: the labelling page shows the pre-annotation, the uncertainty layer
(which the annotator can hide and show) and the suggested region, and an annotation submitted with all three still
trains exactly as one holding only the mask (issue 12).

Screenshots: tests/artifacts/label-studio-uncertainty.png, copied to docs/label-studio-uncertainty.png for the README.
"""

from __future__ import annotations

import io
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from browser_helpers import REPO, login, region_titles

pytestmark = pytest.mark.integration

CONFIG = REPO / "label_config" / "dense_uncertainty.xml"
SIZE = 512


def _simulated_model(seed: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(EM-like uint8 image, (2, H, W) softmax of a plausible model, true mask): blurred truth, unsure in one corner."""
    from scipy.ndimage import gaussian_filter

    from ml_backend.data.synthetic import generate_em_like

    images, masks = generate_em_like(1, size=SIZE, seed=seed)
    p1 = gaussian_filter(masks[0].astype(np.float64), sigma=2.5)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    unsure = np.exp(-((yy - 360) ** 2 + (xx - 150) ** 2) / (2 * 70.0**2))  # the model hesitates bottom-left
    p1 = (1 - unsure) * p1 + unsure * (0.35 + 0.3 * p1)
    p1 = np.clip(p1, 0.0, 1.0)
    return images[0], np.stack([1 - p1, p1]), masks[0]


def _magenta_pixels(png: bytes) -> int:
    """Pixels of the screenshot tinted by the uncertainty colour (#D500F9 at 45 % over grey)."""
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((b - g > 60) & (r - g > 40)).sum())


def _prediction(cfg, probs: np.ndarray) -> tuple[list[dict], np.ndarray]:
    from ml_backend.labelstudio.overlays import PixelRect, normalised_entropy, suggestion_results, uncertainty_results
    from ml_backend.labelstudio.rle import mask_to_results
    from ml_backend.strategies.region import suggest_region

    predicted = np.argmax(probs, axis=0)
    uncertainty = normalised_entropy(probs)
    region = suggest_region(probs, uncertainty, window=192, stride=32, min_tile=256)
    assert region is not None
    assert region.x0 < 150 < region.x1 and region.y0 < 360 < region.y1  # on the unsure corner
    result = (
        mask_to_results(predicted, cfg.mask, score=0.8)
        + uncertainty_results(uncertainty, cfg, thresholds=(0.6,))
        + suggestion_results(PixelRect(region.x0, region.y0, region.x1, region.y1), cfg, SIZE, SIZE)
    )
    return result, predicted


def _magenta_until(canvas, done, timeout_s: float = 30.0) -> int:
    """Magenta pixels on the canvas once ``done(count)`` holds (the canvas repaints asynchronously), or the last count
    seen when ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        count = _magenta_pixels(canvas.screenshot())
        if done(count) or time.monotonic() > deadline:
            return count
        time.sleep(0.3)


def _annotations(ls, task_id: int) -> list[dict]:
    from ml_backend.labelstudio.client import as_dict

    return [as_dict(a) for a in ls.annotations.list(id=task_id)]


def test_labelling_page_shows_mask_uncertainty_and_suggestion(label_studio, ls, page, artifacts):
    from label_studio_sdk.label_interface import LabelInterface
    from PIL import Image

    from ml_backend.labelstudio.overlays import annotation_training_mask, parse_overlay_config, strip_non_label_results
    from ml_backend.labelstudio.rle import results_to_mask

    t0 = time.monotonic()
    xml = CONFIG.read_text()
    cfg = parse_overlay_config(xml)
    image, probs, _truth = _simulated_model()
    result, predicted = _prediction(cfg, probs)

    # --- project, image served from local files, task, prediction (Label Studio's own validator agrees)
    folder = Path(label_studio.document_root) / f"browser-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    Image.fromarray(image).save(folder / "tile.png")
    project = ls.projects.create(title="issue 12: uncertainty + suggestion", label_config=xml)
    ls.import_storage.local.create(project=project.id, path=str(folder), regex_filter=r".*\.png", use_blob_urls=True)
    rel = folder.relative_to(label_studio.document_root) / "tile.png"
    imported = ls.projects.import_tasks(
        id=project.id, request=[{"data": {"image": f"/data/local-files/?d={rel}"}}], return_task_ids=True
    )
    task_id = int(imported.task_ids[0])
    ls.predictions.create(task=task_id, result=result, score=0.3, model_version="v0001-browser")
    stored = ls.predictions.list(task=task_id)
    assert len(stored) == 1 and len(stored[0].result) == 3
    assert LabelInterface(xml).validate_prediction({"result": stored[0].result}, return_errors=True) == []

    # --- the labelling page: three regions listed, the layer drawn
    login(page, label_studio)
    page.goto(f"{label_studio.url}/projects/{project.id}/data?task={task_id}")
    names = region_titles(page, 3)
    assert any(n.startswith("Mitochondria") for n in names), names
    assert "Uncertain" in names and "Suggested region" in names, names
    assert len(names) == 3, names
    canvas = page.locator(".lsf-main-content, .lsf-main-view").first
    # the brush layers are painted onto the canvas after the list appears (later on a loaded machine)
    shown = _magenta_until(canvas, lambda n: n > 500)
    assert shown > 500, f"uncertainty layer not drawn ({shown} magenta pixels)"
    shot = artifacts / "label-studio-uncertainty.png"
    page.screenshot(path=str(shot))

    # --- the annotator hides the layer with its eye icon, then shows it again
    uncertain_item = page.locator(".lsf-outliner-item", has_text="Uncertain")
    uncertain_item.hover()
    toggle = uncertain_item.locator(".lsf-outliner-item__control_type_visibility button")
    toggle.click()
    hidden = _magenta_until(canvas, lambda n: n < shown / 5)
    assert hidden < shown / 5, (shown, hidden)
    page.screenshot(path=str(artifacts / "label-studio-uncertainty-hidden.png"))
    uncertain_item.hover()
    toggle.click()
    assert _magenta_until(canvas, lambda n: n > shown / 2) > shown / 2

    # --- submit: Label Studio keeps all three regions in the annotation; training sees only the mask
    page.get_by_role("button", name="submit").first.click()
    deadline = time.monotonic() + 30
    annotations: list[dict] = []
    while time.monotonic() < deadline and not annotations:
        annotations = _annotations(ls, task_id)
        time.sleep(0.5)
    assert len(annotations) == 1, "the submitted annotation did not reach Label Studio"
    submitted = annotations[0]["result"]
    assert sorted(r["from_name"] for r in submitted) == ["suggestion", "tag", "uncertainty"]
    mask = results_to_mask(submitted, cfg.mask, SIZE, SIZE)
    np.testing.assert_array_equal(mask, predicted)
    stripped = strip_non_label_results(submitted, cfg)
    assert [r["from_name"] for r in stripped] == ["tag"]
    np.testing.assert_array_equal(annotation_training_mask(submitted, cfg, SIZE, SIZE), mask)
    np.testing.assert_array_equal(results_to_mask(stripped, cfg.mask, SIZE, SIZE), mask)

    docs = REPO / "docs" / "label-studio-uncertainty.png"
    docs.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, docs)
    print(f"labelling-page browser test: {time.monotonic() - t0:.0f} s")


def test_25d_page_shows_the_neighbouring_slices(label_studio, ls, page, artifacts):
    """dense_25d.xml: the slices above and below are shown beside the centre tile; regions belong to the centre."""
    from PIL import Image

    from ml_backend.data.synthetic import generate_em_like
    from ml_backend.labelstudio.overlays import parse_overlay_config
    from ml_backend.labelstudio.rle import mask_to_results

    xml = (REPO / "label_config" / "dense_25d.xml").read_text()
    cfg = parse_overlay_config(xml)
    images, masks = generate_em_like(3, size=256, seed=4)
    folder = Path(label_studio.document_root) / f"browser25d-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    data = {}
    for key, img in zip(("image_prev", "image", "image_next"), images, strict=True):
        Image.fromarray(img).save(folder / f"{key}.png")
        data[key] = f"/data/local-files/?d={folder.relative_to(label_studio.document_root)}/{key}.png"
    project = ls.projects.create(title="issue 12: 2.5D view", label_config=xml)
    ls.import_storage.local.create(project=project.id, path=str(folder), regex_filter=r".*\.png", use_blob_urls=True)
    task_id = int(ls.projects.import_tasks(id=project.id, request=[{"data": data}], return_task_ids=True).task_ids[0])
    ls.predictions.create(task=task_id, result=mask_to_results(masks[1], cfg.mask), score=0.5, model_version="v1")

    login(page, label_studio)
    page.goto(f"{label_studio.url}/projects/{project.id}/data?task={task_id}")
    page.wait_for_function("document.querySelectorAll('.lsf-outliner-item__title').length >= 1", timeout=60_000)
    loaded = page.wait_for_function(
        """() => {
            const imgs = [...document.querySelectorAll('img')].filter(i => i.src.includes('local-files'));
            const ok = imgs.filter(i => i.complete && i.naturalWidth === 256);
            return ok.length >= 3 ? ok.map(i => i.src) : null;
        }""",
        timeout=30_000,
    ).json_value()
    assert {src.split("/")[-1] for src in loaded} >= {"image_prev.png", "image.png", "image_next.png"}
    # the editor re-renders the Regions list once every image has loaded: wait for it to be back
    assert region_titles(page, 1, timeout_ms=30_000)[0].startswith("Mitochondria")
    page.wait_for_timeout(1000)
    shot = artifacts / "label-studio-25d.png"
    page.screenshot(path=str(shot))
    shutil.copyfile(shot, REPO / "docs" / "label-studio-25d.png")
