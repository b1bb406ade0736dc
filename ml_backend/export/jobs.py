"""Export chunks as RQ jobs on the backend's workers (``ml-backend export --executor rq``).

Why RQ and not a scheduler of our own: the workers that train and re-score already run everywhere the backend
does, RQ hands each chunk to one idle worker, and a killed worker's job is re-run (``worker.RecoveringWorker``).
A chunk job is ``run.predict_chunk`` on a work directory every worker can reach (a shared file system): it skips a
chunk already done, so a re-queued or duplicated job costs nothing, and an interrupted export resumes from the
chunks on disk. The driver only enqueues the missing chunks and waits; merging and writing stay with it.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from ml_backend.config import get_settings
from ml_backend.queue.connection import get_connection, get_queue

from .run import ExportError, predict_chunk
from .source import ExportInputError

EXPORT_FUNC = "ml_backend.export.jobs.export_chunk"
JOB_TIMEOUT_S = 6 * 3600
POLL_S = 0.5


def export_chunk(work: str, index: int) -> dict:
    """RQ entry point: stage 2 of one chunk (JSON arguments only)."""
    did = predict_chunk(Path(work), int(index))
    return {"chunk": int(index), "computed": did}


def _job_id(work: Path, j: int) -> str:
    return f"export-{hashlib.sha1(str(work).encode()).hexdigest()[:12]}-{j:05d}"


def run_chunks_on_rq(work: Path, todo: list[int], settings: Any, *, progress: bool = True) -> None:
    """Enqueue the chunks ``todo`` and wait for all of them; a failed chunk fails the export with its error."""
    from rq.job import Job, JobStatus
    from tqdm.auto import tqdm

    if settings is None:
        settings = get_settings()
    conn = get_connection(settings.redis_url, socket_timeout=10.0)
    queue = get_queue(settings, conn)
    jobs = []
    for j in todo:
        job_id = _job_id(work, j)
        try:
            old = Job.fetch(job_id, connection=conn, serializer=queue.serializer)
            status = old.get_status()
        except Exception:  # no such job (expired or never queued)
            old, status = None, None
        if old is not None and status in (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED):
            jobs.append(old)  # an earlier driver's job still runs it: wait for that one
            continue
        if old is not None:
            old.delete()
        job = queue.enqueue(EXPORT_FUNC, str(work), j, job_id=job_id, job_timeout=JOB_TIMEOUT_S, result_ttl=3600,
                            failure_ttl=24 * 3600, description=f"export chunk {j} of {work}")  # fmt: skip
        jobs.append(job)
    pending = {job.id: job for job in jobs}
    with tqdm(total=len(jobs), desc="export chunks (rq)", unit="chunk", disable=not progress) as bar:
        while pending:
            for job_id, job in list(pending.items()):
                status = job.get_status(refresh=True)
                if status == JobStatus.FINISHED:
                    del pending[job_id]
                    bar.update(1)
                elif status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED, None):
                    result = job.latest_result()
                    text = (getattr(result, "exc_string", None) or str(status)).strip().splitlines()[-1]
                    if "ExportInputError" in text:
                        raise ExportInputError(f"chunk job {job_id}: {text}")
                    raise ExportError(f"chunk job {job_id} failed: {text}; run the export again to resume")
            if pending:
                time.sleep(POLL_S)
