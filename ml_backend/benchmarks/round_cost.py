"""Round cost against pool size (issue 20.2): the scoring part of a round with a bounded candidate sample.

What is timed, per pool size (generated tasks) and number of scoring processes, is the product's scoring part of a
round, the same code the training job runs after publishing a version (``active_learning.run_round`` with the job's
plug-ins, training left out):

* **sample**: the previous best from the task listing (``candidates.previous_best``, every task holding a prediction
  of the live version, as in Label Studio) and the candidate draw (``CandidateSampler``, CANDIDATE_POOL);
* **score**: the sample's chunks (RESCORE_CHUNK) scored through Redis by the coordinator and, with 2 processes, one
  real ``rq worker`` taking ``rescore_chunk`` helper jobs (``queue.rescoring.RedisPoolScorer``), the real U-Net
  (MODEL_WIDTH / MODEL_DEPTH as they ship, one training step) on small tiles, masks and embeddings included;
* **select**: the audit split of the whole project (``audit.audit_task_ids``), the labelled tiles' embeddings and the
  product's selector on the sample (``plan.product_selector``: stack-aware batch, audit places).

Every process runs torch with one thread (the 2-process figure uses both cores). The tasks look like the importer's
(stack, slice, tile position); their images are ``--files`` distinct generated tiles on disk, task i showing file
i mod files (only the sampled tasks are read). Not timed here: reading the project from Label Studio and the upload,
which ``--label-studio`` measures end to end at one size with the real Label Studio and the training job
(``benchmarks.retrain``).

    python scripts/bench_round_cost.py --sizes 1000,2000,10000,100000 --processes 1,2 --whole-pool 10000 \
        --out benchmarks/round_cost

``--whole-pool`` also measures sizes with CANDIDATE_POOL=0 (every unlabelled task scored, as before the sample).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ml_backend.active_learning import RoundPlan, run_round
from ml_backend.active_learning.audit import audit_task_ids
from ml_backend.active_learning.candidates import CandidateSampler, previous_best
from ml_backend.active_learning.plan import product_plan, product_selector
from ml_backend.active_learning.publisher import RegistryPublisher
from ml_backend.active_learning.round import LabelledSet, LabelledTile
from ml_backend.benchmarks.machine import describe
from ml_backend.config import Settings
from ml_backend.data.synthetic import generate_em_like
from ml_backend.inference.scoring import ScoringConfig
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.loop import AnnotatedTasks
from ml_backend.labelstudio.project_data import ChunkInputs
from ml_backend.queue.rescoring import RedisPoolScorer
from ml_backend.services import redis as redis_service
from ml_backend.store.registry import ModelRegistry
from ml_backend.strategies.resolve import resolve_strategy
from ml_backend.training.recipe import ModelState

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("bench_round_cost")

LABELLED = 20  # labelled tiles (one batch): their embeddings feed the selector's feature rule
TILES_PER_SIDE = 8  # tasks per slice = TILES_PER_SIDE ** 2 (an 8 x 8 grid of tiles per section)


@dataclass
class Timed:
    """A callable wrapped to add its wall time to ``seconds``."""

    fn: Any
    seconds: float = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


@dataclass
class TimedScorer:
    """A pool scorer wrapped to time its ``score`` (the chunked scoring alone)."""

    inner: Any
    seconds: float = 0.0

    def score(self, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.inner.score(*args)
        finally:
            self.seconds += time.perf_counter() - t0


def write_files(root: Path, n: int, tile: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``n`` generated EM-like tiles as PNG under ``root/tiles``; (names, images, masks)."""
    from PIL import Image

    raw, gt = generate_em_like(n, size=tile, seed=seed)
    (root / "tiles").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"tiles/t{i:05d}.png"
        if not (root / name).exists():
            Image.fromarray(raw[i]).save(root / name)
        names.append(name)
    return names, raw, gt


def make_tasks(n: int, names: list[str], tile: int, live: str, seed: int) -> dict[int, dict]:
    """``n`` tasks as the importer writes them (stack, slice, tile position) holding a prediction of ``live`` with a
    random queue score (what the listing shows the training job); task i shows file i mod len(names)."""
    rng = np.random.default_rng(seed)
    scores = rng.random(n)
    per_slice = TILES_PER_SIDE**2
    tasks = {}
    for i in range(n):
        z, cell = divmod(i, per_slice)
        y, x = divmod(cell, TILES_PER_SIDE)
        tid = i + 1
        tasks[tid] = {
            "id": tid,
            "data": {
                "image": f"/data/local-files/?d={names[i % len(names)]}", "stack": "generated.tif", "slice": z,
                "tile_y": y * tile, "tile_x": x * tile, "tile_height": tile, "tile_width": tile,
            },
            "predictions": [{"model_version": live, "score": float(scores[i])}],
        }  # fmt: skip
    return tasks


class _Registered:
    """The round's publisher: the version is already in the registry (the helper processes load it from there)."""

    def __init__(self, version: str) -> None:
        self.version = version

    def publish(self, trained: Any, labelled: Any, evaluation: Any) -> str:
        return self.version


def measure(n: int, processes: int, ctx: dict, settings: Any, conn: Any) -> dict:
    """One round's scoring part on ``n`` tasks with ``processes`` scoring processes (1: the coordinator alone)."""
    out, config, xml, strategy = ctx["trained"], ctx["config"], ctx["xml"], ctx["strategy"]
    tasks = make_tasks(n, ctx["names"], ctx["tile"], "previous", seed=n)
    labelled = ctx["labelled"]
    labelled_ids = [t.task_id for t in labelled]
    t_start = time.perf_counter()
    # sample: what the job reads from its listing, then the draw (inside run_round)
    t0 = time.perf_counter()
    pool = [t for t in tasks if t not in set(labelled_ids)]
    best = previous_best(tasks, labelled_ids, "previous", settings.candidate_keep)
    t_best = time.perf_counter() - t0
    sampler = Timed(CandidateSampler.from_settings(settings, best))
    # select: the audit split of the whole project and the product's selector (plus the labelled embeddings)
    t0 = time.perf_counter()
    audit = audit_task_ids(sorted(tasks), settings.audit_fraction, settings.seed)
    select = product_selector(settings, config.num_classes, tasks, labelled_ids, audit)
    t_audit = time.perf_counter() - t0
    scorer = RedisPoolScorer(ctx["pid"], xml, ChunkInputs(config, settings, tasks), settings, conn,
                             helpers=processes > 1)  # fmt: skip
    score = TimedScorer(scorer)
    plan = RoundPlan(strategy, ModelState(out.model, out.version, "kept"), candidates=sampler,
                     scoring=ScoringConfig.from_settings(settings), select_seed=settings.seed)  # fmt: skip
    outcome = run_round(plan, AnnotatedTasks(LabelledSet(labelled), pool), publisher=_Registered(out.version),
                        scorer=score, select=select)  # fmt: skip
    total = time.perf_counter() - t_start
    rnd = scorer.last
    helpers = sum(1 for owner in rnd.owners.values() if not owner.startswith("coordinator")) if rnd else 0
    return {
        "tasks": n,
        "processes": processes,
        "candidate_pool": settings.candidate_pool,
        "pool": outcome.pool_size,
        "scored": len(outcome.scored.ids),
        "chunks": len(rnd.chunks) if rnd else 0,
        "chunks_by_helper": helpers,
        "sample_s": round(t_best + sampler.seconds, 3),
        "score_s": round(score.seconds, 3),
        "select_s": round(t_audit + (outcome.timings["score"] - sampler.seconds - score.seconds), 3),
        "scoring_part_s": round(total, 3),
        "load_avg": [round(v, 2) for v in os.getloadavg()],
    }


def _start_worker(settings: Any, root: Path, workdir: Path, i: int) -> subprocess.Popen:
    env = {
        **os.environ, "REDIS_URL": settings.redis_url, "MODEL_DIR": str(settings.model_dir), "DEVICE": "cpu",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root), "LABEL_STUDIO_URL": settings.label_studio_url,
        "OMP_NUM_THREADS": "1", "RESCORE_CHUNK": str(settings.rescore_chunk),
    }  # fmt: skip
    fh = open(workdir / f"worker-{i}.log", "ab")  # noqa: SIM115 - lives as long as the worker
    return subprocess.Popen([sys.executable, "-m", "ml_backend.cli", "worker", "--name", f"cost-{os.getpid()}-{i}"],
                            env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)  # fmt: skip


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def run(args: argparse.Namespace) -> dict:
    """Every (size, processes) pair in one process, one Redis, one trained version."""
    import redis
    import torch
    from rq import Worker

    torch.set_num_threads(1)
    work = Path(args.workdir).resolve()
    root = work / "files"
    work.mkdir(parents=True, exist_ok=True)
    port = redis_service.free_port()
    redis_proc = redis_service.start_redis(port, work / "redis")
    workers: list[subprocess.Popen] = []
    try:
        settings = Settings.from_env(
            redis_url=f"redis://127.0.0.1:{port}/0", model_dir=work / "models", local_files_root=str(root),
            label_studio_url="http://127.0.0.1:9", device="cpu", candidate_pool=args.candidate_pool,
            rescore_chunk=args.chunk, train_steps=1, train_crop=min(args.tile, 128), val_fraction=0.0,
            bn_calibration_tiles=0, seed=args.seed,
        )  # fmt: skip
        names, raw, gt = write_files(root, args.files, args.tile, args.seed)
        xml = (REPO / "label_config" / "dense.xml").read_text()
        config = parse_label_config(xml)
        labelled = [LabelledTile(i + 1, None, raw[i].astype(np.float32) / 255, gt[i].astype(np.int64))
                    for i in range(LABELLED)]  # fmt: skip
        pid = 1
        registry = ModelRegistry(settings.model_dir, pid)  # the product's round without its scoring half
        trained = run_round(product_plan(registry, config, settings, None, score=False),
                            AnnotatedTasks(LabelledSet(labelled), []),
                            publisher=RegistryPublisher(registry, config, settings, None))  # fmt: skip
        out = SimpleNamespace(model=trained.trained.model, version=trained.version)
        ctx = {"trained": out, "config": config, "xml": xml, "names": names, "tile": args.tile, "pid": pid,
               "labelled": labelled, "strategy": resolve_strategy(settings.strategy, None)}  # fmt: skip
        conn = redis.Redis.from_url(settings.redis_url)
        info: dict[str, Any] = {"machine": describe(), "args": {**vars(args), "out": str(args.out)}, "settings": {
            "CANDIDATE_POOL": settings.candidate_pool, "CANDIDATE_KEEP": settings.candidate_keep,
            "RESCORE_CHUNK": settings.rescore_chunk, "MODEL_WIDTH": settings.model_width,
            "MODEL_DEPTH": settings.model_depth, "STRATEGY": settings.strategy,
            "BATCH_DIVERSITY": settings.batch_diversity, "AUDIT_FRACTION": settings.audit_fraction}}  # fmt: skip
        rows = []
        for processes in args.processes:
            while len(workers) < processes - 1:
                workers.append(_start_worker(settings, root, work, len(workers)))
            deadline = time.monotonic() + 300
            while len(Worker.all(connection=conn)) < processes - 1 and time.monotonic() < deadline:
                time.sleep(0.5)
            for n in args.sizes:
                row = measure(n, processes, ctx, settings, conn)
                log.info("%s", json.dumps(row))
                rows.append(row)
            for n in args.whole_pool if processes == args.processes[0] else []:  # the cost the sample avoids
                row = measure(n, processes, ctx, settings.replace(candidate_pool=0), conn)
                log.info("%s", json.dumps(row))
                rows.append(row)
        info["rows"] = rows
        return info
    finally:
        for proc in workers:
            _stop(proc)
        redis_service.stop_redis(redis_proc)


def markdown(info: dict) -> str:
    cols = [("tasks", "tasks"), ("candidate_pool", "CANDIDATE_POOL"), ("processes", "processes"),
            ("scored", "scored"), ("chunks", "chunks"),
            ("chunks_by_helper", "by the rq worker"), ("sample_s", "sample (s)"), ("score_s", "score (s)"),
            ("select_s", "select (s)"), ("scoring_part_s", "scoring part (s)")]  # fmt: skip
    lines = ["| " + " | ".join(h for _, h in cols) + " | vs 2,000 tasks |", "|" + "---:|" * (len(cols) + 1)]
    ref = {r["processes"]: r["scoring_part_s"] for r in info["rows"] if r["tasks"] == 2000 and r["candidate_pool"]}
    for r in info["rows"]:
        base = ref.get(r["processes"])
        ratio = f"{r['scoring_part_s'] / base:.2f}x" if base else "-"
        lines.append("| " + " | ".join(f"{r[k]:,}" if isinstance(r[k], int) else str(r[k]) for k, _ in cols)
                     + f" | {ratio} |")  # fmt: skip
    return "\n".join(lines)


def plot(info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    pool = info["settings"]["CANDIDATE_POOL"]
    for processes in sorted({r["processes"] for r in info["rows"]}):
        rows = sorted((r for r in info["rows"] if r["processes"] == processes and r["candidate_pool"]),
                      key=lambda r: r["tasks"])  # fmt: skip
        ax.plot([r["tasks"] for r in rows], [r["scoring_part_s"] for r in rows], "o-",
                label=f"CANDIDATE_POOL={pool}, {processes} process{'es' if processes > 1 else ''}")  # fmt: skip
    whole = [r for r in info["rows"] if not r["candidate_pool"]]
    if whole:  # the whole pool: the sampled series' points where the sample was the pool, then the measured ones
        first = whole[0]["processes"]
        rows = [r for r in info["rows"] if r["processes"] == first and r["scored"] == r["pool"]]
        rows = sorted({r["tasks"]: r for r in rows}.values(), key=lambda r: r["tasks"])
        ax.plot([r["tasks"] for r in rows], [r["scoring_part_s"] for r in rows], "s--", color="#999",
                label=f"whole pool (CANDIDATE_POOL=0), {first} process")  # fmt: skip
    ax.axvline(pool, color="#888", ls=":", lw=1)
    ax.text(pool, ax.get_ylim()[1] * 0.95, f" CANDIDATE_POOL={pool}", fontsize=8, color="#555", va="top")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("unlabelled tasks in the project (log scale)")
    ax.set_ylabel("scoring part of a round (s)")
    ax.set_title("Round cost against pool size (sample + chunked scoring + selection)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,2000,10000,100000", help="tasks per project, comma-separated")
    ap.add_argument("--processes", default="1,2", help="scoring processes: 1 = the coordinator, 2 = + one rq worker")
    ap.add_argument("--candidate-pool", type=int, default=2000, help="CANDIDATE_POOL")
    ap.add_argument("--chunk", type=int, default=50, help="RESCORE_CHUNK")
    ap.add_argument("--whole-pool", default="", help="sizes also measured with CANDIDATE_POOL=0 (first --processes)")
    ap.add_argument("--tile", type=int, default=64, help="tile side in pixels")
    ap.add_argument("--files", type=int, default=1000, help="distinct tile images on disk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=str(REPO / ".cache" / "bench-round-cost"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "round_cost")
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.processes = [int(s) for s in args.processes.split(",") if s.strip()]
    args.whole_pool = [int(s) for s in args.whole_pool.split(",") if s.strip()]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    info = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "round_cost.json").write_text(json.dumps(info, indent=2, default=str))
    plot(info, args.out / "round_cost.png")
    text = markdown(info)
    (args.out / "round_cost.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
