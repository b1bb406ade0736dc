"""Optional HTTP basic auth, as Label Studio sends it for a backend connected with auth_method="BASIC_AUTH".

Enabled when BASIC_AUTH_USER is set. ``/health`` stays open so liveness probes (Docker, load balancers) need no
secret; it reveals nothing but "UP". Credentials are compared in constant time.
"""

from __future__ import annotations

import hmac

from flask import Request

__all__ = ["OPEN_PATHS", "check_basic_auth"]

OPEN_PATHS = frozenset({"/health", "/"})


def check_basic_auth(request: Request, expected: tuple[str, str] | None) -> bool:
    """True when auth is off, the path is open, or the request carries the expected user and password."""
    if expected is None or request.path in OPEN_PATHS:
        return True
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return False
    user_ok = hmac.compare_digest((auth.username or "").encode(), expected[0].encode())
    pass_ok = hmac.compare_digest((auth.password or "").encode(), expected[1].encode())
    return user_ok and pass_ok
