"""Atomic file writes: a reader (another gunicorn worker, a crashed-and-restarted job) sees the old file or the new
one, never half of one. Used for checkpoints, model pointers, per-project state and the media cache (``store.atomic``
re-exports these helpers)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make a rename durable: fsync the directory that holds the entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_atomic(path: Path, *, durable: bool = False) -> Iterator[BinaryIO]:
    """A binary file handle on a temporary sibling of ``path``, renamed over ``path`` when the block succeeds (removed
    when it fails): for writers that stream (``torch.save``).

    durable=True also fsyncs the file and its directory (the registry's CURRENT pointer must survive a power cut);
    caches skip that cost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes | str, *, durable: bool = False) -> None:
    """Write ``data`` to a temporary sibling, then `os.replace` it over ``path`` (see ``open_atomic``)."""
    with open_atomic(path, durable=durable) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
