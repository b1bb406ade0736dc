#!/usr/bin/env python
"""Thin wrapper of ``ml_backend.benchmarks.experiments`` (the logic lives in the package): issue 11's cold start with
20 initial tiles, with and without SSL pretraining and coverage ordering.

    python scripts/experiments_issue11.py --data vnc --seeds 0,1,2 --workers 2 --out /tmp/issue11
    python scripts/experiments_issue11.py --data isotropic --seeds 0,1,2 --out /tmp/issue11
"""

from ml_backend.benchmarks.experiments import main

if __name__ == "__main__":
    raise SystemExit(main())
