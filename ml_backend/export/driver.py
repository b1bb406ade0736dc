"""The whole-stack export's driver: ``export_stack`` runs the stages of ``run`` (prepare, stage 2 per chunk in this
process or as RQ jobs through ``jobs.run_chunks_on_rq``, merge, relabel, finalize), resuming an interrupted export.
It sits above both: ``jobs`` runs ``run.predict_chunk`` on the workers, ``run`` knows nothing of RQ.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.store.atomic import write_atomic

from . import run
from .jobs import run_chunks_on_rq

__all__ = ["export_stack"]

log = run.log  # the export's one logger (ml_backend.export.run), as before the driver had its own module


def export_stack(
    stack: str | Path,
    output: str | Path,
    *,
    executor: str = "local",
    progress: bool = True,
    settings: Any = None,
    **prepare_options: Any,
) -> dict[str, Any]:
    """Run every stage (resuming an interrupted export of the same plan); returns the manifest."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out = Path(output).expanduser().resolve()
    work, plan, source = run.prepare(stack, out, **prepare_options)
    with run.guarded_writes(work):
        todo = [j for j in range(plan.n_chunks) if not run.chunk_file(work, j, "objects.npz").is_file()]
        t_pred = time.perf_counter()
        if executor == "rq":
            run_chunks_on_rq(work, todo, settings, progress=progress)
        elif executor == "local":
            with tqdm(total=sum(np.diff(plan.chunk_range(j))[0] for j in todo), desc="exporting slices",
                      unit="slice", disable=not progress) as bar:  # fmt: skip
                for j in todo:
                    run.predict_chunk(work, j, progress=bar.update, source=source)
        else:
            raise run.ExportError(f"executor must be local or rq, got {executor!r}")
        t_merge = time.perf_counter()
        table = run.merge(work)
        for j in range(plan.n_chunks):
            run.relabel_chunk(work, j)
        timing = {"predict_s": round(t_merge - t_pred, 3), "total_s": None}
        out = run.finalize(work, extra_manifest={"timing": timing, "resumed_chunks": plan.n_chunks - len(todo)})
    timing["total_s"] = round(time.perf_counter() - t0, 3)
    manifest = json.loads((out / "export.json").read_text())
    manifest["timing"] = timing
    write_atomic(out / "export.json", json.dumps(manifest, indent=2, sort_keys=True))
    log.info("exported %s: %d objects in %s", plan.stack, len(table), out)
    return manifest
