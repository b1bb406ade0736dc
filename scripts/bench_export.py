#!/usr/bin/env python
"""Thin wrapper of ``ml_backend.benchmarks.export`` (the logic lives in the package)."""

from ml_backend.benchmarks.export import main

if __name__ == "__main__":
    raise SystemExit(main())
