"""Helpers of the fault tests (imported as ``fault_helpers``; fixtures live in this folder's conftest.py)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from ml_backend.labelstudio.client import as_dict

REPO = Path(__file__).resolve().parents[2]
TILE = 64
DENSE = (REPO / "label_config" / "dense.xml").read_text()

# A small but real training job: a few seconds of CPU per version on this 2-core machine.
TRAIN_ENV = {
    "TRAIN_BATCH_SIZE": "4",
    "TRAIN_STEPS": "30",
    "TRAIN_CROP": "64",
    "MODEL_WIDTH": "8",
    "MODEL_DEPTH": "3",
    "RESCORE_CHUNK": "6",
    "STRATEGY": "entropy",
    "AUDIT_FRACTION": "0",  # these tests count every annotation as a training tile (audit split: tests/active_learning)
}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, *, poll: float = 0.5, logs=None) -> Any:
    """The first truthy value of ``predicate()`` within ``timeout`` s, else fail naming ``what`` (+ logs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs() if logs else ''}")


def job_meta(conn: redis.Redis, job_id: str) -> dict:
    """A job's meta straight from its Redis hash (cheap enough to poll every few ms)."""
    raw = conn.hget(f"rq:job:{job_id}", "meta")
    if not raw:
        return {}
    with contextlib.suppress(ValueError):
        return json.loads(raw)
    return {}


def as_project(ls: Any, pid: int) -> dict:
    return as_dict(ls.projects.get(id=pid))
