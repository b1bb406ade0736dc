"""Compatibility shim: atomic writes live in ``ml_backend.store.atomic``."""

from ml_backend.store.atomic import fsync_dir, write_atomic

__all__ = ["fsync_dir", "write_atomic"]
