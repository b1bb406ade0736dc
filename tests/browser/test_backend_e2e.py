"""The whole product in a real browser (issue 12, item 7): real Label Studio 1.23.2 and the real backend (gunicorn,
behind basic auth) connected to a project with the uncertainty config, a really trained model published, predictions
retrieved by Label Studio from the backend. The labelling page of the FIRST task of the queue shows the
pre-annotation, the uncertainty layer and the suggested rectangle; the backend's status page (linked from the
project description) shows the learning-curve plot and the live version.

Screenshots: tests/artifacts/annotator-view.png and team-lead-status.png, copied to docs/ for the README.
"""

from __future__ import annotations

import shutil
import time
import uuid

import httpx
import numpy as np
import pytest
import tifffile
from browser_helpers import REPO, login, region_titles

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

AUTH = ("team", "s3cret-status")
TILE = 128


def test_annotator_and_team_lead_views(label_studio, ls, start_backend, scripts, train_tiny_unet, browser,
                                       artifacts, redis_url, tmp_path):  # fmt: skip
    from ml_backend.data.synthetic import generate_em_like
    from ml_backend.labelstudio.client import as_dict, list_tasks
    from ml_backend.store.registry import ModelRegistry

    t0 = time.monotonic()
    setup = scripts("setup_project")
    importer = scripts("import_tiles")
    model_dir = tmp_path / "models"
    backend = start_backend(
        model_dir, BASIC_AUTH_USER=AUTH[0], BASIC_AUTH_PASS=AUTH[1], REDIS_URL=redis_url, SUGGEST_MIN_TILE="96",
        SUGGEST_WINDOW="64", SUGGEST_STRIDE="16",
    )  # fmt: skip
    xml = (REPO / "label_config" / "dense_uncertainty.xml").read_text()
    title = f"browser e2e {uuid.uuid4().hex[:6]}"

    # --- project + tiles + backend connected (cold start), through the product's own set-up commands
    first = setup.setup_project(ls, title=title, label_config=xml, backend_url=backend.url, basic_auth=AUTH)
    pid, view = first["project"], first["view"]
    stack, _ = generate_em_like(2, 2 * TILE, seed=31)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    importer.import_tiles(ls, pid, [tmp_path / "stack.tif"], document_root=label_studio.document_root, tile=TILE,
                          progress=False)  # fmt: skip

    # --- two really trained versions (the second better), published as the training job does
    registry = ModelRegistry(model_dir, pid)
    for n_ann, steps in ((4, 20), (12, 120)):
        model, metrics = train_tiny_unet(n=n_ann, seed=5, depth=3, steps=steps, threads=2)
        version = registry.publish(model, {"metrics": metrics, "n_annotations": n_ann, "trigger": "browser test"})
    info = setup.setup_project(ls, title=title, label_config=xml, backend_url=backend.url, basic_auth=AUTH)
    assert info["model_version"] == version
    description = as_dict(ls.projects.get(id=pid))["description"]
    assert description.endswith(f"{setup.STATUS_LINK_PREFIX}{backend.url}/status/{pid}")

    # every task holds a prediction of the live version with all three layers, accepted by Label Studio
    for task in list_tasks(ls, pid):
        (pred,) = [p for p in task["predictions"] if p["model_version"] == version]
        names = sorted({r["from_name"] for r in pred["result"]})
        assert names == ["suggestion", "tag", "uncertainty"], (task["id"], names)

    # --- the annotator: the first task of the queue
    nxt = httpx.get(f"{label_studio.url}/api/projects/{pid}/next",
                    headers={"Authorization": f"Token {label_studio.api_key}"}, timeout=30)  # fmt: skip
    nxt.raise_for_status()
    first_task = int(nxt.json()["id"])
    context = browser.new_context(viewport={"width": 1400, "height": 1150}, http_credentials={
        "username": AUTH[0], "password": AUTH[1]})  # fmt: skip
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        login(page, label_studio)
        page.goto(f"{label_studio.url}/projects/{pid}/data?tab={view}&task={first_task}")
        names = region_titles(page, 3)
        assert any(n.startswith("Mitochondria") for n in names), names  # the pre-annotation region
        assert "Uncertain" in names and "Suggested region" in names, names
        page.wait_for_timeout(1500)  # brush layers are painted onto the canvas after the list appears
        shot = artifacts / "annotator-view.png"
        page.screenshot(path=str(shot))
        shutil.copyfile(shot, REPO / "docs" / "annotator-view.png")

        # --- the team lead: the status page linked from the project description (same basic auth as the backend)
        link = description.rsplit(setup.STATUS_LINK_PREFIX, 1)[1].strip()
        response = page.goto(link)
        assert response is not None and response.status == 200
        assert page.locator(".live-version").inner_text() == version
        svg = page.locator("svg.learning-curve")
        assert svg.is_visible()
        assert page.locator("svg.learning-curve circle.pt-iou").count() == 2
        text = page.inner_text("body")
        assert "rollback --project" in text and "tasks with a prediction of the live version" in text
        assert "new annotations since the last training" in text and "unavailable" not in text  # Redis answered
        shot = artifacts / "team-lead-status.png"
        page.screenshot(path=str(shot), full_page=True)
        shutil.copyfile(shot, REPO / "docs" / "team-lead-status.png")
    finally:
        context.close()
    counts = httpx.get(f"{backend.url}/status/{pid}", auth=AUTH, headers={"Accept": "application/json"}, timeout=30)
    (project,) = counts.json()["projects"]
    assert project["queue"]["total"] == 8 and project["queue"]["with_live_prediction"] == 8, project["queue"]
    assert project["queue"]["labelled"] == 0 and project["title"] == title
    assert np.isfinite(project["versions"][-1]["metrics"]["val_iou"])
    # About 2 minutes on an idle 2-core machine (two short trainings are most of it); on a shared, loaded machine it
    # can take several times that, so time is bounded by the test's timeout (600 s) rather than asserted.
    print(f"browser end-to-end test: {time.monotonic() - t0:.0f} s")
