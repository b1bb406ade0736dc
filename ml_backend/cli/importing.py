"""``ml-backend import``: tile EM stacks into a Label Studio project (``labelstudio/importing.py``), then queue the
project's cold start when tasks were created (``enqueue_cold_start``: ``queue/scheduling.schedule_pretraining``).
The command composes the two, so that neither ``labelstudio/`` nor ``queue/`` imports the other.

    ml-backend import --project 1 --tile 256 path/to/stack.tif path/to/slices_folder/
    python -m ml_backend.cli.importing --project 1 path/to/stack.tif
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ml_backend.config import Settings
from ml_backend.labelstudio import importing

__all__ = ["enqueue_cold_start", "main"]

log = logging.getLogger("import_tiles")


def enqueue_cold_start(project_id: int, settings: Settings) -> dict[str, Any]:
    """Queue the project's cold start after an import (issue 11: ``ml_backend.jobs.pretrain_project`` pretrains the
    U-Net on the imported tiles and orders the first queue for coverage); PRETRAIN=false or no Redis: says so and
    the project works as before (hash-ordered first queue, first training from scratch)."""
    from ml_backend.queue.connection import QueueUnavailable  # local: queue/ loads torch and rq (`import --help`)
    from ml_backend.queue.scheduling import schedule_pretraining  # local: as above

    try:
        return schedule_pretraining(project_id, settings)
    except QueueUnavailable as exc:
        log.warning("project %s: pretraining not queued: %s", project_id, exc)
        return {"status": "unavailable", "error": str(exc)}


def main(argv: list[str] | None = None) -> int:
    return importing.main(argv, cold_start=enqueue_cold_start)


if __name__ == "__main__":
    sys.exit(main())
