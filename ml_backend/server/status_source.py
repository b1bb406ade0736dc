"""Where the status page's data comes from: the registry (local disk), the queue state (Redis), Label Studio's counts
and this process's recent /predict errors, gathered under one deadline so the page always renders.

``StatusSource`` is what ``GET /status`` and ``GET /status/<project>`` ask (``status_page.py`` renders its answer);
``TaskErrorLog`` keeps the last per-task /predict errors of each project; ``backend_warnings`` lists backend-wide
degradations (for /status and ``/health?details=1``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from datetime import UTC, datetime
from typing import Any

from ml_backend.config import Settings
from ml_backend.labelstudio.media import cache_problem
from ml_backend.labelstudio.project_data import ProjectOpener
from ml_backend.queue import queue_state
from ml_backend.store.projects import ProjectStore
from ml_backend.store.registry import ModelRegistry, RegistryError
from ml_backend.strategies.resolve import StrategyError, project_strategy

from .status_page import collect_project_status, label_studio_counts

__all__ = ["StatusSource", "TaskErrorLog", "backend_warnings"]

log = logging.getLogger("ml_backend.server")


def backend_warnings(settings: Settings) -> list[str]:
    """Backend-wide degradations worth a team lead's attention (for /status and /health?details=1): today an image
    cache that cannot be written (predictions go on, every image is downloaded again)."""
    problem = cache_problem(settings)
    return [problem] if problem else []


class TaskErrorLog:
    """The last ``keep`` per-task /predict errors of each project, in this process (gunicorn workers keep their own):
    what the status page lists as recent errors, without a database."""

    def __init__(self, keep: int) -> None:
        self._lock = threading.Lock()
        self._keep = max(1, int(keep))
        self._by_project: dict[str, deque] = {}

    def add(self, project: str, errors: list[dict]) -> None:
        if not errors:
            return
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self._lock:
            ring = self._by_project.setdefault(str(project), deque(maxlen=self._keep))
            for err in errors:
                ring.append({"time": stamp, "task": err.get("task"), "reason": str(err.get("reason"))[:500]})

    def recent(self, project: str) -> list[dict]:
        with self._lock:
            return list(self._by_project.get(str(project), ()))


class StatusSource:
    """Gathers a status page's data: the registry (local disk), the queue state (Redis) and Label Studio's counts,
    the last two in parallel under one deadline (STATUS_LS_TIMEOUT_S) so the page always renders."""

    def __init__(self, settings: Settings, store: ProjectStore, errors: TaskErrorLog) -> None:
        self.settings, self.store, self.errors = settings, store, errors
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="status")
        # ProjectData per project over one client with the page's short timeout, no check, no retry of its own
        self._projects = ProjectOpener(settings, timeout=max(1.0, float(settings.status_ls_timeout_s)))

    def known_projects(self) -> list[str]:
        """Projects this backend knows: a folder under MODEL_DIR/projects (set up, or holding versions)."""
        root = self.store.root
        if not root.is_dir():
            return []
        return sorted((p.name for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=int)

    def _counts(self, pid: str, live: str | None) -> dict:
        return label_studio_counts(self._projects(int(pid)), live)

    def _queue(self, pid: str) -> dict:
        return queue_state(int(pid), self.settings)

    def status(self, pids: list[str]) -> dict:
        timeout = float(self.settings.status_ls_timeout_s)
        deadline = time.monotonic() + timeout
        regs, lives, jobs = {}, {}, {}
        for pid in pids:
            regs[pid] = ModelRegistry(self.settings.model_dir, pid)
            try:
                lives[pid] = regs[pid].current_version()
            except RegistryError as exc:
                lives[pid] = None
                log.warning("status of project %s: %s", pid, exc)
            jobs[(pid, "counts")] = self._pool.submit(self._counts, pid, lives[pid])
            jobs[(pid, "queue")] = self._pool.submit(self._queue, pid)
        wait_futures(list(jobs.values()), timeout=max(0.0, deadline - time.monotonic()))
        projects = []
        ls_url = self.settings.label_studio_url.rstrip("/")
        for pid in pids:
            notes: list[str] = []
            counts = self._result(jobs[(pid, "counts")], f"Label Studio ({ls_url})", timeout, notes)
            queue = self._result(jobs[(pid, "queue")], "the training queue (Redis)", timeout, notes)
            title = (counts or {}).pop("title", None)
            try:
                project = collect_project_status(
                    regs[pid], queue_state=queue, counts=counts, errors=self.errors.recent(pid), title=title,
                    label_studio_url=f"{ls_url}/projects/{pid}/data",
                )  # fmt: skip
            except Exception as exc:  # one damaged project gets a note; the others still render (issue 16)
                log.exception("status of project %s", pid)
                project = {"id": pid, "title": title, "queue": {}, "problems": [f"{type(exc).__name__}: {exc}"]}
            project["problems"] = list(project.get("problems") or []) + self._strategy_warnings(pid)
            if notes:
                project["queue"]["note"] = "; ".join(notes)
            projects.append(project)
        return {
            "title": "EM active-learning backend — status",
            "generated_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "projects": projects,
            "warnings": backend_warnings(self.settings),
        }

    def _strategy_warnings(self, pid: str) -> list[str]:
        """Why the project does not use the strategy it stored (the one lookup's warnings), shown on its section."""
        warnings: list[str] = []
        try:
            project_strategy(pid, self.settings, store=self.store, warnings=warnings)
        except StrategyError as exc:  # an invalid deployment default: /predict and the jobs fail on it too
            warnings.append(f"no strategy: {exc}")
        return warnings

    @staticmethod
    def _result(future: Any, what: str, timeout: float, notes: list[str]) -> dict | None:
        if not future.done():
            notes.append(f"{what} did not answer within {timeout:g} s (STATUS_LS_TIMEOUT_S): shown without it")
            return None
        exc = future.exception()
        if exc is not None:
            notes.append(f"{what} unavailable: {type(exc).__name__}: {str(exc)[:200]}")
            return None
        return future.result()
