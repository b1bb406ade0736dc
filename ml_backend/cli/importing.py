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


def enqueue_cold_start(project_id: int, settings: Settings, ls: Any = None) -> dict[str, Any]:
    """Queue the project's cold start after an import (issue 11: ``ml_backend.jobs.pretrain_project`` pretrains the
    U-Net on the imported tiles, publishes a position-spread first queue, then orders it for coverage). With
    PRETRAIN=false (the default since issue 17) no job runs, so the spread queue is published here at once when
    ``ls`` (the command's client) is given: the first batch is spread over the stack either way. No Redis: says so
    and the project works as before (hash-ordered first queue, first training from scratch)."""
    from ml_backend.queue.connection import QueueUnavailable  # local: queue/ loads torch and rq (`import --help`)
    from ml_backend.queue.scheduling import schedule_pretraining  # local: as above

    try:
        queued = schedule_pretraining(project_id, settings)
    except QueueUnavailable as exc:
        log.warning("project %s: pretraining not queued: %s", project_id, exc)
        return {"status": "unavailable", "error": str(exc)}
    if queued["status"] == "disabled" and ls is not None:
        from ml_backend.jobs.pretrain import publish_spread_queue  # local: jobs/ loads torch (`import --help`)

        spread = publish_spread_queue(ls, project_id, settings)
        return {**queued, "status": f"pretraining off; first queue spread over the stack ({spread.get('queued', 0)} "
                f"tasks)", "first": spread.get("first") or []}  # fmt: skip
    return queued


def main(argv: list[str] | None = None) -> int:
    return importing.main(argv, cold_start=enqueue_cold_start)


if __name__ == "__main__":
    sys.exit(main())
