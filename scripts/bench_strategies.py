#!/usr/bin/env python
"""Thin wrapper of ``ml_backend.benchmarks.strategies`` (the logic lives in the package)."""

from ml_backend.benchmarks.strategies import main

if __name__ == "__main__":
    raise SystemExit(main())
