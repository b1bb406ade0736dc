"""A real browser on the real Label Studio 1.23.2 (issue 18 item 4): an annotator clicks the real "Label All Tasks"
button, from the project's first tab and from another tab with its own (id-descending) ordering, and the tasks the
label stream serves follow the queue: lowest prediction score first, not task ids.

Why it holds (read off 1.23.2's code, ``labelstudio/setup.SHARED_QUEUE``): "Label All Tasks" posts the
``next_task`` action with an EMPTY body (no view, no ordering), so under "Sequential sampling" it would serve tasks
in id order from every tab; the set-up's "Uncertainty sampling" serves the lowest score of the project's model
version instead. The served task ids are read from Label Studio's own answers to the page (the ``next_task`` action
responses, awaited with Playwright's ``expect_response``); the annotator skips each task to get the next one.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser_helpers import login

pytestmark = pytest.mark.integration

N_TASKS = 12
PER_TAB = 3


def _project(ls: Any, document_root: Path) -> tuple[int, int, list[int]]:
    """A project set up by ``setup_project`` (no backend), N_TASKS local-file tiles and one prediction each whose
    score is a random permutation of the ids; returns (project id, queue view id, the queue: ids by score)."""
    from PIL import Image

    from ml_backend.data.synthetic import generate_em_like
    from ml_backend.labelstudio.client import as_dict, push_predictions, set_project_model_version
    from ml_backend.labelstudio.setup import DEFAULT_LABEL_CONFIG, setup_project

    info = setup_project(ls, title=f"label all tasks {uuid.uuid4().hex[:6]}",
                         label_config=DEFAULT_LABEL_CONFIG.read_text())  # fmt: skip
    pid, view = int(info["project"]), int(info["view"])
    folder = Path(document_root) / f"label-all-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    images, _ = generate_em_like(N_TASKS, size=64, seed=4)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"t{i:02d}.png")
    ls.import_storage.local.create(project=pid, path=str(folder), regex_filter=r".*\.png", use_blob_urls=True)
    rel = folder.relative_to(document_root)
    rows = [{"image": f"/data/local-files/?d={rel}/t{i:02d}.png"} for i in range(N_TASKS)]
    out = as_dict(ls.projects.import_tasks(id=pid, request=rows, return_task_ids=True))
    ids = [int(t) for t in out["task_ids"]]
    scores = np.random.default_rng(7).permutation(N_TASKS) / N_TASKS
    push_predictions(ls, pid, [{"task": t, "result": [], "score": float(s), "model_version": "v0001-browser"}
                               for t, s in zip(ids, scores, strict=True)])  # fmt: skip
    set_project_model_version(ls, pid, "v0001-browser")
    queue = [t for _, t in sorted(zip(scores, ids, strict=True))]
    assert queue[: PER_TAB * 2] != sorted(ids)[: PER_TAB * 2]  # the test tells the queue from the id order
    return pid, view, queue


def _is_next_task(resp: Any) -> bool:
    """Label Studio's answer to the label stream's ``next_task`` action: the task the page shows next."""
    return "/api/dm/actions" in resp.url and "id=next_task" in resp.url and resp.request.method == "POST"


def _label_all(page: Any, served: list[int], count: int) -> None:
    """Click "Label All Tasks", then skip tasks until ``count`` tasks were served; their ids go to ``served``."""
    with page.expect_response(_is_next_task, timeout=120_000) as answer:
        page.get_by_role("button", name="Label All Tasks").click()
    served.append(int(answer.value.json()["id"]))
    for _ in range(count - 1):
        skip = page.locator('button[aria-label="skip-task"]').first
        skip.wait_for(timeout=120_000)
        with page.expect_response(_is_next_task, timeout=120_000) as answer:
            skip.click()
        served.append(int(answer.value.json()["id"]))


def test_label_all_tasks_follows_the_queue_from_any_tab(label_studio, ls, page, artifacts):
    from ml_backend.labelstudio.setup import SAMPLING

    pid, queue_view, queue = _project(ls, Path(label_studio.document_root))
    other = ls.views.create(project=pid, data={"title": "By id, newest first", "ordering": ["-tasks:id"],
                                               "filters": {"conjunction": "and", "items": []}})  # fmt: skip
    served: list[int] = []
    login(page, label_studio)
    # the project's first tab (the set-up's queue view, the only one yet), as an annotator opens the project
    assert [v.id for v in ls.views.list(project=pid)][0] == queue_view
    page.goto(f"{label_studio.url}/projects/{pid}/data")
    page.get_by_role("button", name="Label All Tasks").wait_for()
    _label_all(page, served, PER_TAB)
    page.screenshot(path=str(artifacts / "label-all-tasks-first-tab.png"))
    assert served[:PER_TAB] == queue[:PER_TAB], (served, queue)

    # another tab with its own ordering: "Label All Tasks" there still follows the queue
    page.goto(f"{label_studio.url}/projects/{pid}/data?tab={other.id}")
    page.get_by_role("button", name="Label All Tasks").wait_for()
    _label_all(page, served, PER_TAB)
    page.screenshot(path=str(artifacts / "label-all-tasks-other-tab.png"))
    # the task left open in the first stream is locked for this annotator and comes first again: it IS next
    distinct = list(dict.fromkeys(served))
    assert distinct[: 2 * PER_TAB - 1] == queue[: 2 * PER_TAB - 1], (served, queue)
    project = ls.projects.get(id=pid)
    assert project.sampling == SAMPLING and queue_view != other.id
