"""``ml-backend import`` with the shipped default PRETRAIN=false (issue 17's decision): no cold-start job runs, so
the command itself publishes the position-spread first queue; Label Studio then serves the first batch spread over
the stack, not task 1, 2, 3 (real Label Studio 1.23.2, a generated stack)."""

from __future__ import annotations

import uuid

import tifffile
from serving_order import serving_order

from ml_backend.active_learning.plan import cold_start_order
from ml_backend.config import Settings
from ml_backend.labelstudio.client import as_dict, list_tasks

TILE = 64


def test_import_publishes_the_spread_queue_when_pretraining_is_off(label_studio, ls, scripts, tmp_path, monkeypatch,
                                                                    capsys):  # fmt: skip
    from ml_backend.cli import importing
    from ml_backend.data.volume import generate_volume

    vol = generate_volume((8, 128, 128), setting="isotropic", seed=5, foreground=0.1)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, vol.image, photometric="minisblack")
    info = scripts("setup_project").setup_project(
        ls, title=f"import spread {uuid.uuid4().hex[:6]}", label_config=_dense(), retrieve=False
    )
    pid = info["project"]
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("PRETRAIN", raising=False)  # the shipped default
    settings = Settings.from_env()
    assert settings.pretrain is False
    rc = importing.main([str(stack), "--project", str(pid), "--tile", str(TILE), "--quiet",
                         "--document-root", str(label_studio.document_root), "--url", label_studio.url,
                         "--token", label_studio.api_key])  # fmt: skip
    assert rc == 0
    assert "pretraining off; first queue spread over the stack (32 tasks)" in capsys.readouterr().out
    assert as_dict(ls.projects.get(id=pid))["model_version"] == "cold-start"
    tasks = {int(t["id"]): t for t in list_tasks(ls, pid)}
    assert len(tasks) == 8 * 4
    served = serving_order(tasks, "cold-start")  # what Label Studio serves first (lowest score)
    assert served == cold_start_order(sorted(tasks), tasks, settings)
    first = served[: settings.train_batch_size]
    assert first != sorted(tasks)[: len(first)]  # not the ID order
    # spread over the stack (ID order would put the first eight on 2 slices; the spread order's exact slices depend
    # on which tasks the audit split holds, a hash of the ids: 5 to 8 of the 8 slices over 428 id offsets)
    assert len({tasks[t]["data"]["slice"] for t in first[:8]}) >= 4


def _dense() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[2] / "label_config" / "dense.xml").read_text()
