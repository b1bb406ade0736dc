#!/usr/bin/env python
"""Thin wrapper of ``ml_backend.benchmarks.speed`` (the logic lives in the package): matmul ceiling, FLOPs per
megapixel, forward / predict / re-scoring / training throughput as fractions of it, int8 IoU change."""

from ml_backend.benchmarks.speed import main

if __name__ == "__main__":
    raise SystemExit(main())
