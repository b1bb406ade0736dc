"""Fetch a task's image the way Label Studio serves it, with the API token, cached on disk.

URL forms (as they appear in task data):

* ``/data/local-files/?d=<path relative to the document root>``: read straight from disk when the backend shares
  the disk with Label Studio (``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` set and the file there), else over HTTP;
* ``/data/upload/<project>/<file>`` (files uploaded through Label Studio) and other ``/...`` paths: HTTP from
  ``LABEL_STUDIO_URL``;
* ``http(s)://...``: fetched as is; the API token is sent only to the Label Studio host, never to third parties.

HTTP responses are cached under ``MODEL_DIR/cache/media/`` keyed by the SHA-256 of the absolute URL (Label Studio
names uploads uniquely, and tiles do not change once imported), so retraining and re-scoring do not download every
tile again. Every failure is a ``MediaError`` that says which URL and why.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urljoin, urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from ml_backend.atomic import write_atomic

__all__ = ["MediaError", "cache_dir", "fetch_image_bytes", "resolve_local_file"]

log = logging.getLogger(__name__)

LOCAL_FILES_PREFIX = "/data/local-files/"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
MIN_DOWNLOAD_LIMIT = 64 * 1024 * 1024

_session_lock = threading.Lock()
_sessions: dict[int, requests.Session] = {}


class MediaError(ValueError):
    """A task's image cannot be fetched (unknown URL form, not found, refused, too large, unreachable)."""


def cache_dir(settings: Any) -> Path:
    return Path(settings.model_dir) / "cache" / "media"


def _session() -> requests.Session:
    """One pooled session per thread (requests sessions are not guaranteed thread-safe), retrying transient errors."""
    key = threading.get_ident()
    with _session_lock:
        session = _sessions.get(key)
        if session is None:
            session = requests.Session()
            retry = Retry(
                total=3, connect=3, read=2, backoff_factor=0.3, status_forcelist=(502, 503, 504),
                allowed_methods=frozenset({"GET"}),
            )  # fmt: skip
            session.mount("http://", HTTPAdapter(max_retries=retry))
            session.mount("https://", HTTPAdapter(max_retries=retry))
            _sessions[key] = session
        return session


def resolve_local_file(url: str, settings: Any) -> Path | None:
    """The file behind a /data/local-files/?d= URL under the local document root, when it exists there.

    Paths that escape the document root (``..``, symlinks outside it) are refused: the ``d`` parameter comes from
    task data, which anyone with import rights controls.
    """
    root_setting = getattr(settings, "local_files_root", "") or ""
    parsed = urlparse(url)
    if not root_setting or LOCAL_FILES_PREFIX.rstrip("/") not in parsed.path:
        return None
    rel = (parse_qs(parsed.query).get("d") or [""])[0]
    if not rel:
        raise MediaError(f"local-files URL {url!r} has no ?d=<path> parameter")
    root = Path(root_setting).expanduser().resolve()
    path = (root / unquote(rel).lstrip("/")).resolve()
    if path != root and root not in path.parents:
        raise MediaError(f"local-files path {rel!r} points outside the document root {root}")
    return path if path.is_file() else None


def _absolute(url: str, settings: Any) -> str:
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        return url
    if parsed.scheme:
        raise MediaError(
            f"cannot fetch {url!r}: {parsed.scheme}:// URLs are resolved by Label Studio's cloud storage; import "
            "the tasks with presigned/http URLs or through a local storage"
        )
    if not url.startswith("/"):
        raise MediaError(f"cannot fetch {url!r}: expected /data/local-files/?d=..., /data/upload/... or http(s)://")
    base = str(getattr(settings, "label_studio_url", "") or "")
    if not base:
        raise MediaError(f"cannot fetch {url!r}: LABEL_STUDIO_URL is not set")
    return urljoin(base.rstrip("/") + "/", url.lstrip("/"))


def _same_host(a: str, b: str) -> bool:
    pa, pb = urlparse(a), urlparse(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def _download_limit(settings: Any) -> int:
    pixels = int(getattr(settings, "max_image_pixels", 0) or 0)
    return max(MIN_DOWNLOAD_LIMIT, pixels * 8)  # 16-bit RGBA uncompressed, the worst case worth accepting


def _download(url: str, settings: Any) -> bytes:
    headers = {}
    token = getattr(settings, "label_studio_api_key", "") or ""
    if token and _same_host(url, str(getattr(settings, "label_studio_url", ""))):
        headers["Authorization"] = f"Token {token}"
    limit = _download_limit(settings)
    try:
        with _session().get(url, headers=headers, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S), stream=True) as resp:
            if resp.status_code == 404:
                raise MediaError(f"image not found (404) at {url}")
            if resp.status_code in (401, 403):
                raise MediaError(
                    f"Label Studio refused the image at {url} ({resp.status_code}): check LABEL_STUDIO_API_KEY"
                )
            if resp.status_code >= 400:
                raise MediaError(f"fetching {url} failed with HTTP {resp.status_code}")
            chunks, total = [], 0
            for chunk in resp.iter_content(chunk_size=1 << 20):
                total += len(chunk)
                if total > limit:
                    raise MediaError(f"image at {url} is larger than {limit:,} bytes (see MAX_IMAGE_PIXELS)")
                chunks.append(chunk)
    except requests.RequestException as exc:
        raise MediaError(f"cannot fetch {url}: {type(exc).__name__}: {exc}") from exc
    data = b"".join(chunks)
    if not data:
        raise MediaError(f"image at {url} is empty (0 bytes)")
    return data


def fetch_image_bytes(url: str, settings: Any, *, use_cache: bool = True) -> bytes:
    """The raw bytes of a task's image (see the module docstring for URL forms); MediaError on any failure."""
    if not isinstance(url, str) or not url.strip():
        raise MediaError(f"image URL must be a non-empty string, got {url!r}")
    url = url.strip()
    local = resolve_local_file(url, settings)
    if local is not None:
        try:
            return local.read_bytes()
        except OSError as exc:
            raise MediaError(f"cannot read {local}: {exc}") from exc
    absolute = _absolute(url, settings)
    cached = cache_dir(settings) / hashlib.sha256(absolute.encode()).hexdigest()
    if use_cache and cached.is_file():
        try:
            return cached.read_bytes()
        except OSError:  # evicted concurrently: fetch again
            pass
    data = _download(absolute, settings)
    if use_cache:
        try:
            write_atomic(cached, data)
        except OSError as exc:  # a full disk must not fail the prediction
            log.warning("cannot cache %s in %s: %s", absolute, cached, exc)
    return data
