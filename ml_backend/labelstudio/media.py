"""Fetch a task's image the way Label Studio serves it: validated URL, allow-listed host, bounded size and time.

URL forms (as they appear in task data):

* ``/data/local-files/?d=<path relative to the document root>``: read straight from disk when the backend shares
  the disk with Label Studio (``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` set and the file there), else over HTTP;
* ``/data/upload/<project>/<file>`` (files uploaded through Label Studio) and other ``/...`` paths: HTTP from
  ``LABEL_STUDIO_URL``;
* ``http(s)://...``: fetched only from Label Studio's own scheme/host/port or a host in ``MEDIA_ALLOWED_HOSTS``
  (``host`` or ``host:port``, comma-separated; ``*`` allows every host). Everything else is refused before any
  connection is made (task data is controlled by anyone who can import tasks: an open fetcher is an SSRF hole).

Security rules (issue 9), each enforced here and tested in ``tests/labelstudio/test_media_security.py``:

* The request URL is rebuilt from parts this module validated (scheme http/https, plain host or IPv6 literal,
  numeric port, path, query), so the host we check is the host we connect to. URLs with userinfo (``@`` in the
  authority), backslashes, control characters, whitespace or ``%`` in the authority, or other schemes are refused:
  ``urllib.parse`` and urllib3 disagree about such URLs, and that disagreement leaked the API token.
* The ``Authorization`` token is added per hop, only when that hop's (scheme, host, port) equals
  ``LABEL_STUDIO_URL``'s. Redirects are followed here, never by requests: at most ``MAX_REDIRECTS``, each target
  validated and allow-listed like the original URL.
* On Label Studio's host:port only its media routes are requested (issue 16: an image URL of
  ``/api/projects/1/next/`` made the backend lock a task for 24 h with its token): ``/data/upload/<file>``,
  ``/data/local-files/?d=``, ``/storage-data/uploaded/``, ``/tasks/<id>/resolve/``, ``/projects/<id>/resolve/`` and
  their ``/presign/`` aliases (Label Studio 1.23.2's ``data_import/urls.py`` and ``io_storages/urls.py``). The path
  is decoded once and checked before any connection, for the first URL and every redirect: double encoding, ``;``
  parameters, ``.``/``..`` and empty segments, backslashes and control characters are refused; the request then
  goes to the canonical re-encoded path, so what was checked is what is sent. Other origins (``MEDIA_ALLOWED_HOSTS``)
  never get the token and are not path-restricted.
* The session ignores the environment (``trust_env = False``): no ``~/.netrc`` credentials can be attached to a
  foreign host and no proxy from ``HTTP(S)_PROXY`` sees the token; cookies are never stored or sent.
  ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` are still honoured for TLS verification.
* Error messages never contain bytes of a downloaded response (no body, no status line, no header values, no
  decoder message quoting content): a foreign server must not be able to read itself back through the backend.

Resources: a download is capped at ``MAX_DOWNLOAD_BYTES`` (Content-Length checked before the body, bytes counted
while streaming) and streamed to a temporary file, never into memory. One deadline, ``FETCH_DEADLINE_S``, covers
connecting, every read, every redirect and every retry: a watchdog shuts the socket down when it passes, so a server
trickling one byte a second is cut off too. Transient failures (connection errors, 502/503/504) are retried within
that deadline.

Cache: files that decoded as images are kept under ``MODEL_DIR/cache/media/`` keyed by the SHA-256 of the request
URL (Label Studio names uploads uniquely, and tiles do not change once imported), bounded by ``MEDIA_CACHE_BYTES``
with least-recently-used eviction (a hit touches the file's mtime). Several processes share the cache: every step
tolerates files vanishing under it. Every failure is a ``MediaError`` that says which URL and why.

Degraded disk (issue 16): when ``MODEL_DIR/cache`` cannot be written (full, read-only, not a directory) downloads are
staged in a private directory under the system temporary directory (``TMPDIR``) instead and nothing is cached;
predictions keep working. ``cache_problem(settings)`` probes the cache and says what is wrong, for ``/status`` and
``/health?details=1``.

Layout: ``media_policy`` decides which URLs may be requested and where (the security rules above, local files),
``media_transport`` fetches over HTTP (token per hop, redirects, size and time bounds), ``media_cache`` keeps the
image cache and the staging directories; this module composes them and decodes what was fetched.
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import requests

from ml_backend.imaging import ImageDecodeError, load_image
from ml_backend.labelstudio.media_cache import (
    cache_dir,
    cache_entry,
    cache_get,
    cache_problem,
    cache_put,
    fallback_dir,
    os_error_text,
    temp_dir,
)
from ml_backend.labelstudio.media_policy import (
    MediaError,
    Target,
    absolute_target,
    check_allowed,
    guard_label_studio,
    label_studio_media_path,
    resolve_local_file,
)
from ml_backend.labelstudio.media_transport import download, os_reason

__all__ = [
    "MediaError",
    "cache_dir",
    "cache_problem",
    "fetch_image",
    "fetch_image_bytes",
    "label_studio_media_path",
    "resolve_local_file",
]

log = logging.getLogger(__name__)

# Decoder messages that carry only numbers/our own words (pixel limits, layout), never content bytes.
_SAFE_DECODE_MESSAGE = re.compile(
    r"^(image is \d+x\d+ = [\d,]+ pixels|image has no pixels|unsupported image layout|"
    r"image too large to decode safely)"
)

T = TypeVar("T")


def _fetch(url: Any, settings: Any, load: Callable[[Path, str, bool], T], *, use_cache: bool) -> T:
    """Local file, cache hit or validated download, handed to ``load(path, shown, downloaded)``.

    A download enters the cache only after ``load`` accepted it; a cache entry ``load`` rejects is dropped.
    """
    if not isinstance(url, str) or not url.strip():
        raise MediaError(f"image URL must be a non-empty string, got {url!r}")
    url = url.strip()
    local = resolve_local_file(url, settings)
    if local is not None:
        return load(local, str(local), False)
    target = absolute_target(url, settings)
    shown = url if len(url) <= 300 else url[:300] + "..."
    if url.startswith("/"):
        shown = target.url if len(target.url) <= 300 else shown
    token = str(getattr(settings, "label_studio_api_key", "") or "")
    if token and token in shown:  # task data may carry it; error messages and logs never do
        shown = shown.replace(token, "<token>")
    check_allowed(target, shown, settings)
    target = guard_label_studio(target, shown, settings)
    cached = cache_entry(settings, target.url)
    if use_cache and cache_get(cached):
        try:
            return load(cached, shown, True)
        except MediaError:
            cached.unlink(missing_ok=True)  # not what we cache any more: fetch it again
    tmp, staged_in_cache = _download_staged(target, shown, settings)
    try:
        result = load(tmp, shown, True)
        if use_cache and staged_in_cache:
            cache_put(tmp, cached, settings)
        return result
    finally:
        tmp.unlink(missing_ok=True)


_warned_lock = threading.Lock()
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A degraded disk is logged once per process and reason (every prediction would repeat it), then at debug."""
    with _warned_lock:
        first = message not in _warned
        _warned.add(message)
    log.log(logging.WARNING if first else logging.DEBUG, "%s", message)


def _download_staged(target: Target, shown: str, settings: Any) -> tuple[Path, bool]:
    """(downloaded file, whether it sits beside the cache): MODEL_DIR/cache/media-tmp, else this process's
    directory under TMPDIR when the cache's disk cannot take it (full, read-only, not a directory). A full or
    read-only MODEL_DIR must cost the cache, never the prediction."""
    primary = temp_dir(settings)
    try:
        primary.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _warn_once(f"media: {primary} cannot be written ({os_error_text(exc)}): staging downloads in "
                   f"{tempfile.gettempdir()}, not caching")  # fmt: skip
    else:
        try:
            return download(target, shown, settings, primary), True
        except OSError as exc:  # e.g. ENOSPC while writing the body
            if isinstance(exc, requests.RequestException):  # a network failure (requests' errors are OSErrors)
                raise MediaError(f"cannot fetch {shown}: {os_reason(exc)}") from None
            _warn_once(f"media: writing under {primary} failed ({os_error_text(exc)}): retrying downloads in "
                       f"{tempfile.gettempdir()}")  # fmt: skip
    try:
        return download(target, shown, settings, fallback_dir()), False
    except OSError as exc:
        raise MediaError(
            f"cannot store the download of {shown}: neither {primary} nor {tempfile.gettempdir()} can be written "
            f"({os_error_text(exc)})"
        ) from None


def fetch_image(url: Any, settings: Any, *, use_cache: bool = True) -> np.ndarray:
    """Normalised float32 (H, W) image of a task URL (see the module docstring); MediaError on any failure.

    Only files that decode as images are cached. A file is recognised from its header before it is read into
    memory, so a large non-image costs disk (bounded by MAX_DOWNLOAD_BYTES), not memory.
    """
    return _fetch(url, settings, lambda p, s, d: _load_image(p, s, d, settings), use_cache=use_cache)


def _load_image(path: Path, shown: str, downloaded: bool, settings: Any) -> np.ndarray:
    _check_header(path, shown, settings.max_image_pixels)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MediaError(f"cannot read {shown}: {exc.strerror or type(exc).__name__}") from None
    try:
        return load_image(data, max_pixels=settings.max_image_pixels)
    except ImageDecodeError as exc:
        reason = str(exc)
        if downloaded and not _SAFE_DECODE_MESSAGE.match(reason):
            # Decoder messages may quote the content; the server log keeps them, the per-task error does not.
            log.warning("media: %s does not decode as an image: %r", shown, reason[:500])
            reason = "corrupt or unsupported image data"
        raise MediaError(f"cannot decode the image at {shown} ({len(data):,} bytes): {reason}") from None


def _check_header(path: Path, shown: str, max_pixels: int | None) -> None:
    """Refuse files no decoder recognises or that declare too many pixels, reading only their header.

    A large non-image (or a header declaring a gigantic image) then costs a few kilobytes of memory, not its size.
    """
    from PIL import Image

    too_many = f"raise MAX_IMAGE_PIXELS={max_pixels:,} or tile the image first" if max_pixels else ""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if not head:
            raise MediaError(f"image at {shown} is empty (0 bytes)")
        if head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return  # TIFF: tifffile checks the declared size before decompressing
        with Image.open(path) as im:
            width, height = im.size
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise MediaError(
            f"image at {shown} declares more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels, refused as a "
            f"decompression bomb ({too_many or 'MAX_IMAGE_PIXELS'})"
        ) from None
    except FileNotFoundError:
        raise MediaError(f"cannot read {shown}: it vanished") from None
    except Exception:  # Pillow plugins raise assorted errors for data that merely resembles their format
        raise MediaError(f"cannot decode the file at {shown}: not an image (format not recognised)") from None
    if max_pixels and width * height > max_pixels:
        raise MediaError(
            f"image at {shown} is {width}x{height} = {width * height:,} pixels, more than the allowed "
            f"{max_pixels:,} ({too_many})"
        )


def fetch_image_bytes(
    url: Any, settings: Any, *, use_cache: bool = True, validate: Callable[[bytes], Any] | None = None
) -> bytes:
    """The raw bytes of a task's image, with every fetch rule above; MediaError on any failure.

    ``validate(data)`` (raising on bad content) decides what may enter the cache; without it the bytes are cached as
    they are. The backend itself uses ``fetch_image``, which caches only decoded images.
    """

    def load(path: Path, shown: str, _downloaded: bool) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise MediaError(f"cannot read {shown}: {exc.strerror or type(exc).__name__}") from None
        if validate is not None:
            try:
                validate(data)
            except MediaError:
                raise
            except Exception as exc:
                raise MediaError(f"the file at {shown} failed validation ({type(exc).__name__})") from None
        return data

    return _fetch(url, settings, load, use_cache=use_cache)
