"""Atomic file writes for ``store/`` and its users: the helpers live in ``ml_backend.data.atomic`` (below ``model/``,
whose checkpoint writer uses them too; issue 19: no model -> store import)."""

from ml_backend.data.atomic import fsync_dir, open_atomic, write_atomic

__all__ = ["fsync_dir", "open_atomic", "write_atomic"]
