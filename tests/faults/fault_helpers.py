"""Helpers of the fault tests (imported as ``fault_helpers``; fixtures live in this folder's conftest.py)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import redis
from waiting import wait_until

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


wait_for = wait_until  # the suite's one polling helper (tests/waiting.py)


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
