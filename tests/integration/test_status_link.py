"""The set-up command links the backend's status page from the project description (issue 12), against the real
Label Studio 1.23.2: the team's own text is kept, re-runs do not repeat the line, a new backend URL replaces it."""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.integration


def test_status_link_in_the_project_description(ls):
    from ml_backend.labelstudio.client import as_dict
    from ml_backend.labelstudio.setup import STATUS_LINK_PREFIX, ensure_status_link, status_url

    xml = '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image"><Label value="M"/>'
    xml += "</BrushLabels></View>"
    notes = "Stack A, slices 1-200.\nAsk Ana before relabelling.\n"
    title = f"status link {uuid.uuid4().hex[:6]}"
    project = as_dict(ls.projects.create(title=title, label_config=xml, description=notes))
    pid = int(project["id"])
    url = status_url("http://backend.example:9090/", pid)
    assert url == f"http://backend.example:9090/status/{pid}"

    assert ensure_status_link(ls, project, url) is True
    stored = as_dict(ls.projects.get(id=pid))
    assert stored["description"] == f"Stack A, slices 1-200.\nAsk Ana before relabelling.\n{STATUS_LINK_PREFIX}{url}"
    assert ensure_status_link(ls, stored, url) is False  # idempotent: nothing sent

    moved = status_url("https://ml.lab.example", pid)
    assert ensure_status_link(ls, stored, moved) is True
    description = as_dict(ls.projects.get(id=pid))["description"]
    assert description.count(STATUS_LINK_PREFIX) == 1 and description.endswith(moved)
    assert description.startswith("Stack A, slices 1-200.\nAsk Ana before relabelling.\n")
