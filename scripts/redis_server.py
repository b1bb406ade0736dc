#!/usr/bin/env python
"""Thin wrapper of ``ml_backend.services.redis`` (the logic lives in the package)."""

from ml_backend.services.redis import find_redis_server, free_port, main, start_redis, stop_redis

__all__ = ["find_redis_server", "free_port", "main", "start_redis", "stop_redis"]  # scripts that load this file

if __name__ == "__main__":
    raise SystemExit(main())
