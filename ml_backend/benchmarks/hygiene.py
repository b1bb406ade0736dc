"""Prediction hygiene benchmark: how long the Data Manager takes to list a project's tasks after ten rounds of
predictions, before and after deleting the older versions' predictions (``labelstudio.hygiene``).

A real Label Studio 1.23.2 (the test template database when present) gets ``--tasks`` small tasks and ``--rounds``
versions of predictions (bulk ``import_predictions``, a small RLE mask each, as the job delivers them); then the
listing is timed, the product's pruning runs (KEEP_PREDICTION_VERSIONS=1), and the listing is timed again:

* ``GET /api/tasks?project=..&page=1&page_size=30`` : the Data Manager's first page (what an annotator waits for);
* the same over every page of 100 (scrolling through the whole project);
* the SDK's ``tasks.list(fields="all")`` over every page (what the training job reads).

    python -m ml_backend.benchmarks.cli hygiene --tasks 2000 --rounds 10 --out benchmarks/hygiene.json

Results are saved after every phase; the Markdown table goes to ``benchmarks/hygiene.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.benchmarks.data import REPO
from ml_backend.config import Settings
from ml_backend.labelstudio.api import LabelStudioProject, as_dict, connect, list_tasks
from ml_backend.labelstudio.hygiene import prune_predictions
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.rle import mask_to_results
from ml_backend.services import label_studio as lss

log = logging.getLogger("bench_hygiene")

XML = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Mitochondria" background="#FF4D4D"/></BrushLabels>
</View>"""


def _start_server(work: Path) -> Any:
    template = REPO / ".cache" / f"label-studio-template-{lss.LABEL_STUDIO_VERSION}"
    data_dir = work / "data"
    if (template / "label_studio.sqlite3").is_file():
        shutil.copytree(template, data_dir)
    return lss.start_label_studio(data_dir=data_dir, document_root=work / "files", timeout=600)


def _timed(fn: Any, repeats: int) -> dict[str, float]:
    fn()  # warm-up (caches, connection), not timed
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def measure_listing(server: Any, ls: Any, pid: int, repeats: int) -> dict[str, Any]:
    """The three listings, each ``repeats`` times (median, min, max), and the response size of the first page."""
    import requests

    session = requests.Session()
    session.headers["Authorization"] = f"Token {server.api_key}"
    url = f"{server.url}/api/tasks"

    def first_page() -> int:
        resp = session.get(url, params={"project": pid, "page": 1, "page_size": 30}, timeout=600)
        resp.raise_for_status()
        return len(resp.content)

    def all_pages() -> None:
        page = 1
        while True:
            resp = session.get(url, params={"project": pid, "page": page, "page_size": 100}, timeout=600)
            if resp.status_code == 404:
                return
            resp.raise_for_status()
            tasks = resp.json().get("tasks", [])
            if len(tasks) < 100:
                return
            page += 1

    return {
        "dm_first_page_30": _timed(first_page, repeats),
        "dm_first_page_bytes": first_page(),
        "dm_all_pages_100": _timed(all_pages, repeats),
        "sdk_list_fields_all": _timed(lambda: list_tasks(ls, pid), max(1, repeats // 2)),
    }


def run(n_tasks: int, rounds: int, repeats: int, out: Path, tile: int = 64) -> dict[str, Any]:
    result: dict[str, Any] = {"tasks": n_tasks, "rounds": rounds, "tile": tile, "repeats": repeats}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))

    work = Path(tempfile.mkdtemp(prefix="bench-hygiene-"))
    server = _start_server(work)
    try:
        settings = Settings.from_env(label_studio_url=server.url, label_studio_api_key=server.api_key)
        ls = connect(settings)
        pid = int(as_dict(ls.projects.create(title="hygiene benchmark", label_config=XML))["id"])
        project = LabelStudioProject(pid, settings, ls)  # ProjectData: predictions, counts, a fresh task list
        ids: list[int] = []
        for start in range(0, n_tasks, 500):
            batch = [{"image": f"/data/upload/t{i}.png"} for i in range(start, min(n_tasks, start + 500))]
            ids += [int(t) for t in as_dict(ls.projects.import_tasks(id=pid, request=batch, return_task_ids=True))[
                "task_ids"]]  # fmt: skip
        config = parse_label_config(XML)
        rng = np.random.default_rng(0)
        t_push = 0.0
        for r in range(1, rounds + 1):
            version = f"v{r:04d}"
            preds = []
            for tid in ids:
                mask = np.zeros((tile, tile), dtype=np.int64)
                y, x = rng.integers(0, tile // 2, size=2)
                mask[y : y + tile // 4, x : x + tile // 3] = 1
                preds.append({"task": tid, "result": mask_to_results(mask, config), "score": float(rng.random()),
                              "model_version": version})  # fmt: skip
            t0 = time.perf_counter()
            project.push_predictions(preds)
            t_push += time.perf_counter() - t0
            log.info("round %d/%d: %d predictions pushed", r, rounds, len(preds))
        ls.projects.update(id=pid, model_version=f"v{rounds:04d}")
        result["push_s"] = t_push
        result["predictions_before"] = sum(project.counts().values())
        result["before"] = measure_listing(server, ls, pid, repeats)
        save()
        log.info("before hygiene: %s", result["before"])
        tasks = project.read_tasks()
        t0 = time.perf_counter()
        # every old prediction, by id, in this one pruning (the per-round budget would leave some to later rounds)
        report = prune_predictions(ls, pid, f"v{rounds:04d}", tasks, set(ids), keep=1, max_deletes=n_tasks * rounds)
        result["hygiene_s"] = time.perf_counter() - t0
        result["hygiene_calls"] = report.calls
        result["deleted"] = report.deleted
        result["predictions_after"] = sum(project.counts().values())
        result["after"] = measure_listing(server, ls, pid, repeats)
        save()
        log.info("after hygiene: %s", result["after"])
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return result


def markdown(r: dict[str, Any], command: str) -> str:
    rows = [
        ("Data Manager first page (30 tasks)", "dm_first_page_30"),
        ("Data Manager, every page of 100", "dm_all_pages_100"),
        ('SDK `tasks.list(fields="all")`, every page', "sdk_list_fields_all"),
    ]
    lines = [
        "# Prediction hygiene: listing tasks before and after",
        "",
        f"{r['tasks']} tasks, {r['rounds']} rounds of predictions ({r['tile']} x {r['tile']} RLE brush masks), "
        f"real Label Studio 1.23.2 (SQLite), median of {r['repeats']} listings.",
        "",
        f"Command: `{command}`",
        "",
        "| listing | before (s) | after (s) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for name, key in rows:
        b, a = r["before"][key]["median_s"], r["after"][key]["median_s"]
        lines.append(f"| {name} | {b:.3f} | {a:.3f} | {b / a:.1f}x |")
    lines += [
        "",
        f"- predictions in the project: {r['predictions_before']} before, {r['predictions_after']} after "
        f"({r['deleted']} deleted in {r['hygiene_calls']} API calls, {r['hygiene_s']:.1f} s);",
        f"- first page response: {r['before']['dm_first_page_bytes'] / 1024:.0f} KiB before, "
        f"{r['after']['dm_first_page_bytes'] / 1024:.0f} KiB after;",
        f"- pushing the {r['rounds']} rounds took {r['push_s']:.0f} s in bulk `import_predictions` calls.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "hygiene.json")
    ap.add_argument("--markdown", type=Path, default=REPO / "benchmarks" / "hygiene.md")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    r = run(a.tasks, a.rounds, a.repeats, a.out)
    command = f"python -m ml_backend.benchmarks.cli hygiene --tasks {a.tasks} --rounds {a.rounds} --repeats {a.repeats}"
    a.markdown.write_text(markdown(r, command))
    print(a.markdown.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
