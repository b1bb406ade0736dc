"""Optional HTTP basic auth, as Label Studio sends it for a backend connected with auth_method="BASIC_AUTH".

Enabled when BASIC_AUTH_USER is set (with BASIC_AUTH_PASS: ``Settings`` refuses a user without a password, so the
process does not start). Every route needs the credentials except plain ``/health`` (and ``/``), so liveness probes
and Label Studio's unauthenticated 1 s health check need no secret; it reveals nothing but "UP".
``/health?details=...`` (model directory, device, strategy) needs them. Credentials are compared in constant time.
"""

from __future__ import annotations

import hmac

from flask import Request

__all__ = ["OPEN_PATHS", "check_basic_auth", "details_requested"]

OPEN_PATHS = frozenset({"/health", "/"})


def details_requested(request: Request) -> bool:
    """Whether a health check asks for deployment details (any ``details`` query parameter but 0/false/no)."""
    if "details" not in request.args:
        return False
    return request.args.get("details", "").strip().lower() not in ("0", "false", "no")


def check_basic_auth(request: Request, expected: tuple[str, str] | None) -> bool:
    """True when auth is off, the request is a plain health check, or it carries the expected user and password."""
    if expected is None:
        return True
    if request.path in OPEN_PATHS and request.method in ("GET", "HEAD") and "details" not in request.args:
        return True
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return False
    user_ok = hmac.compare_digest((auth.username or "").encode(), expected[0].encode())
    pass_ok = hmac.compare_digest((auth.password or "").encode(), expected[1].encode())
    return user_ok and pass_ok
