#!/usr/bin/env python
"""Thin wrapper of ``ml_backend.benchmarks.load`` (the logic lives in the package): concurrent /predict and /webhook
against the real app under gunicorn with a real Redis.

    python scripts/bench_load.py                       # about 2 minutes
    python scripts/bench_load.py --duration 30 --predict-count 100 --webhook-count 2000
"""

from ml_backend.benchmarks.load import main

if __name__ == "__main__":
    raise SystemExit(main())
