"""Issue 9, findings 1, 2, 4, 5: the media fetcher against hostile URLs and servers, all real listeners on loopback.

"Label Studio" and "evil" are two real HTTP servers on 127.0.0.1 (different ports) recording every request's
headers. Whatever the URL trick, evil must never see the API token; refused URLs must not reach it at all.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import struct
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend.config import Settings
from ml_backend.labelstudio import media, media_cache, media_transport
from ml_backend.labelstudio.media import MediaError, cache_dir, fetch_image, fetch_image_bytes

TOKEN = "f00dfeedf00dfeedf00dfeedf00dfeedf00dfeed"
MARKER = "EVILMARKER7731"


def _png(seed: int = 0, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
UP = "/data/upload/1"  # Label Studio's upload route: the listener posing as Label Studio serves media under it
Route = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Listener:
    """A real HTTP/1.1 server on loopback: ``routes`` maps a path to a handler; every request is recorded."""

    routes: dict[str, Route] = field(default_factory=dict)
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    port: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def tokens_seen(self) -> list[str]:
        return [h["authorization"] for _, h in self.seen if "authorization" in h]


def _serve(listener: Listener) -> Iterator[Listener]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - http.server API
            listener.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
            route = listener.routes.get(self.path.split("?")[0])
            if route is None:
                _send(self, 404, f"<html>{MARKER} not here</html>".encode())
                return
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                route(self)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    listener.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield listener
    finally:
        server.shutdown()
        server.server_close()


def _send(h: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k.replace("_", "-"), v)
    h.send_header("X-Marker", MARKER)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def _body(data: bytes, status: int = 200) -> Route:
    return lambda h: _send(h, status, data)


def _redirect(location: str, status: int = 302) -> Route:
    return lambda h: _send(h, status, f"<a>{MARKER}</a>".encode(), Location=location)


def _needs_token(data: bytes) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        if h.headers.get("Authorization") != f"Token {TOKEN}":
            _send(h, 401, MARKER.encode())
        else:
            _send(h, 200, data)

    return route


@pytest.fixture
def ls() -> Iterator[Listener]:
    yield from _serve(Listener())


@pytest.fixture
def evil() -> Iterator[Listener]:
    yield from _serve(Listener())


def _settings(tmp_path: Path, ls: Listener, **kw) -> Settings:
    values = {"model_dir": tmp_path / "models", "label_studio_url": ls.base, "label_studio_api_key": TOKEN}
    values.update(fetch_deadline_s=kw.pop("fetch_deadline_s", 5.0), **kw)
    return Settings.from_env(**values)


def _temp_files(s: Settings) -> list[Path]:
    d = media_cache.temp_dir(s)
    return list(d.iterdir()) if d.exists() else []


def _cache_files(s: Settings) -> list[Path]:
    d = cache_dir(s)
    return list(d.iterdir()) if d.exists() else []


# ------------------------------------------------------------------------------------------ the token matrix
# (id, URL template, MEDIA_ALLOWED_HOSTS template, expected: "ok" or a regex of the MediaError, evil may be contacted)
# {ls} / {evil} are host:port of the two listeners.
MATRIX = [
    ("backslash-at", "http://{ls}\\@{evil}/img.png", "", "backslash", False),
    ("backslash-at-allowed", "http://{ls}\\@{evil}/img.png", "*", "backslash", False),
    ("userinfo-ls-at-evil", "http://{ls}@{evil}/img.png", "*", "user credentials", False),
    ("userinfo-to-ls", "http://user:pw@{ls}/img.png", "", "user credentials", False),
    ("ls-name-as-user", "http://127.0.0.1@{evil}/img.png", "*", "user credentials", False),
    ("fragment-at-ls", "http://{evil}#@{ls}/img.png", "", "MEDIA_ALLOWED_HOSTS", False),
    ("fragment-at-ls-allowed", "http://{evil}#@{ls}/img.png", "{evil}", "not found \\(404\\)", True),
    ("pct-encoded-at", "http://{ls}%40{evil}/img.png", "*", "invalid host", False),
    ("pct-encoded-backslash", "http://{ls}%5C@{evil}/img.png", "*", "user credentials|invalid host", False),
    ("pct-encoded-host", "http://%31%32%37.0.0.1:{evil_port}/img.png", "*", "invalid host", False),
    ("mixed-case-scheme-ls", "HtTp://{ls}/data/upload/1/img.png", "", "ok", False),
    ("ipv6-literal", "http://[::1]:{evil_port}/img.png", "", "MEDIA_ALLOWED_HOSTS", False),
    ("ipv6-bad", "http://[::1:{evil_port}/img.png", "*", "IPv6|not a valid URL", False),
    ("double-port", "http://{ls}:{evil_port}/img.png", "*", "invalid (host part|port)", False),
    ("crlf-header-injection", "http://{ls}/data/upload/1/img.png\r\nX-Evil: 1", "", "control characters", False),
    ("tab-in-host", "http://127.0.0.1\t:{evil_port}/img.png", "*", "control characters", False),
    ("space-in-host", "http://127.0.0.1 :{evil_port}/img.png", "*", "invalid host", False),
    ("not-allowed-port", "http://{evil}/img.png", "", "MEDIA_ALLOWED_HOSTS", False),
    ("other-port-same-host-as-ls", "http://127.0.0.1:{evil_port}/img.png", "", "MEDIA_ALLOWED_HOSTS", False),
    ("allowed-foreign-no-token", "http://{evil}/img.png", "{evil}", "ok", True),
    ("allow-all-no-token", "http://{evil}/img.png", "*", "ok", True),
    ("relative-backslash", "/\\@{evil}/img.png", "*", "backslash", False),
    ("relative-embedded-url", "/http://{evil}/img.png", "*", "refused before connecting", False),
    ("protocol-relative", "//{evil}/img.png", "*", "refused before connecting", False),
    ("redirect-to-evil", "http://{ls}/data/upload/1/to-evil", "", "redirected to .*MEDIA_ALLOWED_HOSTS", False),
    ("redirect-to-evil-allowed", "http://{ls}/data/upload/1/to-evil", "{evil}", "ok", True),
    ("redirect-evil-backslash", "http://{ls}/data/upload/1/to-evil-backslash", "*", "invalid or non-http", False),
    ("redirect-evil-userinfo", "http://{ls}/data/upload/1/to-evil-userinfo", "*", "invalid or non-http", False),
    ("redirect-protocol-relative", "http://{ls}/data/upload/1/to-evil-relative", "", "MEDIA_ALLOWED_HOSTS", False),
    ("redirect-to-file", "http://{ls}/data/upload/1/to-file", "*", "invalid or non-http", False),
    ("redirect-to-gopher", "http://{ls}/data/upload/1/to-gopher", "*", "invalid or non-http", False),
    ("redirect-loop", "http://{ls}/data/upload/1/loop", "", "more than 5 redirects", False),
    ("redirect-https-downgrade-host", "http://{ls}/data/upload/1/to-ls-https", "", "cannot fetch", False),
    ("evil-redirects-to-ls", "http://{evil}/to-ls", "{evil}", "ok", True),
    ("evil-redirect-loop", "http://{evil}/loop", "*", "more than 5 redirects", True),
    ("ftp", "ftp://{evil}/img.png", "*", "only http and https", False),
    ("gopher", "gopher://{evil}/_GET%20/", "*", "only http and https", False),
    ("file", "file:///etc/passwd", "*", "only http and https", False),
    ("data", "data:image/png;base64,iVBORw0KGgo=", "*", "only http and https", False),
    ("javascript", "javascript:alert(1)", "*", "only http and https", False),
    ("no-slashes", "http:{evil}/img.png", "*", "no //host", False),
]


@pytest.mark.parametrize(
    ("url", "allowed", "expected", "evil_contacted"), [m[1:] for m in MATRIX], ids=[m[0] for m in MATRIX]
)
def test_token_never_reaches_another_host(tmp_path, ls, evil, url, allowed, expected, evil_contacted):
    ls.routes.update({
        f"{UP}/img.png": _needs_token(PNG),
        f"{UP}/to-evil": _redirect(f"{evil.base}/img.png"),
        f"{UP}/to-evil-backslash": _redirect(f"http://{ls.netloc}\\@{evil.netloc}/img.png"),
        f"{UP}/to-evil-userinfo": _redirect(f"http://{ls.netloc}@{evil.netloc}/img.png"),
        f"{UP}/to-evil-relative": _redirect(f"//{evil.netloc}/img.png"),
        f"{UP}/to-file": _redirect("file:///etc/passwd"),
        f"{UP}/to-gopher": _redirect(f"gopher://{evil.netloc}/_x"),
        f"{UP}/loop": _redirect(f"{UP}/loop"),
        f"{UP}/to-ls-https": _redirect(f"https://{ls.netloc}{UP}/img.png"),  # not TLS: fails, but must not leak
    })  # fmt: skip
    evil.routes.update({
        "/img.png": _body(PNG),
        "/to-ls": _redirect(f"{ls.base}{UP}/img.png"),
        "/loop": _redirect(f"{evil.base}/loop"),
    })  # fmt: skip
    fill = {"ls": ls.netloc, "evil": evil.netloc, "evil_port": str(evil.port)}
    s = _settings(tmp_path, ls, media_allowed_hosts=allowed.format(**fill))
    target = url.format(**fill)
    if expected == "ok":
        image = fetch_image(target, s, use_cache=False)
        assert image.shape == (32, 32) and image.dtype == np.float32
    else:
        with pytest.raises(MediaError, match=expected):
            fetch_image(target, s, use_cache=False)
    assert evil.tokens_seen() == []
    if not evil_contacted:
        assert evil.seen == []
    assert _temp_files(s) == []


def test_label_studio_receives_the_token_for_its_own_urls(tmp_path, ls, evil):
    ls.routes["/data/upload/1/a.png"] = _needs_token(PNG)
    ls.routes[f"{UP}/img.png"] = _needs_token(PNG)
    evil.routes["/to-ls"] = _redirect(f"{ls.base}{UP}/img.png")
    s = _settings(tmp_path, ls, media_allowed_hosts=evil.netloc)
    assert fetch_image("/data/upload/1/a.png", s).shape == (32, 32)
    assert fetch_image(f"{evil.base}/to-ls", s).shape == (32, 32)  # a hop to Label Studio's origin gets the token
    assert ls.tokens_seen() == [f"Token {TOKEN}", f"Token {TOKEN}"]
    assert evil.tokens_seen() == [] and len(evil.seen) == 1


def test_environment_credentials_and_proxies_are_ignored(tmp_path, ls, evil, monkeypatch):
    """trust_env=False: a ~/.netrc entry for the foreign host and an HTTP proxy from the environment are not used."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text(f"machine 127.0.0.1 login u password {MARKER}\n")
    (home / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("HTTP_PROXY", evil.base)  # if honoured, every request (with the token) would go to evil
    monkeypatch.setenv("http_proxy", evil.base)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    ls.routes[f"{UP}/img.png"] = _needs_token(PNG)
    evil.routes["/img.png"] = _body(PNG)
    s = _settings(tmp_path, ls, media_allowed_hosts=evil.netloc)
    media_transport._sessions.clear()  # sessions are per thread and read the environment per request: start afresh
    results: list = []
    for url in (f"{ls.base}{UP}/img.png", f"{evil.base}/img.png"):
        t = threading.Thread(target=lambda u=url: results.append(fetch_image(u, s, use_cache=False).shape))
        t.start()
        t.join(10)
    assert results == [(32, 32), (32, 32)]
    assert [p for p, _ in evil.seen] == ["/img.png"]  # evil was only contacted directly, never as a proxy
    assert all("authorization" not in h for _, h in evil.seen)


# --------------------------------------------------------------------------------------------------- SSRF
def test_non_allow_listed_loopback_port_is_refused_without_a_connection(tmp_path, ls):
    hits: list[bytes] = []
    raw = socket.socket()
    raw.bind(("127.0.0.1", 0))
    raw.listen(8)
    raw.settimeout(0.2)
    port = raw.getsockname()[1]

    def accept() -> None:
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                conn, _ = raw.accept()
            except (TimeoutError, OSError):
                continue
            hits.append(conn.recv(100))
            conn.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    s = _settings(tmp_path, ls)
    with pytest.raises(MediaError, match="not in MEDIA_ALLOWED_HOSTS"):
        fetch_image(f"http://127.0.0.1:{port}/", s)
    t.join()
    raw.close()
    assert hits == []  # like Redis's port in the probe: nothing ever connected


def test_allow_all_and_host_entries(tmp_path, ls, evil):
    evil.routes["/img.png"] = _body(PNG)
    url = f"{evil.base}/img.png"
    for allowed in ("*", "127.0.0.1", f"127.0.0.1:{evil.port}", f" other.example , 127.0.0.1:{evil.port}"):
        assert fetch_image(url, _settings(tmp_path, ls, media_allowed_hosts=allowed), use_cache=False).shape == (32, 32)
    for refused in ("", "localhost", f"127.0.0.1:{evil.port + 1}", "127.0.0.2"):
        with pytest.raises(MediaError, match="MEDIA_ALLOWED_HOSTS"):
            fetch_image(url, _settings(tmp_path, ls, media_allowed_hosts=refused), use_cache=False)
    assert len(evil.seen) == 4 and evil.tokens_seen() == []


# -------------------------------------------------------------------------- foreign bytes never echo back
def _raw_reply(payload: bytes) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.wfile.write(payload)
        h.wfile.flush()
        h.close_connection = True

    return route


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (_body(f"<html><body>{MARKER}</body></html>".encode()), "not an image"),
        (_body(b"II*\x00" + MARKER.encode() * 20), "cannot decode"),  # TIFF magic, garbage after it
        (_body(b"\x89PNG\r\n\x1a\n" + MARKER.encode() * 20), "not an image|cannot decode"),
        (_body(f"{MARKER} server error".encode(), status=500), "HTTP 500"),
        (_body(MARKER.encode(), status=403), "refused"),
        (_redirect(f"http://{MARKER.lower()}.invalid/x"), "redirected to a host"),
        (_redirect(f"{MARKER}://x/"), "invalid or non-http"),
        (_raw_reply(f"-ERR {MARKER} unknown command\r\n".encode()), "cannot fetch"),  # Redis-like, not HTTP
        (_raw_reply(f"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{MARKER}\r\n".encode()), "cannot fetch"),
        (_raw_reply(f"HTTP/1.1 200 OK\r\nContent-Length: 900\r\n\r\n{MARKER}".encode()), "cannot fetch"),
    ],
    ids=["html", "tiff-garbage", "png-garbage", "500", "403", "redirect-host", "redirect-scheme", "not-http",
         "bad-chunk", "short-body"],
)  # fmt: skip
def test_error_messages_never_echo_foreign_bytes(tmp_path, ls, evil, route, message):
    evil.routes["/x"] = route
    s = _settings(tmp_path, ls, media_allowed_hosts=evil.netloc)
    with pytest.raises(MediaError, match=message) as err:
        fetch_image(f"{evil.base}/x", s)
    assert MARKER.lower() not in str(err.value).lower()
    assert _cache_files(s) == [] and _temp_files(s) == []


# ------------------------------------------------------------------------------------- size, memory, cache
def _stream(total: int, *, declare: bool, gate: threading.Event | None = None) -> Route:
    """``total`` bytes of non-image from one reused 64 KiB buffer, chunked unless ``declare`` (Content-Length)."""
    block = b"\x00garbage" * 8192

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length" if declare else "Transfer-Encoding", str(total) if declare else "chunked")
        h.end_headers()
        h.wfile.flush()
        if gate is not None and not gate.wait(10):
            return
        sent = 0
        while sent < total:
            n = min(len(block), total - sent)
            if declare:
                h.wfile.write(block[:n])
            else:
                h.wfile.write(b"%x\r\n" % n + block[:n] + b"\r\n")
            sent += n
        if not declare:
            h.wfile.write(b"0\r\n\r\n")

    return route


def test_content_length_over_the_limit_is_refused_before_the_body(tmp_path, ls):
    gate = threading.Event()  # the body is only sent once the test opens the gate: a reader would hang
    ls.routes[f"{UP}/big"] = _stream(50 * 1024 * 1024, declare=True, gate=gate)
    s = _settings(tmp_path, ls, max_download_bytes=1024 * 1024, fetch_deadline_s=8.0)
    t0 = time.monotonic()
    with pytest.raises(MediaError, match="larger than MAX_DOWNLOAD_BYTES"):
        fetch_image(f"{UP}/big", s)
    assert time.monotonic() - t0 < 3.0
    gate.set()
    assert _temp_files(s) == [] and _cache_files(s) == []


def test_chunked_body_over_the_limit_is_cut_off_in_bounded_memory(tmp_path, ls):
    ls.routes[f"{UP}/big"] = _stream(100 * 1024 * 1024, declare=False)
    s = _settings(tmp_path, ls, max_download_bytes=1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(MediaError, match="larger than MAX_DOWNLOAD_BYTES"):
            fetch_image(f"{UP}/big", s)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024  # the 100 MB body was never held in memory
    assert _temp_files(s) == [] and _cache_files(s) == []


def test_large_non_image_goes_to_disk_not_memory_and_is_not_cached(tmp_path, ls):
    ls.routes[f"{UP}/blob"] = _stream(30 * 1024 * 1024, declare=False)
    s = _settings(tmp_path, ls, max_download_bytes=64 * 1024 * 1024, fetch_deadline_s=20.0)
    tracemalloc.start()
    try:
        with pytest.raises(MediaError, match="not an image"):
            fetch_image(f"{UP}/blob", s)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024  # streamed to a temp file, recognised as a non-image from its header
    assert _temp_files(s) == [] and _cache_files(s) == []


def test_cache_keeps_images_only_and_evicts_least_recently_used(tmp_path, ls):
    images = {f"{UP}/i{k}.png": _png(seed=k, size=48) for k in range(5)}
    for path, data in images.items():
        ls.routes[path] = _body(data)
    size = max(len(d) for d in images.values())
    s = _settings(tmp_path, ls, media_cache_bytes=int(size * 2.5))

    def fetched(path: str) -> int:
        before = len(ls.seen)
        fetch_image(path, s)
        return len(ls.seen) - before

    assert fetched(f"{UP}/i0.png") == 1 and fetched(f"{UP}/i1.png") == 1
    time.sleep(0.02)
    assert fetched(f"{UP}/i0.png") == 0  # hit: touched, now more recent than i1
    time.sleep(0.02)
    assert fetched(f"{UP}/i2.png") == 1  # over the bound: i1 (least recently used) is evicted
    assert fetched(f"{UP}/i0.png") == 0
    assert fetched(f"{UP}/i1.png") == 1
    for k in range(5):
        fetched(f"{UP}/i{k}.png")
    total = sum(p.stat().st_size for p in _cache_files(s))
    assert 0 < total <= s.media_cache_bytes and len(_cache_files(s)) == 2
    assert _temp_files(s) == []


def test_cache_survives_entries_vanishing_and_zero_bound_disables_it(tmp_path, ls):
    ls.routes[f"{UP}/a.png"] = _body(PNG)
    s = _settings(tmp_path, ls)
    fetch_image(f"{UP}/a.png", s)
    for p in _cache_files(s):
        p.unlink()  # another process evicted it
    assert fetch_image(f"{UP}/a.png", s).shape == (32, 32) and len(ls.seen) == 2
    off = _settings(tmp_path / "off", ls, media_cache_bytes=0)
    fetch_image(f"{UP}/a.png", off)
    assert _cache_files(off) == [] and _temp_files(off) == []


def test_fetch_image_bytes_validate_hook_decides_caching(tmp_path, ls):
    ls.routes[f"{UP}/x"] = _body(b"not an image")

    def refuse(data: bytes) -> None:
        raise ValueError("no")

    s = _settings(tmp_path, ls)
    with pytest.raises(MediaError, match="failed validation"):
        fetch_image_bytes(f"{UP}/x", s, validate=refuse)
    assert _cache_files(s) == [] and _temp_files(s) == []


# ------------------------------------------------------------------------------------------------ deadline
def _trickle(head: bytes, body_byte_every_s: float) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.wfile.write(head)
        h.wfile.flush()
        for _ in range(600):
            time.sleep(body_byte_every_s)
            h.wfile.write(b"x")
            h.wfile.flush()

    return route


@pytest.mark.parametrize(
    "route",
    [
        _trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", 0.3),  # body, a byte at a time
        _trickle(b"HTTP/1.1 200 OK\r\nX-Slow: ", 0.3),  # headers that never end
        _trickle(b"", 100.0),  # accepts, never answers
    ],
    ids=["trickling-body", "trickling-headers", "silent"],
)
def test_slow_servers_are_cut_off_at_the_deadline(tmp_path, ls, route):
    ls.routes[f"{UP}/slow"] = route
    s = _settings(tmp_path, ls, fetch_deadline_s=1.5)
    t0 = time.monotonic()
    with pytest.raises(MediaError, match="FETCH_DEADLINE_S=1.5"):
        fetch_image(f"{UP}/slow", s)
    assert time.monotonic() - t0 < 1.5 + 1.0
    assert _temp_files(s) == []


def test_transient_errors_are_retried_within_the_deadline(tmp_path, ls):
    calls = {"n": 0}

    def flaky(h: BaseHTTPRequestHandler) -> None:
        calls["n"] += 1
        _send(h, 503 if calls["n"] == 1 else 200, MARKER.encode() if calls["n"] == 1 else PNG)

    ls.routes[f"{UP}/flaky"] = flaky
    ls.routes[f"{UP}/down"] = _body(MARKER.encode(), status=502)
    s = _settings(tmp_path, ls, fetch_deadline_s=3.0)
    assert fetch_image(f"{UP}/flaky", s).shape == (32, 32) and calls["n"] == 2
    t0 = time.monotonic()
    with pytest.raises(MediaError, match="HTTP 502") as err:
        fetch_image(f"{UP}/down", s)
    assert time.monotonic() - t0 < 3.0 + 0.5
    assert MARKER not in str(err.value)
    assert sum(p == f"{UP}/down" for p, _ in ls.seen) == media_transport.MAX_ATTEMPTS


def test_unreachable_host_fails_fast_with_the_os_reason(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s = Settings.from_env(model_dir=tmp_path, label_studio_url=f"http://127.0.0.1:{port}", fetch_deadline_s=3.0)
    t0 = time.monotonic()
    with pytest.raises(MediaError, match="refused"):
        fetch_image("/data/upload/1/x.png", s)
    assert time.monotonic() - t0 < 3.5


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring ``width`` x ``height``, no pixel data: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_pixel_limits_are_checked_from_the_header_and_nothing_is_cached(tmp_path, ls):
    big = io.BytesIO()
    Image.fromarray(np.zeros((300, 300), dtype=np.uint8)).save(big, format="PNG")
    ls.routes[f"{UP}/big.png"] = _body(big.getvalue())
    ls.routes[f"{UP}/bomb.png"] = _body(_png_header_only(100_000, 100_000))
    s = _settings(tmp_path, ls, max_image_pixels=200 * 200)
    with pytest.raises(MediaError, match="300x300 = 90,000 pixels.*MAX_IMAGE_PIXELS"):
        fetch_image(f"{UP}/big.png", s)
    with pytest.raises(MediaError, match="decompression bomb"):
        fetch_image(f"{UP}/bomb.png", s)
    assert _cache_files(s) == [] and _temp_files(s) == []


# ------------------------------------------------------------------ Label Studio's paths (issue 16, item 6)
# With auth off, anyone may POST /predict: an "image" of /api/projects/1/next/ made the backend GET that API path
# with its token (Label Studio then locked a task for 24 h). Only Label Studio's media routes may be requested.
FILEURI = "czM6Ly9idWNrZXQveC5wbmc="  # base64 of s3://bucket/x.png, as Label Studio writes it
ALLOWED_PATHS = [  # (id, task URL, the path Label Studio must see)
    ("upload", f"{UP}/img.png", f"{UP}/img.png"),
    ("upload-absolute", "http://{ls}/data/upload/1/img.png", f"{UP}/img.png"),
    ("upload-space", f"{UP}/a b.png", f"{UP}/a%20b.png"),
    ("upload-encoded-space", f"{UP}/a%20b.png", f"{UP}/a%20b.png"),
    ("upload-encoded-letter", "/%64ata/upload/1/img.png", f"{UP}/img.png"),
    ("upload-encoded-slashes", "/data%2Fupload%2F1%2Fimg.png", f"{UP}/img.png"),
    ("upload-non-ascii", f"{UP}/%C3%A9.png", f"{UP}/%C3%A9.png"),
    ("local-files", "/data/local-files/?d=tiles/x.png", "/data/local-files/?d=tiles/x.png"),
    ("storage-data", "/storage-data/uploaded/?filepath=up/x.png", "/storage-data/uploaded/?filepath=up/x.png"),
    ("task-resolve", f"/tasks/12/resolve/?fileuri={FILEURI}", f"/tasks/12/resolve/?fileuri={FILEURI}"),
    ("task-presign", f"/tasks/12/presign/?fileuri={FILEURI}", f"/tasks/12/presign/?fileuri={FILEURI}"),
    ("project-resolve", f"/projects/3/resolve/?fileuri={FILEURI}", f"/projects/3/resolve/?fileuri={FILEURI}"),
    ("project-presign", f"/projects/3/presign/?fileuri={FILEURI}", f"/projects/3/presign/?fileuri={FILEURI}"),
]
REFUSED_PATHS = [  # (id, task URL, regex of the reason)
    ("api-next", "/api/projects/1/next/", "not one of Label Studio's media paths"),
    ("api-next-absolute", "http://{ls}/api/projects/1/next/", "media paths"),
    ("api-next-upper-scheme", "HTTP://{ls}/api/projects/1/next/", "media paths"),
    ("api-task", "/api/tasks/1/", "media paths"),
    ("api-export", "/api/projects/1/export?exportType=JSON", "media paths"),
    ("logout", "/user/logout/", "media paths"),
    ("admin", "/admin/", "media paths"),
    ("media-in-query", f"/api/projects/1/next/?x={UP}/img.png", "media paths"),
    ("media-below-api", f"/api{UP}/img.png", "media paths"),
    ("local-files-below-api", "/api/x/data/local-files/?d=a.png", "media paths"),  # Django's route is unanchored
    ("upload-without-file", "/data/upload/", "media paths"),
    ("resolve-without-slash", "/tasks/1/resolve", "media paths"),
    ("resolve-not-an-id", "/tasks/x/resolve/", "media paths"),
    ("dot-dot", "/data/upload/../../api/projects/1/next/", "'\\.', '\\.\\.' or empty"),
    ("dot-dot-encoded", "/data/upload/1/%2e%2e/%2e%2e/%2e%2e/api/projects/1/next/", "'\\.\\.' or empty"),
    ("dot-dot-encoded-upper", "/data/upload/1/%2E%2E/%2E%2E/%2E%2E/api/projects/1/next/", "'\\.\\.' or empty"),
    ("dot-dot-encoded-slash", "/data/upload/1/..%2f..%2f..%2fapi/projects/1/next/", "'\\.\\.' or empty"),
    ("single-dot", "/data/upload/./../api/projects/1/next/", "'\\.\\.' or empty"),
    ("double-encoded", "/data/upload/1/%252e%252e/%252e%252e/%252e%252e/api/projects/1/next/", "encoded twice"),
    ("double-slash", "/data/upload//../api/projects/1/next/", "empty segments"),
    ("empty-segment", "/data/upload//api/projects/1/next/", "empty segments"),
    ("semicolon-params", "/data/upload;x=1/../../api/projects/1/next/", "';' parameters|'\\.\\.'"),
    ("semicolon-encoded", f"{UP}/img.png%3B/../../../api/projects/1/next/", "';' parameters|'\\.\\.'"),
    ("semicolon-only", f"{UP}/img.png;jsessionid=1", "';' parameters"),
    ("encoded-backslash", f"{UP}/x%5C..%5C..%5Capi%5Cprojects", "backslash"),
    ("encoded-nul", f"{UP}/x%00.png", "control characters"),
    ("not-utf8", f"{UP}/%ff.png", "not valid UTF-8"),
    ("embedded-url", "/http://{ls}/api/projects/1/next/", "empty segments"),
]


@pytest.mark.parametrize(("url", "path"), [a[1:] for a in ALLOWED_PATHS], ids=[a[0] for a in ALLOWED_PATHS])
def test_label_studio_media_paths_are_fetched_with_the_token(tmp_path, ls, url, path):
    ls.routes[path.split("?")[0]] = _needs_token(PNG)
    s = _settings(tmp_path, ls)
    assert fetch_image(url.format(ls=ls.netloc), s, use_cache=False).shape == (32, 32)
    assert [p for p, _ in ls.seen] == [path]  # the canonical path: what was checked is what was requested
    assert ls.tokens_seen() == [f"Token {TOKEN}"]


@pytest.mark.parametrize(("url", "reason"), [r[1:] for r in REFUSED_PATHS], ids=[r[0] for r in REFUSED_PATHS])
def test_other_label_studio_paths_are_refused_before_connecting(tmp_path, ls, url, reason):
    s = _settings(tmp_path, ls, media_allowed_hosts="*")  # allowing every host does not open Label Studio's API
    with pytest.raises(MediaError, match=reason) as err:
        fetch_image(url.format(ls=ls.netloc), s)
    assert "refused before connecting" in str(err.value)
    assert ls.seen == []  # not one request reached Label Studio
    assert _temp_files(s) == [] and _cache_files(s) == []


@pytest.mark.parametrize(
    ("start", "location", "seen_on_ls"),
    [
        ("ls", "/api/projects/1/next/", 1),
        ("ls", "{ls_base}/api/projects/1/next/", 1),
        ("ls", f"{UP}/%2e%2e/%2e%2e/%2e%2e/api/projects/1/next/", 1),
        ("ls", f"{UP}/../../../api/projects/1/next/", 1),
        ("evil", "{ls_base}/api/projects/1/next/", 0),
        ("evil", "{ls_base}/data/upload/1/..%2f..%2f..%2fapi/projects/1/next/", 0),
    ],
    ids=["ls-relative", "ls-absolute", "ls-encoded-dots", "ls-dots", "allowed-host-to-ls-api", "allowed-host-dots"],
)
def test_redirects_to_label_studio_api_paths_are_refused(tmp_path, ls, evil, start, location, seen_on_ls):
    where = location.format(ls_base=ls.base)
    ls.routes[f"{UP}/hop"] = _redirect(where)
    evil.routes["/hop"] = _redirect(where)
    s = _settings(tmp_path, ls, media_allowed_hosts=evil.netloc)
    url = f"{UP}/hop" if start == "ls" else f"{evil.base}/hop"
    with pytest.raises(MediaError, match="redirected to a Label Studio path that is not a media path") as err:
        fetch_image(url, s)
    assert "api/projects" not in str(err.value)  # the Location came from a server: never echoed
    assert [p for p, _ in ls.seen] == [f"{UP}/hop"][:seen_on_ls]
    assert evil.tokens_seen() == []


def test_redirect_within_label_studio_media_paths_is_followed(tmp_path, ls):
    ls.routes[f"{UP}/hop"] = _redirect(f"/storage-data/uploaded/?filepath={UP[1:]}/img.png")
    ls.routes["/storage-data/uploaded/"] = _needs_token(PNG)
    assert fetch_image(f"{UP}/hop", _settings(tmp_path, ls)).shape == (32, 32)
    assert ls.tokens_seen() == [f"Token {TOKEN}"] * 2


def test_label_studio_under_a_path_prefix(tmp_path, ls):
    ls.routes[f"/ls{UP}/img.png"] = _needs_token(PNG)
    s = _settings(tmp_path, ls, label_studio_url=f"{ls.base}/ls")
    assert fetch_image(f"{UP}/img.png", s, use_cache=False).shape == (32, 32)
    assert fetch_image(f"{ls.base}/ls{UP}/img.png", s, use_cache=False).shape == (32, 32)
    for url in ("/api/projects/1/next/", f"{ls.base}/ls/api/projects/1/next/", f"/..{UP}/img.png"):
        with pytest.raises(MediaError, match="refused before connecting"):
            fetch_image(url, s)
    assert [p for p, _ in ls.seen] == [f"/ls{UP}/img.png"] * 2


def test_refusal_never_echoes_the_token(tmp_path, ls):
    s = _settings(tmp_path, ls)
    with pytest.raises(MediaError, match="refused before connecting") as err:
        fetch_image(f"/api/projects/1/next/?token={TOKEN}", s)
    assert TOKEN not in str(err.value) and ls.seen == []


def test_allowed_foreign_hosts_keep_any_path_and_get_no_token(tmp_path, ls, evil):
    evil.routes["/api/projects/1/next/"] = _body(PNG)
    s = _settings(tmp_path, ls, media_allowed_hosts=evil.netloc)
    assert fetch_image(f"{evil.base}/api/projects/1/next/", s).shape == (32, 32)
    assert evil.tokens_seen() == [] and ls.seen == []


# ------------------------------------------------------------------ a cache that cannot be written (item 7)
def test_unwritable_cache_falls_back_to_a_private_temp_dir_and_says_so(tmp_path, ls):
    """MODEL_DIR/cache is a regular file: mkdir under it fails even for root. Images still arrive (staged in this
    process's directory under TMPDIR, removed after use), nothing is cached, and cache_problem says why."""
    ls.routes[f"{UP}/a.png"] = _body(PNG)
    s = _settings(tmp_path, ls)
    assert media.cache_problem(s) is None  # (the probe created MODEL_DIR/cache/...)
    shutil.rmtree(s.model_dir / "cache")
    (s.model_dir / "cache").write_bytes(b"not a directory")
    problem = media.cache_problem(s)
    assert problem is not None and "cannot be written" in problem and "Not a directory" in problem
    assert fetch_image(f"{UP}/a.png", s).shape == (32, 32)
    assert fetch_image(f"{UP}/a.png", s).shape == (32, 32)
    assert len(ls.seen) == 2  # not cached: fetched again
    assert list(media_cache.fallback_dir().iterdir()) == []  # staged downloads are removed after use
    (s.model_dir / "cache").unlink()  # the disk is fixed: caching resumes, the warning goes
    assert media.cache_problem(s) is None
    fetch_image(f"{UP}/a.png", s)
    fetch_image(f"{UP}/a.png", s)
    assert len(ls.seen) == 3 and len(_cache_files(s)) == 1


def test_read_only_model_dir_still_serves_images(tmp_path, ls, tmpfs):
    ls.routes[f"{UP}/a.png"] = _body(PNG)
    model_dir = tmpfs("1m")
    s = _settings(tmp_path, ls, model_dir=model_dir)
    tmpfs.remount(model_dir, "ro")
    assert "Read-only file system" in (media.cache_problem(s) or "")
    assert fetch_image(f"{UP}/a.png", s).shape == (32, 32)
    assert list(media_cache.fallback_dir().iterdir()) == []


def test_disk_filling_up_during_a_download_retries_it_elsewhere(tmp_path, ls, tmpfs):
    """The cache's disk has room to create the file but not for the image: ENOSPC while streaming the body, so the
    download is done again in the TMPDIR staging directory and the image is served (not cached)."""
    big = _png(seed=5, size=400)  # ~160 kB of noise: more than the 64 kB tmpfs holds
    ls.routes[f"{UP}/big.png"] = _body(big)
    s = _settings(tmp_path, ls, model_dir=tmpfs("64k"))
    assert fetch_image(f"{UP}/big.png", s).shape == (400, 400)
    assert [p for p, _ in ls.seen] == [f"{UP}/big.png"] * 2  # the second try went to the fallback directory
    assert _temp_files(s) == [] and _cache_files(s) == []
    assert list(media_cache.fallback_dir().iterdir()) == []
