"""Per-project record of annotation effort (issue 17.6): ``MODEL_DIR/projects/<id>/effort.jsonl``.

One JSON object per line and per (annotation id, ``updated_at``): the training job measures each submitted annotation
once against the pre-annotation it was made from (``labelstudio.effort``) and appends what it found; the status page
reads it. Label Studio stays the source of truth: the job re-reads every annotation and measures only the keys this
file lacks, so a lost or damaged file costs a re-measurement, never a wrong count. An annotation edited later gets a
new line (new ``updated_at``); ``latest`` keeps the newest per annotation.

Why append-only and not a rewritten JSON file: the record grows with every batch, and appending is one ``write``
(``O_APPEND``) of whole lines, fsynced. A crash mid-write can leave a torn last line: readers skip any line that is
not a JSON object (logged once per read), the next append starts on a fresh line, and the torn annotation, absent
from the keys, is measured again. Only the training job writes, under the project's training lock.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["EFFORT_FILE", "EffortLog", "effort_key"]

log = logging.getLogger(__name__)

EFFORT_FILE = "effort.jsonl"
_PROJECT_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


def effort_key(record: dict) -> tuple[str, str]:
    """(annotation id, updated_at): one measurement per version of an annotation."""
    return str(record.get("annotation")), str(record.get("updated_at") or "")


class EffortLog:
    """The effort records of one project (see the module docstring)."""

    def __init__(self, model_dir: str | Path, project_id: str | int) -> None:
        pid = str(project_id)
        if not _PROJECT_RE.match(pid):
            raise ValueError(f"invalid project id {project_id!r}: expected letters, digits, '_', '-' or '.'")
        self.project_id = pid
        self.path = Path(model_dir) / "projects" / pid / EFFORT_FILE

    def read(self) -> tuple[list[dict], int]:
        """(records in file order, number of unreadable lines skipped); no file = nothing measured yet."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], 0
        records: list[dict] = []
        bad = 0
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                rec = None
            if isinstance(rec, dict) and rec.get("annotation") is not None:
                records.append(rec)
            else:
                bad += 1
        if bad:
            log.warning("project %s: %d unreadable line(s) in %s skipped (their annotations are measured again)",
                        self.project_id, bad, self.path)  # fmt: skip
        return records, bad

    def measured_keys(self) -> set[tuple[str, str]]:
        """The (annotation id, updated_at) pairs already measured."""
        return {effort_key(r) for r in self.read()[0]}

    def latest(self) -> list[dict]:
        """The newest record of every annotation (by ``updated_at``; on a tie the later line), in file order."""
        best: dict[str, tuple[int, dict]] = {}
        for i, rec in enumerate(self.read()[0]):
            aid, updated = effort_key(rec)
            if aid not in best or updated >= effort_key(best[aid][1])[1]:
                best[aid] = (i, rec)
        return [rec for _, rec in sorted(best.values(), key=lambda item: item[0])]

    def append(self, records: Iterable[dict]) -> int:
        """Append the records whose key is not in the file yet (idempotent); returns how many were written."""
        known = self.measured_keys()
        lines: list[bytes] = []
        for rec in records:
            key = effort_key(rec)
            if key in known or rec.get("annotation") is None:
                continue
            known.add(key)
            lines.append(json.dumps(rec, allow_nan=False, sort_keys=True).encode("utf-8") + b"\n")
        if not lines:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"  # a crash left half a line: start a fresh one
            payload = (b"\n" if torn else b"") + b"".join(lines)
            written = os.write(fd, payload)
            if written != len(payload):
                raise OSError(f"short write to {self.path}: {written} of {len(payload)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)
        return len(lines)
