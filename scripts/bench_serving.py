#!/usr/bin/env python
"""Thin wrapper of ``ml_backend.benchmarks.serving`` (the logic lives in the package).

scripts/bench_load.py loads this file and uses PROJECT_ID, _free_port, _machine and _model from it.
"""

from ml_backend.benchmarks.serving import PROJECT_ID, _free_port, _machine, _model, main

__all__ = ["PROJECT_ID", "_free_port", "_machine", "_model", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
