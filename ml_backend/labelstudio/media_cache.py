"""The on-disk image cache of ``labelstudio.media`` and where downloads are staged.

Files that decoded as images are kept under ``MODEL_DIR/cache/media/`` keyed by the SHA-256 of the request URL,
bounded by ``MEDIA_CACHE_BYTES`` with least-recently-used eviction (a hit touches the file's mtime). Several
processes share the cache: every step tolerates files vanishing under it. Downloads are staged in
``MODEL_DIR/cache/media-tmp`` (same file system, so a finished one is renamed into the cache), or, when that cannot
be written, in a private directory under ``TMPDIR`` (``fallback_dir``); ``cache_problem`` says what is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = [
    "cache_dir",
    "cache_entry",
    "cache_get",
    "cache_problem",
    "cache_put",
    "fallback_dir",
    "os_error_text",
    "temp_dir",
]

log = logging.getLogger("ml_backend.labelstudio.media")  # the logger name the fetcher has always logged under

STALE_TEMP_S = 3600.0  # temporary downloads older than this were left by a killed process


def cache_dir(settings: Any) -> Path:
    return Path(settings.model_dir) / "cache" / "media"


def temp_dir(settings: Any) -> Path:
    """Next to the cache (same file system, so a finished download is renamed into it, not copied)."""
    return Path(settings.model_dir) / "cache" / "media-tmp"


_fallback_lock = threading.Lock()
_fallback: Path | None = None


def fallback_dir() -> Path:
    """This process's private staging directory under TMPDIR (mkdtemp: mode 0700, unpredictable name), used
    when MODEL_DIR/cache cannot be written; re-created if something removed it."""
    global _fallback
    with _fallback_lock:
        if _fallback is None or not _fallback.is_dir():
            _fallback = Path(tempfile.mkdtemp(prefix="ml-backend-media-"))
        return _fallback


def _probe_writable(directory: Path) -> None:
    """Create ``directory`` and write one byte in it (a full disk can still create empty files); OSError if not."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".probe-{uuid.uuid4().hex}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0")
            fh.flush()
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def os_error_text(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def cache_problem(settings: Any) -> str | None:
    """Why the media cache under MODEL_DIR/cache cannot be written right now, or None when it can.

    Probed on each call (cheap: one small file) rather than remembered, so every gunicorn worker answers the same
    and the warning disappears as soon as the disk is fixed.
    """
    if int(getattr(settings, "media_cache_bytes", 0) or 0) <= 0:
        return None
    where = temp_dir(settings)
    try:
        _probe_writable(where)
        _probe_writable(cache_dir(settings))
    except OSError as exc:
        return (
            f"the image cache under {Path(settings.model_dir) / 'cache'} cannot be written ({os_error_text(exc)}): "
            f"downloads are staged in {tempfile.gettempdir()} (TMPDIR) and not cached, so every prediction "
            "downloads its image again; free space or fix the permissions of MODEL_DIR"
        )
    return None


def cache_entry(settings: Any, url: str) -> Path:
    """Where the download of the (validated, canonical) request ``url`` is cached."""
    return cache_dir(settings) / hashlib.sha256(url.encode()).hexdigest()


def cache_get(path: Path) -> bool:
    """Touch a cache entry (LRU order is mtime); False when absent or evicted concurrently."""
    try:
        os.utime(path)
        return path.is_file()
    except OSError:
        return False


def cache_put(tmp: Path, path: Path, settings: Any) -> None:
    """Move a validated download into the cache and evict least recently used entries beyond MEDIA_CACHE_BYTES."""
    bound = int(getattr(settings, "media_cache_bytes", 0) or 0)
    try:
        if tmp.stat().st_size > bound:
            return  # would evict everything else and still not fit
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
    except OSError as exc:  # a full or read-only disk must not fail the prediction
        log.warning("cannot cache %s: %s", path.name, exc)
        return
    _evict(path.parent, bound, keep=path)
    _remove_stale_temps(temp_dir(settings))


def _evict(directory: Path, bound: int, keep: Path | None = None) -> None:
    entries: list[tuple[float, int, Path]] = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if entry.is_file(follow_symlinks=False):
                    entries.append((st.st_mtime, st.st_size, Path(entry.path)))
    except OSError:
        return
    total = sum(size for _, size, _ in entries)
    for _mtime, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= bound:
            break
        if keep is not None and path == keep:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass  # another process evicted it first
        except OSError:
            continue
        total -= size


def _remove_stale_temps(directory: Path) -> None:
    cutoff = time.time() - STALE_TEMP_S
    try:
        with os.scandir(directory) as it:
            for entry in it:
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                except OSError:
                    pass
    except OSError:
        pass
