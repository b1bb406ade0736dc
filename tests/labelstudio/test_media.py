"""Media fetching: local files from the shared document root, HTTP from Label Studio with the token, cache."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from ml_backend.config import Settings
from ml_backend.labelstudio.media import MediaError, cache_dir, fetch_image_bytes, resolve_local_file

TOKEN = "0123456789abcdef0123456789abcdef01234567"


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    seen: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 - http.server API
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/private") and self.headers.get("Authorization") != f"Token {TOKEN}":
            self.send_response(401)
            self.end_headers()
            return
        body = type(self).files.get(self.path)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """A real HTTP server on 127.0.0.1 standing in for Label Studio's file serving (records paths and auth)."""
    _Handler.files, _Handler.seen = {}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Handler
    finally:
        server.shutdown()
        server.server_close()


def _settings(tmp_path: Path, url: str = "http://127.0.0.1:9", root: str = "", **kw) -> Settings:
    return Settings.from_env(
        model_dir=tmp_path / "models", label_studio_url=url, label_studio_api_key=TOKEN, local_files_root=root, **kw
    )


def test_local_file_is_read_from_the_document_root_without_http(tmp_path):
    root = tmp_path / "root"
    (root / "tiles").mkdir(parents=True)
    (root / "tiles" / "a b.png").write_bytes(b"local-bytes")
    s = _settings(tmp_path, root=str(root))  # LABEL_STUDIO_URL points nowhere: any HTTP attempt would fail
    assert fetch_image_bytes("/data/local-files/?d=tiles/a%20b.png", s) == b"local-bytes"
    assert fetch_image_bytes("http://ls.example:8080/data/local-files/?d=tiles/a b.png", s) == b"local-bytes"


def test_local_files_path_escaping_the_root_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    with pytest.raises(MediaError, match="outside the document root"):
        resolve_local_file("/data/local-files/?d=../secret.png", _settings(tmp_path, root=str(root)))
    with pytest.raises(MediaError, match="no \\?d="):
        resolve_local_file("/data/local-files/", _settings(tmp_path, root=str(root)))


def test_local_file_missing_on_disk_falls_back_to_http_with_token(tmp_path, http_server):
    url, handler = http_server
    handler.files["/data/local-files/?d=tiles/x.png"] = b"via-http"
    s = _settings(tmp_path, url=url, root=str(tmp_path))
    assert fetch_image_bytes("/data/local-files/?d=tiles/x.png", s) == b"via-http"
    assert handler.seen == [("/data/local-files/?d=tiles/x.png", f"Token {TOKEN}")]


def test_upload_url_fetched_once_then_served_from_cache(tmp_path, http_server):
    url, handler = http_server
    handler.files["/private/data/upload/3/abc-tile.png"] = b"uploaded"
    s = _settings(tmp_path, url=url + "/private")
    assert fetch_image_bytes("/data/upload/3/abc-tile.png", s) == b"uploaded"
    assert fetch_image_bytes("/data/upload/3/abc-tile.png", s) == b"uploaded"
    assert len(handler.seen) == 1  # second call came from MODEL_DIR/cache/media
    assert len(list(cache_dir(s).iterdir())) == 1
    assert fetch_image_bytes("/data/upload/3/abc-tile.png", s, use_cache=False) == b"uploaded"
    assert len(handler.seen) == 2


def test_token_is_not_sent_to_other_hosts(tmp_path, http_server):
    url, handler = http_server
    handler.files["/pub/img.png"] = b"public"
    other = url.replace("127.0.0.1", "localhost")  # same server, but not the Label Studio host by name
    # "localhost" is not Label Studio's host: it must be allow-listed (MEDIA_ALLOWED_HOSTS) to be fetched at all.
    s = _settings(tmp_path, url=url, media_allowed_hosts=other.removeprefix("http://"))
    assert fetch_image_bytes(f"{other}/pub/img.png", s) == b"public"
    assert handler.seen[-1] == ("/pub/img.png", None)


def test_http_errors_are_media_errors(tmp_path, http_server):
    url, _handler = http_server
    s = _settings(tmp_path, url=url)
    with pytest.raises(MediaError, match="not found \\(404\\)"):
        fetch_image_bytes("/data/upload/1/missing.png", s)
    wrong = Settings.from_env(model_dir=tmp_path, label_studio_url=url + "/private", label_studio_api_key="bad")
    with pytest.raises(MediaError, match="refused .*LABEL_STUDIO_API_KEY"):
        fetch_image_bytes("/data/upload/1/x.png", wrong)


def test_unreachable_server_is_a_media_error(tmp_path):
    with pytest.raises(MediaError, match="cannot fetch http://127.0.0.1:9/data/upload"):
        fetch_image_bytes("/data/upload/1/x.png", _settings(tmp_path))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "non-empty"),
        ("s3://bucket/key.png", "cloud storage"),
        ("relative/path.png", "expected /data/local-files"),
    ],
)
def test_unsupported_urls(tmp_path, url, message):
    with pytest.raises(MediaError, match=message):
        fetch_image_bytes(url, _settings(tmp_path))


def test_oversized_download_is_refused(tmp_path, http_server):
    url, handler = http_server
    handler.files["/data/upload/1/big.png"] = b"x" * (65 * 1024 * 1024)
    with pytest.raises(MediaError, match="larger than"):
        fetch_image_bytes(f"{url}/data/upload/1/big.png", _settings(tmp_path, url=url, max_download_bytes=1024 * 1024))
