"""The one polling helper of the test suite: wait for a condition, never assert a duration.

Every limit is a generous upper bound on a *failure*, not an expectation about speed: a loaded CI machine makes a
test slower, never red. ``TEST_TIMEOUT_SCALE`` (default 3) multiplies every limit, so a machine that is busier
still can raise it without touching the tests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def timeout_scale() -> float:
    """The factor applied to every wait of the suite (``TEST_TIMEOUT_SCALE``, default 3)."""
    try:
        return max(float(os.environ.get("TEST_TIMEOUT_SCALE", "3")), 1.0)
    except ValueError:
        return 3.0


def scaled(seconds: float) -> float:
    """``seconds`` times the suite's timeout scale (for subprocess and event waits)."""
    return seconds * timeout_scale()


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    poll: float = 0.5,
    logs: Callable[[], Any] | None = None,
) -> T:
    """The first truthy value of ``predicate()`` within ``scaled(timeout)`` s, else fail naming ``what`` (+ logs)."""
    limit = scaled(timeout)
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(poll)
    pytest.fail(f"timed out after {limit:.0f} s waiting for {what}\n{logs() if logs else ''}")
