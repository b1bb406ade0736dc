"""Helpers for fault tests with real processes: `rq worker` processes to kill, a restartable persistent Redis, a
Label Studio project with generated EM tiles, annotations from the ground truth, and waiting with a clear failure.

The session's Label Studio, gunicorn backend and Redis come from tests/conftest.py (shared with tests/integration).
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from fault_helpers import DENSE, TILE, TRAIN_ENV

from ml_backend.labelstudio.client import latest_annotations, list_tasks


@pytest.fixture
def start_worker(start_rq_worker, worker_env) -> Callable[..., Any]:
    """start_worker(model_dir, redis_url, **env) -> RqWorker (tests/conftest.py) with the fault tests' training
    settings; every worker is stopped at the end of the test."""

    def start(model_dir: Path, redis_url: str, **env_overrides: str) -> Any:
        return start_rq_worker(worker_env(model_dir, **{**TRAIN_ENV, "REDIS_URL": redis_url, **env_overrides}), "fault")

    return start


@dataclass
class OwnRedis:
    """A redis-server run the way production runs it (append-only file, everysec) that a test may kill."""

    port: int
    workdir: Path
    tools: Any
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill9(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def start(self) -> None:
        self.process = self.tools.start_redis(self.port, self.workdir, persist=True)


@pytest.fixture
def own_redis(redis_tools, tmp_path) -> Iterator[OwnRedis]:
    if redis_tools.find_redis_server() is None:
        pytest.skip("no redis-server binary")
    port = redis_tools.free_port()
    workdir = tmp_path / "redis"
    server = OwnRedis(port, workdir, redis_tools, redis_tools.start_redis(port, workdir, persist=True))
    yield server
    redis_tools.stop_redis(server.process)


@pytest.fixture(scope="session")
def em_stack(tmp_path_factory) -> tuple[Path, dict]:
    """A 4 x 128 x 128 EM-like TIFF stack (16 tiles of 64 x 64) and the ground truth of each tile."""
    from ml_backend.data.synthetic import generate_em_like

    base = tmp_path_factory.mktemp("faults-em")
    stack, masks = generate_em_like(4, 128, seed=41)
    tifffile.imwrite(base / "stack.tif", stack, photometric="minisblack")
    truth = {
        (z, y, x): masks[z, y : y + TILE, x : x + TILE].astype(np.int64)
        for z in range(4)
        for y in (0, TILE)
        for x in (0, TILE)
    }
    return base / "stack.tif", truth


@dataclass
class Project:
    """A Label Studio project with 16 imported tiles, connected to a backend (its webhooks go there)."""

    id: int
    task_ids: list[int]
    truth: dict

    def annotate(self, ls: Any, task_ids: list[int]) -> None:
        """Submit the ground truth of each task as a brush annotation (Label Studio posts the webhooks)."""
        from ml_backend.labelstudio.labelconfig import parse_label_config
        from ml_backend.labelstudio.rle import mask_to_results

        config = parse_label_config(DENSE)
        tasks = {int(t["id"]): t for t in list_tasks(ls, self.id, fields="task_only")}
        for tid in task_ids:
            data = tasks[tid]["data"]
            ls.annotations.create(id=tid, result=mask_to_results(self.truth[(data["slice"], data["tile_y"],
                                                                            data["tile_x"])], config))  # fmt: skip

    def annotated(self, ls: Any) -> set[int]:
        """Tasks holding a submitted annotation, as Label Studio (the source of truth) says now."""
        return set(latest_annotations(list_tasks(ls, self.id)))

    def predictions_of(self, ls: Any, version: str) -> dict[int, int]:
        """{task id: number of predictions of ``version``} over every task of the project."""
        return {
            int(t["id"]): sum(1 for p in t.get("predictions") or [] if p.get("model_version") == version)
            for t in list_tasks(ls, self.id)
        }


@pytest.fixture
def make_project(ls, label_studio, scripts, em_stack) -> Callable[[str], Project]:
    """make_project(backend_url) -> Project (fresh title each call, no cold-start retrieval)."""

    def make(backend_url: str) -> Project:
        stack, truth = em_stack
        info = scripts("setup_project").setup_project(
            ls, title=f"faults {uuid.uuid4().hex[:8]}", label_config=DENSE, backend_url=backend_url, retrieve=False
        )
        imported = scripts("import_tiles").import_tiles(
            ls, info["project"], [stack], document_root=label_studio.document_root, tile=TILE, progress=False
        )
        assert imported["created"] == 16
        return Project(int(info["project"]), sorted(imported["task_ids"]), truth)

    return make
