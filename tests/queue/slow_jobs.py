"""Test-only RQ job functions, imported by real `rq worker` processes that tests start in this folder (`rq worker`
imports job modules from its working directory: its --path defaults to ".")."""

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


def gated_marker(path: str, gate: str, limit_s: float) -> dict:
    """Append "start <pid>", wait until the file ``gate`` exists (at most ``limit_s``), append "done <pid>".

    A test opens the gate only once Redis is back, so the job is surely running through the whole outage.
    """
    marker = Path(path)
    with marker.open("a") as fh:
        fh.write(f"start {os.getpid()}\n")
    deadline = time.monotonic() + float(limit_s)
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    with marker.open("a") as fh:
        fh.write(f"done {os.getpid()}\n")
    return {"pid": os.getpid()}
