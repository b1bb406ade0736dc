#!/usr/bin/env python
"""Thin wrapper of ``ml_backend.benchmarks.round_cost`` (the logic lives in the package)."""

from ml_backend.benchmarks.round_cost import main

if __name__ == "__main__":
    raise SystemExit(main())
