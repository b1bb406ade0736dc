"""The status page (ml_backend.server.status_page): renders partial data, escapes everything, plots every version."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
from http_stub import send_json

from ml_backend.server.status_page import (
    collect_project_status,
    learning_curve_svg,
    render_not_found,
    render_status_page,
)
from ml_backend.store.registry import ModelRegistry

HOSTILE = '<script>alert("x")</script>&"\'<img src=x onerror=alert(1)>'


class _Collector(HTMLParser):
    """Every tag and attribute the browser would see."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Collector:
    c = _Collector()
    c.feed(page)
    return c


def _versions(n: int) -> list[dict]:
    return [
        {
            "version": f"v{i:04d}-20261125T1200{i:02d}Z",
            "created": f"2026-11-25T12:00:{i:02d}Z",
            "n_annotations": 5 * i,
            "metrics": {"val_iou": 0.4 + 0.05 * i, "val_dice": 0.55 + 0.04 * i},
        }
        for i in range(1, n + 1)
    ]


def _full_project() -> dict:
    versions = _versions(4)
    return {
        "id": 3,
        "title": "EM stack A",
        "label_studio_url": "http://127.0.0.1:8080/projects/3",
        "live_version": versions[2]["version"],
        "job": {
            "phase": "train",
            "progress": {"step": 100, "steps": 400, "loss": 0.3125, "val_iou": 0.61, "seconds": 50.0},
        },  # fmt: skip
        "queue": {
            "labelled": 12,
            "unlabelled": 488,
            "with_live_prediction": 480,
            "pending_annotations": 3,
            "threshold": 5,
            "queued": [],
            "failed": [],
        },  # fmt: skip
        "versions": versions,
        "promotion": {"version": versions[3]["version"], "promoted": False, "reason": "val IoU 0.60 < live 0.65"},
        "errors": [{"task": 17, "reason": "image not found", "time": "12:01"}],
    }


def test_full_page_shows_every_part():
    page = render_status_page({"title": "Backend", "projects": [_full_project()]})
    text = " ".join(_parse(page).text)
    assert "v0003-20261125T120003Z" in text and "Live version" in text
    assert "100 / 400" in text and "0.3125" in text and "0.610" in text
    assert "2 min 30 s" in text  # ETA from 50 s for 100 of 400 steps
    assert "488" in text and "480" in text and "3 / 5" in text
    assert "held back" in text and "val IoU 0.60 &lt; live 0.65" not in text and "val IoU 0.60 < live 0.65" in text
    assert "image not found" in text
    # rollback hints for every version but the live one
    hints = re.findall(r"rollback --project 3 --version (v\d{4}-\w+)", text)
    assert sorted(hints) == sorted(
        v["version"] for v in _full_project()["versions"] if not v["version"].startswith("v0003")
    )
    assert page.count("<svg") == 1


def test_svg_has_one_point_per_version_and_metric():
    for n in (0, 1, 2, 7):
        svg = learning_curve_svg(_versions(n), live_version=None)
        root = ET.fromstring(svg)  # well-formed XML
        ns = "{http://www.w3.org/2000/svg}"
        circles = root.iter(f"{ns}circle")
        classes = [c.get("class") for c in circles]
        assert classes.count("pt-iou") == n and classes.count("pt-dice") == n
        assert len(list(root.iter(f"{ns}polyline"))) == (2 if n > 1 else 0)
    svg = learning_curve_svg(_versions(3), live_version=_versions(3)[1]["version"])
    ringed = [c for c in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}circle") if c.get("stroke") == "#000"]
    assert len(ringed) == 2  # IoU and Dice markers of the live version


def test_points_are_placed_by_value():
    versions = [{"version": "v0001-a", "metrics": {"val_iou": 0.0, "val_dice": 1.0}}, {"version": "v0002-b"}]
    root = ET.fromstring(learning_curve_svg(versions))
    circles = {c.get("class"): c for c in root.iter("{http://www.w3.org/2000/svg}circle")}
    assert float(circles["pt-iou"].get("cy")) > float(circles["pt-dice"].get("cy"))  # 0 is lower on screen than 1
    assert len(circles) == 2  # the version without metrics has no marker


@pytest.mark.parametrize(
    "status",
    [
        {},
        {"projects": []},
        {"projects": [{"id": 1}]},
        {"projects": [{"id": 1, "job": {}, "queue": None, "versions": None, "errors": "nonsense"}]},
        {
            "projects": [
                {
                    "id": 1,
                    "versions": [{"version": "v0001-x", "metrics": {"val_iou": float("nan")}}],
                    "job": {"step": "ten", "steps": None, "loss": float("inf")},
                    "queue": {"labelled": 0},
                }
            ]
        },  # fmt: skip
        {"projects": ["not a project", {"id": 2, "promotion": {"promoted": True, "version": "v1"}}]},
    ],
)
def test_empty_and_partial_data_render(status):
    page = render_status_page(status)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    parsed = _parse(page)
    assert "script" not in parsed.tags
    if not status.get("projects") or status == {"projects": []}:
        assert "No project set up yet" in page


def test_idle_and_untrained_project_says_so():
    page = render_status_page({"projects": [{"id": 9}]})
    assert "No training job running" in page and "not trained yet" in page and "no trained version yet" in page


def test_hostile_strings_are_escaped_everywhere():
    project = _full_project()
    project.update(
        id=HOSTILE,
        title=HOSTILE,
        live_version=HOSTILE,
        label_studio_url='javascript:alert(1)"',
        promotion={"version": HOSTILE, "promoted": False, "reason": HOSTILE},
        errors=[{"task": HOSTILE, "reason": HOSTILE, "time": HOSTILE}],
        job={"phase": HOSTILE, "step": HOSTILE, "steps": 10, "loss": HOSTILE},
        queue={"labelled": HOSTILE, "error": HOSTILE},
    )
    project["versions"] = [
        {"version": HOSTILE, "created": HOSTILE, "n_annotations": HOSTILE, "metrics": {"val_iou": HOSTILE}},
        *_versions(2),
    ]
    page = render_status_page({"title": HOSTILE, "generated_at": HOSTILE, "projects": [project]})
    parsed = _parse(page)
    assert "script" not in parsed.tags and "img" not in parsed.tags
    assert not any(name.startswith("on") for name, _ in parsed.attrs)
    assert not any(value and "javascript:" in value for _, value in parsed.attrs)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert HOSTILE in "".join(parsed.text)  # shown as text, not interpreted
    # the SVG part stays well-formed XML even with hostile version names
    svg = page[page.index("<svg") : page.index("</svg>") + 6]
    ET.fromstring(svg)


def test_not_found_page_names_the_known_projects():
    page = render_not_found(HOSTILE, known=[1, 2])
    assert "No project" in page and "Known projects: 1, 2" in page and "<script>" not in page


def _write_version(reg: ModelRegistry, meta: dict) -> None:
    """A version as the registry stores it (meta.json in versions/<id>/): the page only reads metadata."""
    d = reg.versions_dir / meta["version"]
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps(meta))


def test_collect_from_registry_and_queue_state(tmp_path):
    reg = ModelRegistry(tmp_path, 5)
    versions = _versions(3)
    for meta in versions:
        _write_version(reg, meta)
    reg.current_file.write_text(versions[1]["version"] + "\n")  # the newest one was held back
    assert reg.current_version() == versions[1]["version"]
    queue_state = {
        "queued": ["train-p5-a"],
        "running": "train-p5-b",
        "running_progress": {"phase": "train", "progress": {"step": 10, "steps": 40, "loss": 0.5, "seconds": 5.0}},
        "failed": [],
        "pending_annotations": 2,
        "threshold": 5,
    }
    project = collect_project_status(
        reg, queue_state=queue_state, counts={"labelled": 7, "unlabelled": 93, "with_live_prediction": 90}
    )
    assert project["live_version"] == versions[1]["version"] and len(project["versions"]) == 3
    assert project["promotion"]["promoted"] is False and "no reason recorded" in project["promotion"]["reason"]
    assert project["queue"]["labelled"] == 7 and project["queue"]["pending_annotations"] == 2
    page = render_status_page({"projects": [project]})
    assert "10 / 40" in page and "15 s" in page  # ETA: 5 s for 10 steps, 30 to go
    assert "held back" in page and page.count('class="pt-iou"') == 3
    # a recorded reason wins; the newest version live = promoted
    _write_version(reg, {**_versions(4)[3], "promotion": {"reason": "val IoU below the live version"}})
    held = collect_project_status(reg)
    assert held["promotion"]["reason"] == "val IoU below the live version" and held["job"] is None
    reg.current_file.write_text(_versions(4)[3]["version"] + "\n")
    assert collect_project_status(reg)["promotion"]["promoted"] is True


def test_label_studio_counts_go_through_project_data():
    """The page's two requests (project record, model-version counts) through the project's ``ProjectData``
    (``ProjectOpener``: the backend's one client factory, the page's timeout): one attempt each (the page bounds its
    own time)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from types import SimpleNamespace

    from ml_backend.labelstudio.errors import LabelStudioError
    from ml_backend.labelstudio.project_data import ProjectOpener
    from ml_backend.server.status_page import label_studio_counts

    seen: list[str] = []
    answers = {"versions": (200, {"v0002": 7, "v0001": 3})}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            seen.append(self.path)
            if self.path.startswith("/api/projects/3/model-versions"):
                status, body = answers["versions"]
            else:
                status, body = 200, {"id": 3, "title": "cells", "task_number": 10, "num_tasks_with_annotations": 4}
            send_json(self, status, body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = SimpleNamespace(label_studio_url=f"http://127.0.0.1:{server.server_port}", label_studio_api_key="k")
        project = ProjectOpener(settings, timeout=5)(3)
        counts = label_studio_counts(project, "v0002")
        assert counts == {"title": "cells", "total": 10, "labelled": 4, "unlabelled": 6, "with_live_prediction": 7}
        assert label_studio_counts(project, "v0009")["with_live_prediction"] == 0
        assert "with_live_prediction" in label_studio_counts(project, None)
        seen.clear()
        answers["versions"] = (503, {"detail": "busy"})
        with pytest.raises(LabelStudioError):
            label_studio_counts(project, "v0002")
        assert sum("model-versions" in p for p in seen) == 1  # no retry: the page has its own deadline
    finally:
        server.shutdown()
        server.server_close()
