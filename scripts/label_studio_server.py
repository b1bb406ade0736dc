#!/usr/bin/env python
"""Thin wrapper of ``ml_backend.services.label_studio`` (the logic lives in the package)."""

from ml_backend.services.label_studio import main

if __name__ == "__main__":
    raise SystemExit(main())
