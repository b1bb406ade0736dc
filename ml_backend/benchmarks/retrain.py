"""Benchmark the retraining loop: from the batch-completing webhook to "every unlabelled task holds a prediction of
the new version", split into training, scoring and upload, plus training throughput (tiles/s).

Real components: a real Redis (scripts/redis_server.py), a real Label Studio 1.23.2 (scripts/label_studio_server.py),
a real `rq worker` process (`python -m ml_backend.cli worker`) running `ml_backend.jobs.train_project`. The webhook
is delivered in-process through `ml_backend.queue.handle_webhook` (exactly what the backend's POST /webhook calls),
so the clock starts at the moment the batch-completing event is handled.

    python scripts/bench_retrain.py --tiles 200 --size 256 --batch 20 --rounds 2 --out benchmarks/results/retrain.json

Round 1 trains from scratch on the first batch; later rounds annotate the first `batch` tasks of the re-ordered
queue (lowest prediction score of the current version, as Label Studio would serve them) and fine-tune.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ml_backend import queue as q
from ml_backend.benchmarks.machine import describe
from ml_backend.config import Settings
from ml_backend.data.synthetic import generate_em_like
from ml_backend.labelstudio.api import as_dict, connect, ensure_local_storage, latest_annotations, list_tasks
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.rle import mask_to_results
from ml_backend.services import label_studio as ls_script
from ml_backend.services import redis as redis_script

REPO = Path(__file__).resolve().parents[2]

log = logging.getLogger("bench_retrain")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def machine() -> dict:
    return describe()


def write_tiles(root: Path, n: int, size: int, seed: int):
    """Generated EM-like tiles as PNG files under the Label Studio document root; returns (names, ground truth)."""
    from PIL import Image

    raw, gt = generate_em_like(n, size=size, seed=seed)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i, tile in enumerate(raw):
        name = f"tile_{i:04d}.png"
        Image.fromarray(tile).save(root / name)
        names.append(name)
    return names, gt


def webhook_payload(pid: int, task_id: int, annotation: dict) -> dict:
    """What Label Studio posts for a submitted annotation."""
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": pid},
        "task": {"id": task_id, "project": pid},
        "annotation": {"id": annotation.get("id"), "task": task_id, "was_cancelled": False},
    }


def predictions_of(ls, pid: int, version: str) -> dict[int, float]:
    """{task id: score} of every prediction of `version` in the project."""
    out = {}
    for task in list_tasks(ls, pid):
        for pred in task.get("predictions") or []:
            pred = as_dict(pred) if not isinstance(pred, dict) else pred
            if pred.get("model_version") == version:
                out[int(task["id"])] = float(pred.get("score") or 0.0)
    return out


def run(args: argparse.Namespace) -> dict:
    import redis
    from rq.job import Job
    from rq.serializers import JSONSerializer

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    info: dict = {"machine": machine(), "args": vars(args), "started": datetime.now(timezone.utc).isoformat()}
    procs = []
    redis_port = redis_script.free_port()
    redis_proc = redis_script.start_redis(redis_port, work / "redis")
    ls_server = None
    try:
        ls_server = ls_script.start_label_studio(
            data_dir=work / "label-studio", document_root=work / "files", venv=args.ls_venv
        )
        names, gt = write_tiles(work / "files" / "tiles", args.tiles, args.size, args.seed)
        xml = (REPO / "label_config" / "dense.xml").read_text()
        config = parse_label_config(xml)
        env = {
            **os.environ,
            **ls_server.env(),
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "MODEL_DIR": str(work / "models"),
            "TRAIN_BATCH_SIZE": str(args.batch),
            "TRAIN_STEPS": str(args.steps),
            "TRAIN_TIME_BUDGET_S": str(args.budget),
            "MODEL_WIDTH": str(args.width),
            "MODEL_DEPTH": str(args.depth),
            "STRATEGY": args.strategy,
            "RESCORE_CHUNK": str(args.chunk),
            "DEVICE": args.device,
            "OMP_NUM_THREADS": str(args.threads),  # torch's intra-op threads in the worker
        }
        settings = Settings.from_env(
            redis_url=env["REDIS_URL"], model_dir=Path(env["MODEL_DIR"]), train_batch_size=args.batch,
            label_studio_url=ls_server.url, label_studio_api_key=ls_server.api_key,
        )  # fmt: skip
        ls = connect(settings)
        project = ls.projects.create(title=f"bench-retrain-{int(time.time())}", label_config=xml)
        pid = int(project.id)
        ensure_local_storage(ls, pid, str(work / "files" / "tiles"))
        tasks = [{"data": {config.image_key: f"/data/local-files/?d=tiles/{name}"}} for name in names]
        created = ls.projects.import_tasks(id=pid, request=tasks, return_task_ids=True)
        task_ids = sorted(int(t) for t in created.task_ids)
        index_of = {tid: i for i, tid in enumerate(task_ids)}  # tasks were imported in tile order
        log.info("project %d: %d tasks imported", pid, len(task_ids))

        for i in range(args.workers):
            log_fh = open(work / f"worker-{i}.log", "ab")  # noqa: SIM115 - lives as long as the worker
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "ml_backend.cli", "worker", "--name", f"bench-{i}-{os.getpid()}"],
                    env=env,
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                )  # fmt: skip
            )
        conn = redis.Redis.from_url(env["REDIS_URL"])
        rounds = []
        version = None
        for r in range(args.rounds):
            labelled = set(latest_annotations(list_tasks(ls, pid)))
            if version is None:
                chosen = [t for t in task_ids if t not in labelled][: args.batch]
            else:  # the queue as Label Studio serves it: lowest score of the current version first
                scores = predictions_of(ls, pid, version)
                chosen = sorted((t for t in scores if t not in labelled), key=lambda t: scores[t])[: args.batch]
            annotations = []
            for tid in chosen:
                result = mask_to_results(gt[index_of[tid]].astype("int64"), config)
                annotations.append((tid, ls.annotations.create(id=tid, result=result)))
            latencies = []
            for k, (tid, ann) in enumerate(annotations):
                payload = webhook_payload(pid, tid, {"id": ann.id})
                if k == len(annotations) - 1:
                    t0_wall = time.time()
                t1 = time.perf_counter()
                answer = q.handle_webhook(payload, settings)
                latencies.append(time.perf_counter() - t1)
            assert answer["status"] == "queued", answer
            job_id = answer["job_id"]
            log.info("round %d: batch of %d annotations -> job %s", r + 1, len(annotations), job_id)
            while True:
                job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
                status = job.get_status()
                if status in ("finished", "failed", "stopped", "canceled"):
                    break
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"a worker died; see {work}/worker-*.log")
                time.sleep(0.5)
            if status != "finished":
                raise RuntimeError(f"training job {job_id} ended {status}: {job.exc_info}")
            summary = job.return_value()
            t_done = job.ended_at.replace(tzinfo=timezone.utc).timestamp()
            version = summary["version"]
            unlabelled = [t for t in task_ids if t not in labelled and t not in chosen]
            have = predictions_of(ls, pid, version)
            missing = [t for t in unlabelled if t not in have]
            # CANDIDATE_POOL (issue 20.2): the job scores a sample; the other tasks keep their older prediction
            scored = int((summary.get("candidates") or {}).get("scored") or len(unlabelled))
            project_version = ls.projects.get(id=pid).model_version
            timings = summary.get("timings", {})
            rounds.append(
                {
                    "round": r + 1,
                    "version": version,
                    "annotations": summary.get("n_annotations"),
                    "unlabelled_tasks": len(unlabelled),
                    "predictions_of_new_version": len(have),
                    "missing_predictions": len(missing),
                    "scored_tasks": scored,
                    "project_model_version_set": project_version == version,
                    "webhook_to_all_predictions_s": round(t_done - t0_wall, 2),
                    "queue_wait_s": round(job.started_at.replace(tzinfo=timezone.utc).timestamp() - t0_wall, 2),
                    "read_s": timings.get("read_s"),
                    "train_s": timings.get("train_s"),
                    "score_s": timings.get("score_s"),
                    "upload_s": timings.get("upload_s"),
                    "train_tiles_per_s": round(summary.get("train_tiles_per_s") or 0.0, 2),
                    "score_tiles_per_s": round(min(scored, len(unlabelled)) / timings["score_s"], 2)
                    if timings.get("score_s")
                    else None,
                    "val_iou": (summary.get("metrics") or {}).get("val_iou"),
                    "webhook_ms_median": round(sorted(latencies)[len(latencies) // 2] * 1e3, 2),
                    "webhook_ms_max": round(max(latencies) * 1e3, 2),
                }
            )
            meta = json.loads(
                (work / "models" / "projects" / str(pid) / "versions" / version / "meta.json").read_text()
            )
            rounds[-1]["steps_done"] = meta.get("steps")
            rounds[-1]["stopped_by"] = (meta.get("metrics") or {}).get("stopped")
            log.info("round %d: %s", r + 1, json.dumps(rounds[-1]))
            age = work / "models" / "projects" / str(pid) / "prediction_age.json"
            rounds[-1]["prediction_age"] = json.loads(age.read_text())["ages"] if age.is_file() else None
            if len(unlabelled) - len(missing) != min(scored, len(unlabelled)):
                raise RuntimeError(f"{len(missing)} unlabelled tasks lack a prediction of {version} ({scored} scored)")
        info["rounds"] = rounds
        info["project"] = pid
        return info
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        if ls_server is not None:
            ls_server.stop()
        redis_script.stop_redis(redis_proc)


def markdown(info: dict) -> str:
    cols = [
        ("round", "round"), ("annotations", "annotated tiles"), ("unlabelled_tasks", "unlabelled tasks"),
        ("scored_tasks", "scored"),
        ("webhook_to_all_predictions_s", "webhook -> all predictions (s)"), ("queue_wait_s", "queue wait (s)"),
        ("read_s", "read LS (s)"), ("train_s", "training (s)"), ("score_s", "scoring (s)"), ("upload_s", "upload (s)"),
        ("steps_done", "steps"), ("train_tiles_per_s", "train tiles/s"), ("score_tiles_per_s", "score tiles/s"),
        ("val_iou", "val IoU"), ("webhook_ms_median", "webhook ms (median)"),
    ]  # fmt: skip
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in info["rounds"]:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            cells.append(f"{v:.3f}" if isinstance(v, float) and key in ("val_iou",) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=200, help="pool size (tasks)")
    parser.add_argument("--size", type=int, default=256, help="tile size in pixels")
    parser.add_argument("--batch", type=int, default=20, help="TRAIN_BATCH_SIZE: annotations per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400, help="TRAIN_STEPS")
    parser.add_argument("--budget", type=float, default=900.0, help="TRAIN_TIME_BUDGET_S")
    parser.add_argument("--width", type=int, default=16, help="MODEL_WIDTH")
    parser.add_argument("--depth", type=int, default=4, help="MODEL_DEPTH")
    parser.add_argument("--strategy", default="entropy", help="STRATEGY")
    parser.add_argument("--chunk", type=int, default=50, help="RESCORE_CHUNK")
    parser.add_argument("--workers", type=int, default=1, help="rq workers")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads per worker (OMP_NUM_THREADS)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(REPO / ".cache" / "bench-retrain"))
    parser.add_argument("--ls-venv", default=os.environ.get("LABEL_STUDIO_VENV"), help="Label Studio's venv")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    info = run(args)
    text = markdown(info)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(info, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
