#!/usr/bin/env python
"""Simulated active learning benchmark: a thin wrapper of ``ml-backend benchmark`` (``ml_backend.benchmarks``)."""

from ml_backend.benchmarks.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
