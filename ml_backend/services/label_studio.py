"""Install (once) and start a real Label Studio server on 127.0.0.1, non-interactively.

Why a separate virtual environment: `label-studio` pins Django, rq, redis and many more; installing it next to the
backend would let its pins fight ours. The venv is created on first use (`python -m venv` + `pip install
label-studio==1.23.2`, about a minute and 1 GB) and cached at LABEL_STUDIO_VENV (default
`<repo>/.cache/label-studio-venv`).

The server is started the way `../shared/notes/label-studio-facts.md` verified: a pre-created admin user with a
fixed API token (legacy token auth on), local-file serving from a document root, and the SSRF / local-IP guards off
so that an ML backend and its webhook on 127.0.0.1 can be connected. Usable as a module (tests, the quick start):

    server = start_label_studio(data_dir=..., document_root=...)   # waits for GET /health
    ...; server.stop()

and as a command that runs until Ctrl-C:

    python -m ml_backend.services.label_studio --port 8080 --data-dir .cache/label-studio-data
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ml_backend.services.ports import free_port

log = logging.getLogger("label_studio_server")

REPO_ROOT = Path(__file__).resolve().parents[2]
LABEL_STUDIO_VERSION = "1.23.2"
DEFAULT_USERNAME = "admin@example.com"
DEFAULT_PASSWORD = "em-active-learning"
TOKEN_FILE = "ml-backend-api-token"  # inside the data dir: the user token only applies when the user is created


class LabelStudioServerError(RuntimeError):
    """Label Studio could not be installed or did not start."""


def default_venv() -> Path:
    """LABEL_STUDIO_VENV, else `<repo>/.cache/label-studio-venv`."""
    env = os.environ.get("LABEL_STUDIO_VENV")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".cache" / "label-studio-venv"


def _installed_version(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not (venv / "bin" / "label-studio").is_file() or not python.is_file():
        return None
    proc = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('label-studio'))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def ensure_venv(venv: str | Path | None = None, version: str = LABEL_STUDIO_VERSION) -> Path:
    """Path of the `label-studio` executable, installing label-studio==version into `venv` when missing.

    A file lock makes concurrent callers (parallel test sessions, the quick start) wait for one installation.
    """
    venv = Path(venv).expanduser().resolve() if venv else default_venv()
    exe = venv / "bin" / "label-studio"
    if _installed_version(venv) == version:
        return exe
    venv.parent.mkdir(parents=True, exist_ok=True)
    lock_path = venv.parent / f".{venv.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_version(venv) == version:  # someone else finished while we waited
            return exe
        log.info("installing label-studio==%s into %s (first time only, about a minute)", version, venv)
        if not (venv / "bin" / "python").is_file():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
        # pip's own output (to stderr, so it never mixes with a caller's stdout) is the progress report
        proc = subprocess.run([*cmd, f"label-studio=={version}"], stdout=2, check=False)  # fd 2: stderr
        if proc.returncode != 0:
            raise LabelStudioServerError(
                f"pip install label-studio=={version} into {venv} failed (exit {proc.returncode}; pip's output is "
                "above): check the network or a package index (PIP_INDEX_URL)"
            )
    if _installed_version(venv) != version:
        raise LabelStudioServerError(f"{venv} does not hold label-studio=={version} after installation")
    return exe


def health(url: str, timeout: float = 2.0) -> bool:
    """True when `GET <url>/health` answers {"status": "UP"}."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200 and json.loads(resp.read() or b"{}").get("status") == "UP"
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _token_for(data_dir: Path, token: str | None) -> str:
    """The admin's API token: given, else the one saved in the data dir, else a new random 40-hex token (saved)."""
    path = data_dir / TOKEN_FILE
    if token:
        if not path.exists():
            path.write_text(token)
        return token
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    token = secrets.token_hex(20)
    path.write_text(token)
    path.chmod(0o600)
    return token


@dataclass
class LabelStudioServer:
    """A running Label Studio started by `start_label_studio` (the caller owns the process)."""

    url: str
    port: int
    api_key: str
    username: str
    password: str
    data_dir: Path
    document_root: Path
    log_path: Path
    process: subprocess.Popen = field(repr=False)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group (it forks workers), SIGKILL after `timeout`."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def env(self) -> dict[str, str]:
        """Environment variables a backend / script needs to talk to this server."""
        return {
            "LABEL_STUDIO_URL": self.url,
            "LABEL_STUDIO_API_KEY": self.api_key,
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
        }


def server_environment(
    *, data_dir: Path, document_root: Path, username: str, password: str, token: str
) -> dict[str, str]:
    """The environment Label Studio needs to start without prompts and to accept a backend on 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        LABEL_STUDIO_USERNAME=username,
        LABEL_STUDIO_PASSWORD=password,
        LABEL_STUDIO_USER_TOKEN=token,
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
        LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
        LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(document_root),
        SSRF_PROTECTION_ENABLED="false",
        ML_BLOCK_LOCAL_IP="false",
        # No outbound traffic from a test server: version check, analytics and error reporting off.
        LATEST_VERSION_CHECK="false",
        COLLECT_ANALYTICS="false",
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
    )
    return env


def start_label_studio(
    *,
    data_dir: str | Path,
    document_root: str | Path,
    port: int | None = None,
    username: str = DEFAULT_USERNAME,
    password: str = DEFAULT_PASSWORD,
    token: str | None = None,
    venv: str | Path | None = None,
    timeout: float = 240.0,
    extra_env: dict[str, str] | None = None,
) -> LabelStudioServer:
    """Start `label-studio start` on 127.0.0.1:port and return once GET /health answers UP.

    `data_dir` holds the SQLite database and uploads (reuse it for a ~4 s restart instead of ~30 s of migrations);
    `document_root` is where /data/local-files/?d= paths resolve. The server log goes to `data_dir/server.log`.

    Parameters: the keyword options are what ``label-studio start`` is given (data dir, document root, port, the
    admin user, password and token, the venv it runs from, its environment) plus the start-up timeout, passed by
    name by the quick start, the benchmarks and the tests.
    """
    exe = ensure_venv(venv)
    data_dir = Path(data_dir).expanduser().resolve()
    document_root = Path(document_root).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    document_root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    if health(url, timeout=1.0):
        raise LabelStudioServerError(f"something already answers on {url}; choose another --port")
    token = _token_for(data_dir, token)
    env = server_environment(
        data_dir=data_dir, document_root=document_root, username=username, password=password, token=token
    )
    env.update(extra_env or {})
    log_path = data_dir / "server.log"
    cmd = [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    log.info("starting Label Studio %s on %s (log: %s)", LABEL_STUDIO_VERSION, url, log_path)
    with open(log_path, "ab") as log_fh:
        proc = subprocess.Popen(
            cmd, env=env, cwd=data_dir, stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    server = LabelStudioServer(url, port, token, username, password, data_dir, document_root, log_path, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabelStudioServerError(
                f"Label Studio exited with code {proc.returncode} before answering /health; log tail:\n"
                f"{_tail(log_path)}"
            )
        if health(url):
            log.info("Label Studio is up at %s after %.0f s", url, timeout - (deadline - time.monotonic()))
            return server
        time.sleep(1.0)
    server.stop()
    raise LabelStudioServerError(f"Label Studio did not answer {url}/health within {timeout:.0f} s; log tail:\n"
                                 f"{_tail(log_path)}")  # fmt: skip


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--data-dir", default=str(REPO_ROOT / ".cache" / "label-studio-data"))
    parser.add_argument(
        "--document-root",
        default=os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT") or str(REPO_ROOT / ".cache" / "ls-files"),
        help="where /data/local-files/?d= paths resolve (default: LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)",
    )
    parser.add_argument("--username", default=DEFAULT_USERNAME)
    parser.add_argument("--password", default=DEFAULT_PASSWORD)
    parser.add_argument("--token", default=None, help="40 hex characters (default: saved in the data dir or new)")
    parser.add_argument("--venv", default=None, help="Label Studio's venv (default: LABEL_STUDIO_VENV)")
    parser.add_argument("--install-only", action="store_true", help="create the venv and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.install_only:
        print(ensure_venv(args.venv))
        return 0
    server = start_label_studio(
        data_dir=args.data_dir, document_root=args.document_root, port=args.port, username=args.username,
        password=args.password, token=args.token, venv=args.venv,
    )  # fmt: skip
    print(f"Label Studio: {server.url}  login: {server.username} / {server.password}  API token: {server.api_key}")
    stop = {"now": False}

    def _stop(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop["now"] and server.process.poll() is None:
            time.sleep(0.5)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
