#!/usr/bin/env python
"""Thin wrapper of ``ml_backend.labelstudio.setup`` (the logic lives in the package)."""

from ml_backend.labelstudio.setup import main

if __name__ == "__main__":
    raise SystemExit(main())
