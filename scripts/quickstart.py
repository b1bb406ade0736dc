#!/usr/bin/env python
"""Thin wrapper of ``ml_backend.quickstart`` (the logic lives in the package)."""

from ml_backend.quickstart import main

if __name__ == "__main__":
    raise SystemExit(main())
