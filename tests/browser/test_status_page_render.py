"""The status page as a browser renders it: live version, job progress and the learning-curve plot are on screen.

The page is rendered by ml_backend.server.status_page from registry-shaped data and opened from a file (the route
that serves it is wired separately); screenshot: tests/artifacts/status-page.png, copied to docs/status-page.png.
"""

from __future__ import annotations

import shutil

from browser_helpers import REPO


def _status() -> dict:
    versions = [
        {
            "version": f"v{i:04d}-20261125T12{i:02d}00Z",
            "created": f"2026-11-25T12:{i:02d}:00Z",
            "n_annotations": 5 * i,
            "metrics": {"val_iou": iou, "val_dice": dice},
        }
        for i, (iou, dice) in enumerate([(0.41, 0.58), (0.55, 0.70), (0.63, 0.77), (0.68, 0.81), (0.66, 0.79)], 1)
    ]
    project = {
        "id": 1,
        "title": "EM stack A (mitochondria)",
        "label_studio_url": "http://127.0.0.1:8080/projects/1",
        "live_version": versions[3]["version"],
        "job": {
            "phase": "train",
            "progress": {"step": 240, "steps": 600, "loss": 0.2481, "val_iou": 0.671, "seconds": 96.0},
        },  # fmt: skip
        "queue": {
            "labelled": 25,
            "unlabelled": 1975,
            "with_live_prediction": 1990,
            "pending_annotations": 2,
            "threshold": 5,
            "queued": [],
            "failed": [],
        },  # fmt: skip
        "versions": versions,
        "promotion": {
            "version": versions[4]["version"],
            "promoted": False,
            "reason": "validation IoU 0.660 below the live version's 0.680",
        },  # fmt: skip
        "errors": [{"time": "2026-11-25T12:41:07Z", "task": 1873, "reason": "image not found (404 from Label Studio)"}],
    }
    title = "EM active-learning backend — status"
    return {"title": title, "generated_at": "2026-11-25T12:45:00Z", "projects": [project]}


def test_status_page_in_a_browser(page, artifacts):
    from ml_backend.server.status_page import render_status_page

    status = _status()
    path = artifacts / "status-page.html"
    path.write_text(render_status_page(status, refresh_s=None), encoding="utf-8")
    page.goto(path.as_uri())
    live = status["projects"][0]["live_version"]
    assert page.locator(".live-version").inner_text() == live
    svg = page.locator("svg.learning-curve")
    assert svg.is_visible()
    box = svg.bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 150
    assert page.locator("svg.learning-curve circle.pt-iou").count() == 5
    assert page.locator("svg.learning-curve circle.pt-dice").count() == 5
    text = page.inner_text("body")
    assert "240 / 600" in text and "held back" in text and "rollback --project 1 --version v0005" in text
    shot = artifacts / "status-page.png"
    page.screenshot(path=str(shot), full_page=True)
    shutil.copyfile(shot, REPO / "docs" / "status-page.png")
