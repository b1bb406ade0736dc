"""Shared constants and helpers of the server tests (imported by module name, as tests/strategies does)."""

from __future__ import annotations

import contextlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DENSE_XML = (REPO / "label_config" / "dense.xml").read_text()
SPARSE_XML = (REPO / "label_config" / "sparse.xml").read_text()
# Different names everywhere: proves nothing is hard-coded.
CUSTOM_XML = """<View><Image name="em" value="$tile"/>
<BrushLabels name="seg" toName="em"><Label value="Mito"/><Label value="Background"/></BrushLabels></View>"""


def task(task_id: int, name: str, key: str = "image") -> dict:
    return {"id": task_id, "data": {key: f"/data/local-files/?d={name}"}}


class ImageHost:
    """A loopback HTTP server standing in for Label Studio's media: ``files`` maps a path to bytes, ``slow`` lists
    paths answered only after ``stop`` is set (or 30 s), to exercise deadlines. Use as a context manager."""

    def __init__(self, files: dict[str, bytes] | None = None, slow: set[str] | None = None) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.files = dict(files or {})
        self.slow = set(slow or ())
        self.stop = threading.Event()
        self.requests: list[str] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                host.requests.append(self.path)
                if self.path in host.slow:
                    host.stop.wait(30)
                body = host.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client gave up (deadline): nothing to do
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> ImageHost:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def png_bytes(array, mode: str | None = None) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def upload_task(task_id: int, name: str, key: str = "image") -> dict:
    """A task whose image Label Studio serves at /data/upload/1/<name> (fetched over HTTP from LABEL_STUDIO_URL)."""
    return {"id": task_id, "data": {key: f"/data/upload/1/{name}"}}
