"""HTTP fetching of task media for ``labelstudio.media``: the token per hop, validated redirects, size and time bounds.

``download(first, shown, settings, dest_dir)`` requests a ``Target`` that ``media_policy`` already validated and
streams the final body into a new file in ``dest_dir``:

* the ``Authorization`` token goes only to a hop whose (scheme, host, port) is ``LABEL_STUDIO_URL``'s;
* redirects are followed here (never by requests), at most ``MAX_REDIRECTS``, each target validated, allow-listed
  and path-restricted like the first URL;
* the body is capped at ``MAX_DOWNLOAD_BYTES`` (Content-Length checked first, bytes counted while streaming);
* one deadline, ``FETCH_DEADLINE_S``, covers connecting, reads, redirects and retries: a watchdog shuts the sockets
  down when it passes; transient failures (connection errors, 502/503/504) are retried within it;
* the per-thread session ignores the environment (no ``~/.netrc``, no proxies) and stores no cookies;
* error messages never carry bytes of a response.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import logging
import os
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests
from requests.adapters import HTTPAdapter
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from ml_backend.labelstudio.media_policy import (
    MEDIA_PATHS_TEXT,
    MediaError,
    Target,
    is_allowed,
    is_label_studio,
    label_studio_media_path,
    label_studio_target,
    parse_target,
)

__all__ = ["MAX_ATTEMPTS", "MAX_REDIRECTS", "download", "os_reason"]

log = logging.getLogger("ml_backend.labelstudio.media")  # the logger name the fetcher has always logged under

CONNECT_TIMEOUT_S = 5.0
MAX_REDIRECTS = 5
MAX_ATTEMPTS = 3  # per hop, for connection errors and 502/503/504, all within FETCH_DEADLINE_S
CHUNK_BYTES = 64 * 1024
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
TRANSIENT_CODES = frozenset({502, 503, 504})


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


def os_reason(exc: BaseException) -> str:
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


def download(first: Target, shown: str, settings: Any, dest_dir: Path) -> Path:
    """Follow validated redirects and stream the final body into a new temporary file in ``dest_dir``."""
    deadline = time.monotonic() + float(settings.fetch_deadline_s)
    ls = label_studio_target(settings)
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
                        raise _Transient(f"cannot fetch {shown}: {os_reason(exc)}") from None
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
    if not is_allowed(nxt, settings):
        log.warning("media: %s redirected to %s, not in MEDIA_ALLOWED_HOSTS", shown, nxt.netloc)
        # Name the host only when Label Studio sent the redirect (e.g. to cloud storage): foreign bytes never echo.
        where = f"{nxt.netloc}, a host" if trusted else "a host"
        raise MediaError(
            f"cannot fetch {shown}: redirected to {where} that is not Label Studio's and not in MEDIA_ALLOWED_HOSTS "
            "(comma-separated host or host:port entries, '*' for any host)"
        )
    if is_label_studio(nxt, settings):
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
                    f"cannot fetch {shown}: connection broken while downloading ({os_reason(exc)})"
                ) from None
        if watch.expired:
            raise _deadline_error(shown, settings)
        if total == 0:
            raise MediaError(f"image at {shown} is empty (0 bytes)")
        return tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
