"""Logging inside RQ workers."""

from __future__ import annotations

import logging


def ensure_logging() -> None:
    """`rq worker` configures only its own logger: give the backend's loggers a handler so training progress shows
    in the worker's output (unless the application configured logging itself)."""
    pkg = logging.getLogger("ml_backend")
    if logging.getLogger().handlers or pkg.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
