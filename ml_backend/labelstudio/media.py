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
"""

from __future__ import annotations

import contextlib
import hashlib
import http.cookiejar
import ipaddress
import logging
import os
import re
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, unquote, unquote_to_bytes, urljoin, urlparse

import numpy as np
import requests
from requests.adapters import HTTPAdapter
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util import parse_url

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

LOCAL_FILES_PREFIX = "/data/local-files/"
CONNECT_TIMEOUT_S = 5.0
MAX_REDIRECTS = 5
MAX_ATTEMPTS = 3  # per hop, for connection errors and 502/503/504, all within FETCH_DEADLINE_S
CHUNK_BYTES = 64 * 1024
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
TRANSIENT_CODES = frozenset({502, 503, 504})
STALE_TEMP_S = 3600.0  # temporary downloads older than this were left by a killed process

_HOST_RE = re.compile(r"[a-z0-9_.-]+")
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Decoder messages that carry only numbers/our own words (pixel limits, layout), never content bytes.
_SAFE_DECODE_MESSAGE = re.compile(
    r"^(image is \d+x\d+ = [\d,]+ pixels|image has no pixels|unsupported image layout|"
    r"image too large to decode safely)"
)

# Label Studio 1.23.2's routes that serve task media, matched against the decoded path below LABEL_STUDIO_URL's:
# data_import/urls.py (data/upload/<path:filename>, storage-data/uploaded/?filepath=) and io_storages/urls.py
# (data/local-files/?d=, tasks|projects/<int>/resolve|presign/?fileuri=). Nothing else on Label Studio is fetched.
_MEDIA_PATHS = (
    re.compile(r"/data/upload/.+"),
    re.compile(r"/data/local-files/?"),
    re.compile(r"/storage-data/uploaded/"),
    re.compile(r"/(?:tasks|projects)/[0-9]+/(?:resolve|presign)/"),
)
MEDIA_PATHS_TEXT = (
    "/data/upload/<file>, /data/local-files/?d=<path>, /storage-data/uploaded/?filepath=, "
    "/tasks/<id>/resolve/, /projects/<id>/resolve/ (or /presign/)"
)
_PCT_RE = re.compile(r"%[0-9A-Fa-f]{2}")
_PATH_SAFE = "/-._~!$&'()*+,=:@"  # RFC 3986 pchar without ';' (refused) and '%' (re-encoded)

T = TypeVar("T")


class MediaError(ValueError):
    """A task's image cannot be fetched (unknown URL form, not allowed, not found, refused, too large, too slow)."""


def cache_dir(settings: Any) -> Path:
    return Path(settings.model_dir) / "cache" / "media"


def _temp_dir(settings: Any) -> Path:
    """Next to the cache (same file system, so a finished download is renamed into it, not copied)."""
    return Path(settings.model_dir) / "cache" / "media-tmp"


_fallback_lock = threading.Lock()
_fallback: Path | None = None


def _fallback_dir() -> Path:
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


def _os_error_text(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def cache_problem(settings: Any) -> str | None:
    """Why the media cache under MODEL_DIR/cache cannot be written right now, or None when it can.

    Probed on each call (cheap: one small file) rather than remembered, so every gunicorn worker answers the same
    and the warning disappears as soon as the disk is fixed.
    """
    if int(getattr(settings, "media_cache_bytes", 0) or 0) <= 0:
        return None
    where = _temp_dir(settings)
    try:
        _probe_writable(where)
        _probe_writable(cache_dir(settings))
    except OSError as exc:
        return (
            f"the image cache under {Path(settings.model_dir) / 'cache'} cannot be written ({_os_error_text(exc)}): "
            f"downloads are staged in {tempfile.gettempdir()} (TMPDIR) and not cached, so every prediction "
            "downloads its image again; free space or fix the permissions of MODEL_DIR"
        )
    return None


# ---------------------------------------------------------------------------------------------- URL validation
@dataclass(frozen=True)
class Target:
    """A validated http(s) destination; ``url`` is rebuilt from these parts and is what requests receives."""

    scheme: str
    host: str  # lower-case name or IP; IPv6 without brackets
    port: int
    path: str  # path + "?query", percent-encoded, starts with "/"

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.path}"


def parse_target(url: str, what: str = "URL") -> Target:
    """Validate an absolute http(s) URL strictly and split it into the parts the connection will use.

    Refuses what parsers disagree about (userinfo, backslashes, control characters, ``%`` or whitespace in the
    authority) instead of guessing; non-ASCII or spaces in the path/query are percent-encoded (Label Studio's
    local-files URLs carry file names verbatim).
    """
    if _CONTROL_RE.search(url):
        raise MediaError(f"{what} {url!r} contains control characters")
    if "\\" in url:
        raise MediaError(f"{what} {url!r} contains a backslash (ambiguous between URL parsers; refused)")
    m = _SCHEME_RE.match(url)
    if not m:
        raise MediaError(f"{what} {url!r} is not an absolute http(s) URL")
    scheme = m.group(1).lower()
    if scheme not in _DEFAULT_PORTS:
        raise MediaError(f"{what} {url!r}: {scheme}: URLs are not fetched (only http and https)")
    rest = url[m.end() :]
    if not rest.startswith("//"):
        raise MediaError(f"{what} {url!r} has no //host part")
    rest = rest[2:]
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        raise MediaError(f"{what} {url!r} contains user credentials (user@host); refused")
    if "%" in authority or any(ch.isspace() for ch in authority) or not authority.isascii():
        raise MediaError(f"{what} {url!r} has an invalid host part (encoded, non-ASCII or blank characters)")
    host, port_text = _split_authority(authority, url, what)
    if port_text is None or port_text == "":
        port = _DEFAULT_PORTS[scheme]
    elif port_text.isdigit() and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise MediaError(f"{what} {url!r} has an invalid port")
    tail = tail.split("#", 1)[0]  # the fragment is never sent
    path = quote(tail, safe="/?&=:;@!$'()*+,~%-._") if tail else "/"
    if not path.startswith("/"):
        path = "/" + path
    target = Target(scheme, host, port, path)
    # Defence in depth: the parser requests/urllib3 will use must see exactly the destination we validated.
    parsed = parse_url(target.url)
    seen = (parsed.scheme, (parsed.host or "").strip("[]").lower(), parsed.port)
    if parsed.auth or seen != (scheme, host, port):
        raise MediaError(f"{what} {url!r} is ambiguous between URL parsers; refused")
    return target


def _split_authority(authority: str, url: str, what: str) -> tuple[str, str | None]:
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise MediaError(f"{what} {url!r} has an unterminated IPv6 address")
        literal, after = authority[1:close], authority[close + 1 :]
        try:
            host = str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise MediaError(f"{what} {url!r} has an invalid IPv6 address") from None
        if after and not after.startswith(":"):
            raise MediaError(f"{what} {url!r} has an invalid host part")
        return host, after[1:] if after else None
    host, sep, port = authority.partition(":")
    host = host.lower()
    if not host or not _HOST_RE.fullmatch(host) or ":" in port:
        raise MediaError(f"{what} {url!r} has an invalid host part")
    return host, port if sep else None


def _label_studio(settings: Any) -> Target | None:
    base = str(getattr(settings, "label_studio_url", "") or "").strip()
    if not base:
        return None
    return parse_target(base, "LABEL_STUDIO_URL")


def _absolute(url: str, settings: Any) -> Target:
    """The validated destination of a task URL: absolute http(s), or a ``/...`` path under LABEL_STUDIO_URL."""
    m = _SCHEME_RE.match(url)
    scheme = m.group(1).lower() if m else ""
    if scheme in _DEFAULT_PORTS:
        return parse_target(url)
    if scheme in ("s3", "gs", "gcs", "azure-blob"):
        raise MediaError(
            f"cannot fetch {url!r}: {scheme}:// URLs are resolved by Label Studio's cloud storage; import "
            "the tasks with presigned/http URLs or through a local storage"
        )
    if len(scheme) > 1:  # one letter is a Windows drive: reported below as not a URL
        raise MediaError(f"cannot fetch {url!r}: {scheme}: URLs are not fetched (only http and https)")
    if not url.startswith("/"):
        raise MediaError(f"cannot fetch {url!r}: expected /data/local-files/?d=..., /data/upload/... or http(s)://")
    base = _label_studio(settings)
    if base is None:
        raise MediaError(f"cannot fetch {url!r}: LABEL_STUDIO_URL is not set")
    # Plain concatenation (not urljoin): "/http://x" stays a path on Label Studio, it never becomes another host.
    prefix = base.path.split("?", 1)[0].rstrip("/")
    return parse_target(f"{base.scheme}://{base.netloc}{prefix}/{url.lstrip('/')}")


def _allowed(target: Target, settings: Any) -> bool:
    """Label Studio's own host:port, or a MEDIA_ALLOWED_HOSTS entry (``host`` = any port, ``host:port``, ``*``)."""
    ls = _label_studio(settings)
    if ls is not None and (ls.host, ls.port) == (target.host, target.port):
        return True
    for entry in str(getattr(settings, "media_allowed_hosts", "") or "").split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if entry.startswith("["):
            literal, _, port = entry[1:].partition("]")
            port = port.lstrip(":")
            try:
                host = str(ipaddress.IPv6Address(literal))
            except ValueError:
                continue
        else:
            host, _, port = entry.partition(":")
        if host == target.host and (not port or (port.isdigit() and int(port) == target.port)):
            return True
    return False


def _check_allowed(target: Target, shown: str, settings: Any, *, redirect: bool = False) -> None:
    if _allowed(target, settings):
        return
    where = "redirected to a host" if redirect else f"host {target.netloc}"
    raise MediaError(
        f"cannot fetch {shown}: {where} is not Label Studio's and not in MEDIA_ALLOWED_HOSTS "
        "(comma-separated host or host:port entries, '*' for any host)"
    )


def _is_label_studio(target: Target, settings: Any) -> bool:
    """Same host:port as LABEL_STUDIO_URL (any scheme): where the token may go, so where the path rule applies."""
    ls = _label_studio(settings)
    return ls is not None and (ls.host, ls.port) == (target.host, target.port)


def label_studio_media_path(target: Target, settings: Any) -> Target:
    """``target`` with its path in canonical form when it is one of Label Studio's media routes; MediaError saying
    why otherwise (the message names the decoded path, never the token).

    The path is percent-decoded once (as Django does before routing), then refused when decoding leaves another
    escape (double encoding), or when it holds ``;`` parameters, ``.``/``..`` or empty (``//``) segments, backslashes
    or control characters: proxies and servers disagree about those, so they could route a path we checked as media
    somewhere else. The result is re-encoded from the decoded form, so what was checked is what is requested.
    """
    raw, sep, query = target.path.partition("?")
    try:
        path = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise MediaError("its path is not valid UTF-8 once percent-decoded") from None
    if _PCT_RE.search(path):
        raise MediaError(f"its path {path[:200]!r} is percent-encoded twice")
    if _CONTROL_RE.search(path) or "\\" in path:
        raise MediaError("its path holds control characters or a backslash once percent-decoded")
    if ";" in path:
        raise MediaError(f"its path {path[:200]!r} holds ';' parameters")
    segments = path.split("/")[1:]
    if any(seg in (".", "..") for seg in segments) or any(seg == "" for seg in segments[:-1]):
        raise MediaError(f"its path {path[:200]!r} holds '.', '..' or empty segments")
    ls = _label_studio(settings)
    prefix = ls.path.split("?", 1)[0].rstrip("/") if ls is not None else ""
    relative = path[len(prefix) :] if prefix and path.startswith(prefix + "/") else path
    if not any(rule.fullmatch(relative) for rule in _MEDIA_PATHS):
        raise MediaError(f"{path[:200]!r} is not one of Label Studio's media paths ({MEDIA_PATHS_TEXT})")
    canonical = quote(path, safe=_PATH_SAFE) + (f"?{query}" if sep else "")
    return Target(target.scheme, target.host, target.port, canonical)


def _guard_label_studio(target: Target, shown: str, settings: Any) -> Target:
    """The first hop: a Label Studio URL is reduced to its canonical media path or refused before connecting."""
    if not _is_label_studio(target, settings):
        return target
    try:
        return label_studio_media_path(target, settings)
    except MediaError as exc:
        raise MediaError(
            f"cannot fetch {shown} from Label Studio: {exc}; refused before connecting, so the backend's token "
            "never reaches Label Studio's API"
        ) from None


# ------------------------------------------------------------------------------------------- deadline watchdog
class _Watch:
    """Shuts down every socket of one fetch when its deadline passes, waking any blocked connect/recv.

    Socket timeouts bound one recv, not a whole read: a server trickling a byte per second never trips them.
    """

    def __init__(self, deadline: float) -> None:
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._done = False
        self.expired = False
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def add(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            if self._done:
                return
            self._socks.append(sock)
            if self.expired:
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            for sock in self._socks:
                _shutdown(sock)

    def close(self) -> None:
        with self._lock:
            self._done = True
            self._socks.clear()
        self._timer.cancel()


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


_tls = threading.local()


def _watch_socket(sock: socket.socket | None) -> None:
    watch = getattr(_tls, "watch", None)
    if watch is not None:
        watch.add(sock)


class _Watched:
    """Mixin: registers the connection's socket with the current fetch's watchdog (new and reused pooled ones)."""

    sock: socket.socket | None

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        _watch_socket(sock)
        return sock

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        _watch_socket(self.sock)
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _Adapter(HTTPAdapter):
    """No urllib3 retries or redirects (both are done here, inside the deadline), watched connections."""

    def __init__(self) -> None:
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


_session_lock = threading.Lock()
_sessions: dict[int, requests.Session] = {}


def _session() -> requests.Session:
    """One pooled session per thread (requests sessions are not guaranteed thread-safe).

    ``trust_env = False``: requests would otherwise attach ``~/.netrc`` credentials for whatever host a task names
    and route through ``HTTP(S)_PROXY`` (a proxy would see the token). Cookies are refused: Label Studio's cookies
    are scoped by host, not port, and would otherwise reach an allow-listed service on the same host.
    """
    key = threading.get_ident()
    with _session_lock:
        session = _sessions.get(key)
        if session is None:
            session = requests.Session()
            session.trust_env = False
            session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
            session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            session.mount("http://", _Adapter())
            session.mount("https://", _Adapter())
            _sessions[key] = session
        return session


# ------------------------------------------------------------------------------------------------ downloading
class _Transient(Exception):
    """A failure worth retrying (connection error, 502/503/504); its message is safe to show."""


def _os_reason(exc: BaseException) -> str:
    """The operating system's words for a connection failure (never text received from the server)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLError):
            return f"TLS error ({e.reason or type(e).__name__})"  # an OpenSSL constant, e.g. CERTIFICATE_VERIFY_FAILED
        if isinstance(e, OSError) and type(e).__module__ in ("builtins", "socket") and e.errno is not None:
            return e.strerror or (os.strerror(e.errno) if isinstance(e.errno, int) else type(e).__name__)
        linked = [e.__cause__, e.__context__, getattr(e, "reason", None), *getattr(e, "args", ())]
        stack.extend(x for x in linked if isinstance(x, BaseException))
    return type(exc).__name__


def _deadline_error(shown: str, settings: Any) -> MediaError:
    return MediaError(f"cannot fetch {shown}: no complete answer within FETCH_DEADLINE_S={settings.fetch_deadline_s}s")


def _download(first: Target, shown: str, settings: Any, dest_dir: Path) -> Path:
    """Follow validated redirects and stream the final body into a new temporary file in ``dest_dir``."""
    deadline = time.monotonic() + float(settings.fetch_deadline_s)
    ls = _label_studio(settings)
    token = str(getattr(settings, "label_studio_api_key", "") or "")
    limit = int(settings.max_download_bytes)
    watch = _Watch(deadline)
    _tls.watch = watch
    try:
        target = first
        for _hop in range(MAX_REDIRECTS + 1):
            headers = {"Accept-Encoding": "identity"}
            trusted = ls is not None and target.origin == ls.origin
            if token and trusted:
                headers["Authorization"] = f"Token {token}"
            resp = _get(target, headers, shown, deadline, settings, watch)
            try:
                if resp.status_code in REDIRECT_CODES:
                    target = _redirect_target(resp, target, shown, trusted, settings)
                    continue
                _check_status(resp, shown, trusted)
                return _stream_to_file(resp, shown, limit, deadline, settings, watch, dest_dir)
            finally:
                resp.close()
        raise MediaError(f"cannot fetch {shown}: more than {MAX_REDIRECTS} redirects")
    finally:
        _tls.watch = None
        watch.close()


def _get(target: Target, headers: dict, shown: str, deadline: float, settings: Any, watch: _Watch) -> requests.Response:
    """One GET with retries of transient failures, all inside the deadline (one tenacity policy)."""

    def stop_at_deadline(state: Any) -> bool:
        return time.monotonic() + float(state.upcoming_sleep or 0.0) >= deadline

    retrying = Retrying(
        retry=retry_if_exception_type(_Transient),
        stop=stop_after_attempt(MAX_ATTEMPTS) | stop_at_deadline,
        wait=wait_exponential(multiplier=0.25, max=2.0),
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or watch.expired:
                    raise _deadline_error(shown, settings)
                try:
                    resp = _session().get(
                        target.url, headers=headers, stream=True, allow_redirects=False,
                        timeout=(min(CONNECT_TIMEOUT_S, remaining), remaining),
                    )  # fmt: skip
                except requests.RequestException as exc:
                    if time.monotonic() >= deadline or watch.expired:
                        raise _deadline_error(shown, settings) from None
                    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
                        raise _Transient(f"cannot fetch {shown}: {_os_reason(exc)}") from None
                    raise MediaError(f"cannot fetch {shown}: {type(exc).__name__}") from None
                if resp.status_code in TRANSIENT_CODES:
                    resp.close()
                    raise _Transient(f"fetching {shown} failed with HTTP {resp.status_code} (after retries)")
                return resp
    except _Transient as exc:
        raise MediaError(str(exc)) from None
    raise AssertionError("unreachable")  # pragma: no cover - Retrying either returns or raises


def _redirect_target(resp: requests.Response, current: Target, shown: str, trusted: bool, settings: Any) -> Target:
    location = resp.headers.get("Location")
    if not location:
        raise MediaError(f"cannot fetch {shown}: redirect ({resp.status_code}) without a Location")
    try:
        # urljoin only resolves a relative Location against the URL we built; the result is validated strictly.
        nxt = parse_target(urljoin(current.url, location.strip()), "redirect target")
    except MediaError:
        log.warning("media: %s redirected to an invalid or non-http(s) URL %r", shown, location[:300])
        raise MediaError(f"cannot fetch {shown}: redirected to an invalid or non-http(s) URL; refused") from None
    if not _allowed(nxt, settings):
        log.warning("media: %s redirected to %s, not in MEDIA_ALLOWED_HOSTS", shown, nxt.netloc)
        # Name the host only when Label Studio sent the redirect (e.g. to cloud storage): foreign bytes never echo.
        where = f"{nxt.netloc}, a host" if trusted else "a host"
        raise MediaError(
            f"cannot fetch {shown}: redirected to {where} that is not Label Studio's and not in MEDIA_ALLOWED_HOSTS "
            "(comma-separated host or host:port entries, '*' for any host)"
        )
    if _is_label_studio(nxt, settings):
        try:
            return label_studio_media_path(nxt, settings)
        except MediaError as exc:
            log.warning("media: %s redirected to Label Studio outside its media paths: %s", shown, exc)
            raise MediaError(
                f"cannot fetch {shown}: redirected to a Label Studio path that is not a media path "
                f"({MEDIA_PATHS_TEXT}); refused before connecting"
            ) from None
    return nxt


def _check_status(resp: requests.Response, shown: str, trusted: bool) -> None:
    code = resp.status_code
    if code == 404:
        raise MediaError(f"image not found (404) at {shown}")
    if code in (401, 403):
        if trusted:
            raise MediaError(f"Label Studio refused the image at {shown} ({code}): check LABEL_STUDIO_API_KEY")
        raise MediaError(f"the server refused the image at {shown} ({code})")
    if not 200 <= code < 300:
        raise MediaError(f"fetching {shown} failed with HTTP {code}")


def _stream_to_file(
    resp: requests.Response, shown: str, limit: int, deadline: float, settings: Any, watch: _Watch, dest_dir: Path
) -> Path:
    too_large = MediaError(f"image at {shown} is larger than MAX_DOWNLOAD_BYTES={limit:,} bytes")
    declared = resp.headers.get("Content-Length", "")
    if declared.strip().isdigit() and int(declared) > limit:
        raise too_large  # refused before reading the body
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest_dir / f"{uuid.uuid4().hex}.part"
    total = 0
    try:
        with open(tmp, "wb") as fh:
            try:
                for chunk in resp.iter_content(chunk_size=CHUNK_BYTES):
                    total += len(chunk)
                    if total > limit:
                        raise too_large
                    if time.monotonic() >= deadline:
                        raise _deadline_error(shown, settings)
                    fh.write(chunk)
            except requests.RequestException as exc:
                if time.monotonic() >= deadline or watch.expired:
                    raise _deadline_error(shown, settings) from None
                raise MediaError(
                    f"cannot fetch {shown}: connection broken while downloading ({_os_reason(exc)})"
                ) from None
        if watch.expired:
            raise _deadline_error(shown, settings)
        if total == 0:
            raise MediaError(f"image at {shown} is empty (0 bytes)")
        return tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------------ cache
def _cache_get(path: Path) -> bool:
    """Touch a cache entry (LRU order is mtime); False when absent or evicted concurrently."""
    try:
        os.utime(path)
        return path.is_file()
    except OSError:
        return False


def _cache_put(tmp: Path, path: Path, settings: Any) -> None:
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
    _remove_stale_temps(_temp_dir(settings))


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


# ----------------------------------------------------------------------------------------------- public API
def resolve_local_file(url: str, settings: Any) -> Path | None:
    """The file behind a /data/local-files/?d= URL under the local document root, when it exists there.

    Paths that escape the document root (``..``, symlinks outside it) are refused: the ``d`` parameter comes from
    task data, which anyone with import rights controls.
    """
    root_setting = getattr(settings, "local_files_root", "") or ""
    try:
        parsed = urlparse(url)
    except ValueError:  # e.g. an unterminated "[IPv6" host: not a URL any parser agrees on
        raise MediaError(f"{url!r} is not a valid URL") from None
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
    target = _absolute(url, settings)
    shown = url if len(url) <= 300 else url[:300] + "..."
    if url.startswith("/"):
        shown = target.url if len(target.url) <= 300 else shown
    token = str(getattr(settings, "label_studio_api_key", "") or "")
    if token and token in shown:  # task data may carry it; error messages and logs never do
        shown = shown.replace(token, "<token>")
    _check_allowed(target, shown, settings)
    target = _guard_label_studio(target, shown, settings)
    cached = cache_dir(settings) / hashlib.sha256(target.url.encode()).hexdigest()
    if use_cache and _cache_get(cached):
        try:
            return load(cached, shown, True)
        except MediaError:
            cached.unlink(missing_ok=True)  # not what we cache any more: fetch it again
    tmp, staged_in_cache = _download_staged(target, shown, settings)
    try:
        result = load(tmp, shown, True)
        if use_cache and staged_in_cache:
            _cache_put(tmp, cached, settings)
        return result
    finally:
        tmp.unlink(missing_ok=True)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A degraded disk is logged once per process and reason (every prediction would repeat it), then at debug."""
    with _fallback_lock:
        first = message not in _warned
        _warned.add(message)
    log.log(logging.WARNING if first else logging.DEBUG, "%s", message)


def _download_staged(target: Target, shown: str, settings: Any) -> tuple[Path, bool]:
    """(downloaded file, whether it sits beside the cache): MODEL_DIR/cache/media-tmp, else this process's
    directory under TMPDIR when the cache's disk cannot take it (full, read-only, not a directory). A full or
    read-only MODEL_DIR must cost the cache, never the prediction."""
    primary = _temp_dir(settings)
    try:
        primary.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _warn_once(f"media: {primary} cannot be written ({_os_error_text(exc)}): staging downloads in "
                   f"{tempfile.gettempdir()}, not caching")  # fmt: skip
    else:
        try:
            return _download(target, shown, settings, primary), True
        except OSError as exc:  # e.g. ENOSPC while writing the body
            if isinstance(exc, requests.RequestException):  # a network failure (requests' errors are OSErrors)
                raise MediaError(f"cannot fetch {shown}: {_os_reason(exc)}") from None
            _warn_once(f"media: writing under {primary} failed ({_os_error_text(exc)}): retrying downloads in "
                       f"{tempfile.gettempdir()}")  # fmt: skip
    try:
        return _download(target, shown, settings, _fallback_dir()), False
    except OSError as exc:
        raise MediaError(
            f"cannot store the download of {shown}: neither {primary} nor {tempfile.gettempdir()} can be written "
            f"({_os_error_text(exc)})"
        ) from None


def fetch_image(url: Any, settings: Any, *, use_cache: bool = True) -> np.ndarray:
    """Normalised float32 (H, W) image of a task URL (see the module docstring); MediaError on any failure.

    Only files that decode as images are cached. A file is recognised from its header before it is read into
    memory, so a large non-image costs disk (bounded by MAX_DOWNLOAD_BYTES), not memory.
    """
    return _fetch(url, settings, lambda p, s, d: _load_image(p, s, d, settings), use_cache=use_cache)


def _load_image(path: Path, shown: str, downloaded: bool, settings: Any) -> np.ndarray:
    from ml_backend.imaging import ImageDecodeError, load_image

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
