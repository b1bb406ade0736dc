#!/usr/bin/env python
"""Thin wrapper of ``ml_backend.benchmarks.serving`` (the logic lives in the package)."""

from ml_backend.benchmarks.serving import main

if __name__ == "__main__":
    raise SystemExit(main())
