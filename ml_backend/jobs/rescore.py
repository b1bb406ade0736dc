"""RQ entry point ``rescore_chunk``: a helper job that scores one chunk of a project's pool (see
``ml_backend.queue.rescoring``)."""

from __future__ import annotations

import json
import uuid

from ml_backend.config import get_settings, torch_device
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.project_data import ChunkInputs
from ml_backend.queue.coordination import redis_for_job
from ml_backend.queue.keys import chunk_id, rescore_claim_key, rescore_ctx_key
from ml_backend.queue.rescoring import RescoreJob, claim_chunk, compute_chunk
from ml_backend.store.registry import ModelRegistry

from .logs import ensure_logging


def rescore_chunk(project_id: int, version: str, task_ids: list[int]) -> dict:
    """RQ helper job: score one chunk of the pool for ``version`` if nobody has claimed it yet.

    The coordinating ``train_project`` job stored the chunk's context (strategy, image URLs) in Redis and collects
    the result; a helper that finds the chunk taken (or the round over) returns at once.
    """
    from rq import get_current_job

    ensure_logging()
    settings = get_settings()
    pid = int(project_id)
    ids = [int(t) for t in task_ids]
    job = get_current_job()
    conn = redis_for_job(job, settings)
    raw = conn.get(rescore_ctx_key(pid, version))
    if raw is None:
        return {"status": "expired", "project": pid, "version": version}
    ctx = json.loads(raw)
    chunk = chunk_id(ids)
    owner = job.id if job is not None else f"local-{uuid.uuid4().hex[:8]}"
    if not claim_chunk(conn, pid, version, chunk, owner):
        return {"status": "taken", "project": pid, "chunk": chunk}
    try:
        registry = ModelRegistry(settings.model_dir, pid)
        device = torch_device(settings.device)
        model, _meta = registry.load(version, map_location=device)
        ensemble = [registry.load_extra(version, name, map_location=device) for name in ctx.get("ensemble", [])]
        inputs = ChunkInputs(parse_label_config(ctx["label_config"]), settings)  # the loaders queue/ is handed
        target = RescoreJob(pid, version, ctx["label_config"], inputs, settings, conn)
        compute_chunk(target, ids, ctx, model, ensemble, owner=owner)
    except BaseException:
        conn.delete(rescore_claim_key(pid, version, chunk))  # let the coordinator redo it now
        raise
    return {"status": "scored", "project": pid, "chunk": chunk, "tasks": len(ids)}
