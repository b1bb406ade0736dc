"""Test-only RQ job functions, imported by real `rq worker` processes (tests put this folder on PYTHONPATH)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def slow_marker(path: str, seconds: float) -> dict:
    """Append "start <pid>", sleep, append "done <pid>": the file shows how often the job ran and finished."""
    marker = Path(path)
    with marker.open("a") as fh:
        fh.write(f"start {os.getpid()}\n")
    time.sleep(float(seconds))
    with marker.open("a") as fh:
        fh.write(f"done {os.getpid()}\n")
    return {"pid": os.getpid()}
