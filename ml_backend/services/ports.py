"""Free TCP ports on 127.0.0.1 (one copy for the quick start, the service starters and the tests)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (free when asked; a service started right after gets it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
