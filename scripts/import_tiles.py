#!/usr/bin/env python
"""Thin wrapper of ``ml_backend.cli.importing`` (``ml-backend import``; the logic lives in the package)."""

from ml_backend.cli.importing import main

if __name__ == "__main__":
    raise SystemExit(main())
