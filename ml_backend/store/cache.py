"""Per-process cache of each project's current model (serving processes), reloaded when ``CURRENT`` changes."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from ml_backend.config import torch_device
from ml_backend.store.registry import ModelRegistry

log = logging.getLogger(__name__)


class ModelCache:
    """Per-process cache of each project's current model, reloaded when ``CURRENT`` changes.

    ``get`` costs one ``stat`` of the pointer file when nothing changed (inode + mtime + size; ``os.replace``
    always makes a new inode), so serving code can call it on every request and pick up a new version without a
    restart. Models are loaded once per version and shared by all threads of the process (inference only).
    """

    def __init__(self, model_dir: str | Path, device: Any = None) -> None:
        self.model_dir = Path(model_dir)
        self.device = device
        self._entries: dict[str, tuple[tuple[int, int, int], str, Any, dict]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.loads = 0  # how many checkpoints were read (for tests and /metrics)

    def registry(self, project_id: str | int) -> ModelRegistry:
        return ModelRegistry(self.model_dir, project_id)

    def get(self, project_id: str | int) -> tuple[Any, dict] | None:
        """(model, meta) of the project's current version, or None when it has no trained version yet."""
        pid = str(project_id)
        reg = self.registry(pid)
        try:
            st = os.stat(reg.current_file)
        except FileNotFoundError:
            self._entries.pop(pid, None)
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        entry = self._entries.get(pid)
        if entry is not None and entry[0] == key:
            return entry[2], entry[3]
        with self._project_lock(pid):
            entry = self._entries.get(pid)
            if entry is not None and entry[0] == key:
                return entry[2], entry[3]
            version = reg.current_version()
            if version is None:
                self._entries.pop(pid, None)
                return None
            if entry is not None and entry[1] == version:  # touched but same version: keep the loaded model
                self._entries[pid] = (key, version, entry[2], entry[3])
                return entry[2], entry[3]

            device = self.device if self.device is not None else torch_device("auto")
            model, meta = reg.load(version, map_location=device)
            self.loads += 1
            log.info("project %s: loaded model %s on %s", pid, version, device)
            self._entries[pid] = (key, version, model, meta)
            return model, meta

    def current_version(self, project_id: str | int) -> str | None:
        got = self.get(project_id)
        return None if got is None else got[1]["version"]

    def invalidate(self, project_id: str | int | None = None) -> None:
        """Forget one project's model (or all), e.g. after deleting a project."""
        if project_id is None:
            self._entries.clear()
        else:
            self._entries.pop(str(project_id), None)

    def _project_lock(self, pid: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(pid, threading.Lock())
