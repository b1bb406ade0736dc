"""Compatibility shim: atomic writes live in ``ml_backend.store.atomic``."""

from ml_backend.store.atomic import fsync_dir, open_atomic, write_atomic

__all__ = ["fsync_dir", "open_atomic", "write_atomic"]
