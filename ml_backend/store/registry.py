"""Versioned model registry per project, with atomic publication (the per-process model cache: ``store.cache``).

Layout under ``MODEL_DIR/projects/<project id>/``::

    versions/v0001-20260101T120000Z/model.pt     checkpoint (ml_backend.model.save_checkpoint, weights_only-safe)
    versions/v0001-20260101T120000Z/meta.json    version, parent, created, device, annotations, metrics, ...
    CURRENT                                       the promoted version id (one line)
    history.jsonl                                 promotions and rollbacks, appended

Why this shape: a version is written into a hidden temporary directory and renamed into ``versions/`` only when
both files are complete and fsync'ed; ``CURRENT`` is replaced with ``os.replace``. A worker killed at any moment
therefore leaves either the old current model or the new one, never a half-written one, and a leftover temporary
directory is ignored (and cleaned by ``prune``). Serving processes notice a new ``CURRENT`` by its inode/mtime
(``ModelCache``) and reload without a restart.

When the disk is full or ``MODEL_DIR`` is read-only, ``publish`` raises ``RegistryWriteError`` saying so: the
temporary directory is removed, a version that was written but could not be promoted is removed too, and the
previous version stays current and loadable (tests/faults/test_registry_faults.py, on real tmpfs mounts).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ml_backend.store.atomic import fsync_dir, write_atomic

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"^v(\d{4,})-\d{8}T\d{6}Z$")
_PROJECT_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
_STALE_TMP_S = 3600.0


class RegistryError(RuntimeError):
    """The registry is asked for something it does not hold (unknown version, dangling CURRENT pointer)."""


class RegistryWriteError(RegistryError):
    """A new version could not be stored or promoted (disk full, read-only MODEL_DIR, ...): nothing changed."""


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS}
_DENIED = {errno.EACCES, errno.EPERM}


def _write_failure_reason(exc: BaseException, where: Path) -> str:
    """Why a write under ``where`` failed, in words an operator can act on (free space included)."""
    free = ""
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(where)
        free = f"; {usage.free / 1e6:.1f} MB free of {usage.total / 1e6:.1f} MB"
    code = getattr(exc, "errno", None)
    if code in _NO_SPACE:
        return f"no space left on the disk holding {where}{free}"
    if code in _READ_ONLY:
        return f"{where} is on a read-only file system"
    if code in _DENIED:
        return f"permission denied writing under {where}"
    text = str(exc)
    if "file write failed" in text or "No space" in text:  # torch's zip writer reports ENOSPC as a RuntimeError
        return f"writing the checkpoint failed, probably no space left on the disk holding {where}{free}"
    return f"{type(exc).__name__}: {exc}{free}"


def _json_default(value: Any) -> Any:
    """numpy scalars/arrays and paths in metadata: store them as plain JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (Path, datetime)):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON-serialisable")


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class ModelRegistry:
    """Versions of one project's model under ``model_dir/projects/<project_id>``."""

    def __init__(self, model_dir: str | Path, project_id: str | int) -> None:
        pid = str(project_id)
        if not _PROJECT_RE.match(pid):
            raise ValueError(f"invalid project id {project_id!r}: expected letters, digits, '_', '-' or '.'")
        self.project_id = pid
        self.root = Path(model_dir) / "projects" / pid
        self.versions_dir = self.root / "versions"
        self.current_file = self.root / "CURRENT"
        self.history_file = self.root / "history.jsonl"

    # ---------------------------------------------------------------- reading
    def current_version(self) -> str | None:
        """The promoted version id, or None before the first promotion.

        Every way ``CURRENT`` can be broken (unreadable, not UTF-8, not a version id, a missing version) is a
        ``RegistryError`` naming the project and the fix, so callers (the status page above all) can report one
        broken project instead of failing for all.
        """
        try:
            raw = self.current_file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistryError(
                f"project {self.project_id}: CURRENT ({self.current_file}) cannot be read: {exc.strerror or exc}"
            ) from None
        try:
            version = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise RegistryError(
                f"project {self.project_id}: CURRENT ({self.current_file}) is not text ({len(raw)} bytes, not "
                "UTF-8): damaged; roll back to an existing version (ml_backend.cli versions/rollback)"
            ) from None
        if not version:
            return None
        if not VERSION_RE.match(version):
            raise RegistryError(
                f"project {self.project_id}: CURRENT holds {version[:80]!r}, which is not a version id; roll back "
                "to an existing version (ml_backend.cli versions/rollback)"
            )
        if not (self.versions_dir / version / "meta.json").is_file():
            raise RegistryError(
                f"project {self.project_id}: CURRENT points to {version!r}, which is not a complete version in "
                f"{self.versions_dir}; roll back to an existing one (ml_backend.cli versions/rollback)"
            )
        return version

    def meta(self, version: str) -> dict:
        """Metadata of one version."""
        path = self._version_dir(version) / "meta.json"
        try:
            meta = json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise RegistryError(f"project {self.project_id}: no version {version!r}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:  # damaged by hand or by a failing disk
            reason = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
            raise RegistryError(f"project {self.project_id}: {version}/meta.json is unreadable ({reason})") from None
        if not isinstance(meta, dict):
            raise RegistryError(f"project {self.project_id}: {version}/meta.json is not a JSON object")
        return meta

    def current_meta(self) -> dict | None:
        version = self.current_version()
        return None if version is None else self.meta(version)

    def load(self, version: str, map_location: Any = "cpu") -> tuple[Any, dict]:
        """(model in eval mode, meta) of one version; the checkpoint is read with torch.load(weights_only=True)."""
        from ml_backend.model import load_checkpoint  # local: model/ loads torch; the CLI reads the registry without it

        meta = self.meta(version)
        model, _extra = load_checkpoint(self._version_dir(version) / "model.pt", map_location=map_location)
        return model, meta

    def load_extra(self, version: str, name: str, map_location: Any = "cpu") -> Any:
        """One of the ``extra_models`` stored with a version (model in eval mode)."""
        from ml_backend.model import load_checkpoint  # local: model/ loads torch; the CLI reads the registry without it

        if name not in self.meta(version).get("extra_models", []):
            raise RegistryError(f"project {self.project_id}: version {version} has no extra model {name!r}")
        model, _extra = load_checkpoint(self._version_dir(version) / f"{name}.pt", map_location=map_location)
        return model

    def load_current(self, map_location: Any = "cpu") -> tuple[Any, dict] | None:
        version = self.current_version()
        return None if version is None else self.load(version, map_location)

    def versions(self) -> list[dict]:
        """Metadata of every complete version, oldest first."""
        out = []
        for name in self._version_names():
            try:
                out.append(self.meta(name))
            except RegistryError as exc:  # a hand-damaged directory should not hide the others
                log.warning("project %s: skipping unreadable version %s: %s", self.project_id, name, exc)
        return out

    def history(self) -> list[dict]:
        """Promotion/rollback events, oldest first."""
        try:
            text = self.history_file.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return []
        except OSError as exc:  # the history is a log: an unreadable one must not hide the versions
            log.warning("project %s: history unreadable: %s", self.project_id, exc)
            return []
        events = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a full disk: the rest of the history still counts
                log.warning("project %s: skipping a damaged history line: %.80r", self.project_id, line)
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    # ---------------------------------------------------------------- writing
    def publish(
        self, model: Any, meta: dict, *, promote: bool = True, extra_models: dict[str, Any] | None = None
    ) -> str:
        """Store ``model`` + ``meta`` as a new version and (by default) promote it; returns the version id.

        The version becomes visible only once complete (temporary directory renamed into ``versions/``) and is
        promoted only after that, so a crash at any point leaves the previous current version untouched.
        ``extra_models`` (e.g. the bootstrap ensemble of the ``suggestive`` strategy) are stored beside the model as
        ``<name>.pt`` and read back with ``load_extra``. A failed write (disk full, read-only ``MODEL_DIR``) raises
        ``RegistryWriteError`` after removing everything this call wrote; the current version is unchanged.
        """
        try:
            return self._publish(model, meta, promote=promote, extra_models=extra_models)
        except RegistryError:
            raise
        except (OSError, RuntimeError) as exc:
            previous = self._current_or_none()
            raise RegistryWriteError(
                f"project {self.project_id}: could not publish a new model version: "
                f"{_write_failure_reason(exc, self.root if self.root.exists() else self.root.parent)}; "
                f"the current version ({previous or 'none'}) stays current"
            ) from exc

    def _publish(self, model: Any, meta: dict, *, promote: bool, extra_models: dict[str, Any] | None) -> str:
        from ml_backend.model import save_checkpoint  # local: model/ loads torch; the CLI reads the registry without it

        self.versions_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            parent = self._current_or_none()
            seq = max((self._seq(n) for n in self._version_names()), default=0) + 1
            created = _utc_now()
            version = f"v{seq:04d}-{created:%Y%m%dT%H%M%SZ}"
            full_meta = {"parent": parent, **meta, "version": version, "created": created.isoformat()}
            full_meta.setdefault("arch", type(model).__name__)
            full_meta.setdefault("hparams", dict(getattr(model, "hparams", {})))
            extras = dict(extra_models or {})
            for name in extras:
                if not re.match(r"^[A-Za-z0-9_-]+$", name) or name == "model":
                    raise ValueError(f"invalid extra model name {name!r}")
            full_meta["extra_models"] = sorted(extras)
            meta_bytes = json.dumps(full_meta, indent=2, sort_keys=True, default=_json_default).encode()
            tmp_dir = self.versions_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
            tmp_dir.mkdir()
            try:
                save_checkpoint(model, tmp_dir / "model.pt", extra={"version": version, "project": self.project_id})
                for name, extra_model in extras.items():
                    save_checkpoint(extra_model, tmp_dir / f"{name}.pt", extra={"version": version, "name": name})
                with open(tmp_dir / "meta.json", "wb") as fh:
                    fh.write(meta_bytes)
                    fh.flush()
                    os.fsync(fh.fileno())
                fsync_dir(tmp_dir)
                os.rename(tmp_dir, self.versions_dir / version)  # atomic: the version appears complete or not at all
                fsync_dir(self.versions_dir)
            except BaseException:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                raise
            log.info("project %s: published %s (parent %s)", self.project_id, version, parent)
            if promote:
                try:
                    self._promote_locked(version, action="promote")
                except BaseException:
                    if self._current_or_none() != version:  # never promoted: do not leave an orphan behind
                        self._discard(version)
                    raise
        return version

    def promote(self, version: str) -> None:
        """Make ``version`` the current model (atomic pointer replacement)."""
        with self._lock():
            self._promote_locked(version, action="promote")

    def rollback(self, version: str) -> None:
        """Make an older (or any existing) version current again; recorded as a rollback in the history."""
        with self._lock():
            self._promote_locked(version, action="rollback")

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions, never the current one; returns the deleted version ids.

        Also removes temporary directories left by killed writers (older than an hour, so a concurrent publish on
        another process is never disturbed).
        """
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        removed: list[str] = []
        with self._lock():
            current = self._current_or_none()
            names = self._version_names()
            doomed = [n for n in names[: max(0, len(names) - keep)] if n != current]
            for name in doomed:
                src = self.versions_dir / name
                trash = self.versions_dir / f".trash-{name}-{uuid.uuid4().hex[:8]}"
                os.rename(src, trash)  # disappears atomically from versions(), then the slow delete
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(name)
            now = time.time()
            for leftover in self.versions_dir.glob(".t*-*") if self.versions_dir.is_dir() else []:
                is_trash = leftover.name.startswith(".trash-")
                if leftover.is_dir() and (is_trash or now - leftover.stat().st_mtime > _STALE_TMP_S):
                    shutil.rmtree(leftover, ignore_errors=True)
        if removed:
            log.info("project %s: pruned %d old version(s): %s", self.project_id, len(removed), ", ".join(removed))
        return removed

    # ---------------------------------------------------------------- internals
    def _version_dir(self, version: str) -> Path:
        if not VERSION_RE.match(version):
            raise RegistryError(f"project {self.project_id}: {version!r} is not a version id (e.g. v0001-...Z)")
        return self.versions_dir / version

    def _version_names(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        names = [p.name for p in self.versions_dir.iterdir() if VERSION_RE.match(p.name) and p.is_dir()]
        return sorted(names, key=self._seq)

    @staticmethod
    def _seq(name: str) -> int:
        match = VERSION_RE.match(name)
        return int(match.group(1)) if match else 0

    def _current_or_none(self) -> str | None:
        try:
            return self.current_version()
        except RegistryError as exc:
            log.warning("%s", exc)
            return None

    def _promote_locked(self, version: str, *, action: str) -> None:
        vdir = self._version_dir(version)
        if not ((vdir / "model.pt").is_file() and (vdir / "meta.json").is_file()):
            known = ", ".join(self._version_names()) or "none"
            raise RegistryError(f"project {self.project_id}: no complete version {version!r} (known: {known})")
        previous = self._current_or_none()
        write_atomic(self.current_file, f"{version}\n", durable=True)
        event = {"time": _utc_now().isoformat(), "action": action, "version": version, "previous": previous}
        try:  # CURRENT is the truth; the history is a log, and a full disk must not undo a done promotion
            with open(self.history_file, "a") as fh:
                fh.write(json.dumps(event) + "\n")
        except OSError as exc:
            log.error("project %s: %s %s done, but the history could not be appended: %s",
                      self.project_id, action, version, _write_failure_reason(exc, self.root))  # fmt: skip
        log.info("project %s: %s %s -> %s", self.project_id, action, previous, version)

    def _discard(self, version: str) -> None:
        """Remove a published-but-never-promoted version (best effort: its space is what a full disk needs)."""
        vdir = self._version_dir(version)
        trash = self.versions_dir / f".trash-{version}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(vdir, trash)
        except OSError as exc:
            log.error("project %s: could not remove the unpromoted version %s: %s", self.project_id, version, exc)
            return
        shutil.rmtree(trash, ignore_errors=True)
        log.warning("project %s: removed %s, which could not be promoted", self.project_id, version)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise writers on this machine (several workers publishing, or a CLI rollback during a publish)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".registry.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
