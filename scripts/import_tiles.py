#!/usr/bin/env python
"""Thin wrapper of ``ml_backend.labelstudio.importing`` (the logic lives in the package)."""

from ml_backend.labelstudio.importing import main

if __name__ == "__main__":
    raise SystemExit(main())
