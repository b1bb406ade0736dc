"""Issue 16, item 7b: one broken project never takes the status page down.

A project whose ``CURRENT`` holds bytes that are not UTF-8, and another whose ``CURRENT`` names a version that is not
on disk, made ``/status`` answer 500 for every project. Served here by the real backend under gunicorn (real Label
Studio for the counts): the page answers 200, renders the healthy project, and gives each broken one a note that says
what is wrong; ``/status/<broken id>`` answers 200 with its note.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from ml_backend.store.registry import ModelRegistry, RegistryError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

HEALTHY, NOT_TEXT, MISSING = 101, 102, 103
GONE = "v0099-20260101T000000Z"


def _tiny_model():
    from ml_backend.model import build_model

    return build_model("unet", width=4, depth=2)


def _damaged_model_dir(root: Path) -> tuple[Path, str]:
    """MODEL_DIR with a healthy project, one whose CURRENT is b"\\xff\\xfe", one whose CURRENT names a missing
    version; returns (MODEL_DIR, the healthy project's live version)."""
    model_dir = root / "models"
    live = ModelRegistry(model_dir, HEALTHY).publish(_tiny_model(), {"metrics": {"val_iou": 0.5, "val_dice": 0.6}})
    for pid in (NOT_TEXT, MISSING):
        ModelRegistry(model_dir, pid).publish(_tiny_model(), {"metrics": {"val_iou": 0.4}})
    ModelRegistry(model_dir, NOT_TEXT).current_file.write_bytes(b"\xff\xfe")
    ModelRegistry(model_dir, MISSING).current_file.write_text(f"{GONE}\n")
    return model_dir, live


def _get(url: str, accept: str = "text/html") -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def test_damaged_current_files_are_registry_errors_naming_the_project(tmp_path):
    """The registry's read path: every broken CURRENT is a RegistryError (what callers report), never a
    UnicodeDecodeError; damaged metadata and history lines are skipped, not fatal."""
    model_dir, live = _damaged_model_dir(tmp_path)
    with pytest.raises(RegistryError, match=f"project {NOT_TEXT}: CURRENT .* is not text"):
        ModelRegistry(model_dir, NOT_TEXT).current_version()
    with pytest.raises(RegistryError, match=f"project {MISSING}: CURRENT points to '{GONE}'"):
        ModelRegistry(model_dir, MISSING).current_version()
    reg = ModelRegistry(model_dir, HEALTHY)
    (reg.versions_dir / live / "meta.json").write_bytes(b"\xff{")
    assert reg.versions() == []  # skipped with a warning
    reg.history_file.write_bytes(b'{"action": "promote"}\n\xff\xfe\n[1]\n')
    assert reg.history() == [{"action": "promote"}]
    reg.current_file.write_text("../../../etc\n")
    with pytest.raises(RegistryError, match="not a version id"):
        reg.current_version()


def test_status_page_survives_broken_projects(start_backend, tmp_path):
    model_dir, live = _damaged_model_dir(tmp_path)
    backend = start_backend(model_dir)

    code, page = _get(f"{backend.url}/status")
    assert code == 200, page[-2000:]
    assert f'id="project-{HEALTHY}"' in page and f'<span class="live live-version">{live}</span>' in page
    for pid in (NOT_TEXT, MISSING):
        assert f'id="project-{pid}"' in page
    assert page.count('class="err problems"') == 2
    assert f"project {NOT_TEXT}: CURRENT" in page and "is not text" in page
    assert f"CURRENT points to &#x27;{GONE}&#x27;" in page  # escaped, as everything from disk

    code, body = _get(f"{backend.url}/status", accept="application/json")
    assert code == 200
    projects = {p["id"]: p for p in json.loads(body)["projects"]}
    assert projects[str(HEALTHY)]["problems"] == [] and projects[str(HEALTHY)]["live_version"] == live
    assert "is not text" in projects[str(NOT_TEXT)]["problems"][0]
    assert "not a complete version" in projects[str(MISSING)]["problems"][0]
    assert projects[str(MISSING)]["versions"]  # its stored versions are still listed, with rollback hints

    for pid, words in ((NOT_TEXT, "is not text"), (MISSING, "not a complete version")):
        code, one = _get(f"{backend.url}/status/{pid}")
        assert code == 200 and words in one and f'id="project-{pid}"' in one
        assert f"rollback --project {pid} --version" in one  # the way out is on the page
    code, one = _get(f"{backend.url}/status/{HEALTHY}")
    assert code == 200 and 'class="err problems"' not in one
