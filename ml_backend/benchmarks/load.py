"""Load benchmark: concurrent /predict and /webhook against the real app under gunicorn with a real Redis.

A benchmark, not a test (issue 9, "Load"). On loopback it starts redis-server (append-only file, as in production)
and gunicorn serving ``ml_backend.server.app:create_app()`` with ``--workers 2 --threads 4``, publishes a U-Net to a
temporary registry (set up as in ``ml_backend.benchmarks.serving``, whose pieces it uses), then runs two phases:

1. ``webhook only``: WEBHOOK_CONCURRENCY clients post ANNOTATION_CREATED webhooks (the baseline);
2. ``mixed``: the same webhook clients while PREDICT_CONCURRENCY clients post /predict (one task per request, an
   EM-like tile served as a Label Studio local file), the situation that matters: Label Studio posts webhooks
   synchronously with a 1 s timeout while "Retrieve predictions" keeps the workers busy.

Each phase runs until its request counts are reached or its time is up, whichever comes first. Reported per route:
requests, throughput, p50/p99/max latency and errors (any non-2xx answer, unexpected body or transport error; must
be zero); and the peak RSS of gunicorn (master + workers, sampled with psutil every 0.2 s). Progress is printed
every few seconds. Results go to ``--out`` (Markdown with the JSON appended; default benchmarks/load.md) and, if
given, ``--json``.

    python scripts/bench_load.py                       # about 2 minutes
    python scripts/bench_load.py --duration 30 --predict-count 100 --webhook-count 2000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml_backend.benchmarks.serving import PROJECT_ID, _machine, _model
from ml_backend.data.synthetic import generate_em_like
from ml_backend.services.ports import free_port
from ml_backend.services.redis import start_redis, stop_redis
from ml_backend.store.registry import ModelRegistry

REPO = Path(__file__).resolve().parents[2]
WEBHOOK_BUDGET_S = 1.0  # Label Studio's timeout for a webhook it posts synchronously


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of the mixed phase at most (default 60)")
    p.add_argument("--baseline", type=float, default=15.0, help="seconds of the webhook-only phase (default 15)")
    p.add_argument("--predict-count", type=int, default=1000, help="/predict requests of the mixed phase at most")
    p.add_argument("--webhook-count", type=int, default=40000, help="/webhook requests per phase at most")
    p.add_argument("--predict-concurrency", type=int, default=4, help="concurrent /predict clients (default 4)")
    p.add_argument("--webhook-concurrency", type=int, default=8, help="concurrent /webhook clients (default 8)")
    p.add_argument("--tile-size", type=int, default=256, help="side of the predicted tiles (default 256)")
    p.add_argument("--tiles", type=int, default=8, help="distinct tiles the /predict clients cycle through")
    p.add_argument("--width", type=int, default=16, help="U-Net width (default: the backend default, 16)")
    p.add_argument("--depth", type=int, default=4, help="U-Net depth (default: the backend default, 4)")
    p.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    p.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker (default 4)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "load.md"), help="Markdown report ('' = none)")
    p.add_argument("--json", default="", help="also write the JSON results to this file (the Markdown holds them too)")
    args = p.parse_args(argv)
    if min(args.predict_concurrency, args.webhook_concurrency, args.workers, args.threads, args.tiles) < 1:
        p.error("concurrencies, --workers, --threads and --tiles must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------- measuring
@dataclass
class RouteStats:
    """Latencies (s) and errors of one route in one phase (thread-safe appends)."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, seconds: float, error: str | None) -> None:
        with self.lock:
            self.latencies.append(seconds)
            if error:
                self.errors.append(error)

    def summary(self, wall_s: float) -> dict:
        lat = sorted(self.latencies)
        n = len(lat)

        def pct(q: float) -> float | None:
            return round(lat[min(n - 1, int(q * n))] * 1000, 1) if n else None

        return {
            "requests": n,
            "throughput_per_s": round(n / wall_s, 2) if wall_s > 0 else None,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": round(lat[-1] * 1000, 1) if n else None,
            "mean_ms": round(statistics.fmean(lat) * 1000, 1) if n else None,
            "errors": len(self.errors),
            "error_examples": sorted(set(self.errors))[:5],
            "over_1s": sum(1 for x in lat if x >= WEBHOOK_BUDGET_S),
        }


class MemorySampler:
    """Peak RSS of a gunicorn master and its workers (sum over the process tree), sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peak_total = 0
        self.peak_per_process: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        import psutil

        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:  # a worker being replaced
                continue
            total += rss
            self.peak_per_process[proc.pid] = max(self.peak_per_process.get(proc.pid, 0), rss)
        self.peak_total = max(self.peak_total, total)
        return total

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(5)


def _post(session: Any, url: str, payload: dict, check: Callable[[dict], str | None]) -> tuple[float, str | None]:
    """(seconds, error or None) of one POST; an error is a non-200 answer, a bad body or a transport failure."""
    import requests

    t0 = time.perf_counter()
    try:
        resp = session.post(url, json=payload, timeout=120)
        elapsed = time.perf_counter() - t0
        if not 200 <= resp.status_code < 300:  # /webhook answers 202 when it queued or coalesced a job
            return elapsed, f"HTTP {resp.status_code}: {resp.text[:120]}"
        return elapsed, check(resp.json())
    except (requests.RequestException, ValueError) as exc:
        return time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc)[:120]}"


def run_phase(
    name: str,
    clients: list[tuple[str, int, int, Callable[[int], tuple[str, dict]], Callable[[dict], str | None]]],
    duration: float,
    base_url: str,
    memory: MemorySampler,
) -> dict:
    """Run each (route, concurrency, count, make_payload(i), check) until its count is reached or time is up."""
    import requests

    stats = {route: RouteStats() for route, *_ in clients}
    counters = {route: iter(range(count)) for route, _conc, count, *_ in clients}
    counter_lock = threading.Lock()
    deadline = time.monotonic() + duration

    def next_index(route: str) -> int | None:
        with counter_lock:
            return next(counters[route], None)

    def client(route: str, make: Callable[[int], tuple[str, dict]], check: Callable[[dict], str | None]) -> None:
        session = requests.Session()
        while time.monotonic() < deadline:
            i = next_index(route)
            if i is None:
                return
            path, payload = make(i)
            stats[route].add(*_post(session, base_url + path, payload, check))

    threads = [
        threading.Thread(target=client, args=(route, make, check), daemon=True)
        for route, conc, _count, make, check in clients
        for _ in range(conc)
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    last = 0.0
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        elapsed = time.monotonic() - t0
        if elapsed - last >= 5 or not any(t.is_alive() for t in threads):
            last = elapsed
            parts = []
            for route, st in stats.items():
                lat = sorted(st.latencies)
                p50 = f"{lat[len(lat) // 2] * 1000:.0f} ms" if lat else "-"
                parts.append(f"{route} {len(lat)} (p50 {p50}, errors {len(st.errors)})")
            print(f"[load] {name} {elapsed:5.1f} s: " + "; ".join(parts) + f"; gunicorn RSS "
                  f"{memory.sample() / 2**20:.0f} MiB", file=sys.stderr, flush=True)  # fmt: skip
    wall = time.monotonic() - t0
    return {"phase": name, "wall_s": round(wall, 2), "routes": {r: st.summary(wall) for r, st in stats.items()}}


# ----------------------------------------------------------------------------------------------- set-up
class Stack:
    """redis-server + gunicorn (workers x threads) with a published model and tiles served as local files."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        import numpy as np
        import requests
        from PIL import Image

        self.workdir = workdir
        self.redis_port = free_port()
        self.redis = start_redis(self.redis_port, workdir / "redis", persist=True)
        media = workdir / "media" / "tiles"
        media.mkdir(parents=True)
        images, _ = generate_em_like(args.tiles, args.tile_size, seed=0)
        for i, im in enumerate(images):
            Image.fromarray(np.asarray(im)).save(media / f"tile_{i:03d}.png")
        model_dir = workdir / "models"
        self.version = ModelRegistry(model_dir, PROJECT_ID).publish(
            _model(args.width, args.depth),
            {"note": "load benchmark: fixed random weights (timing does not depend on weights)", "benchmark": True},
        )
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "MODEL_DIR": str(model_dir),
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(workdir / "media"),
            "LABEL_STUDIO_URL": "http://127.0.0.1:9",  # never contacted: images are local files, no job runs here
            "OMP_NUM_THREADS": str(args.torch_threads),
            "MKL_NUM_THREADS": str(args.torch_threads),
        }
        self.log_path = workdir / "gunicorn.log"
        cmd = [
            sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", str(args.workers),
            "--threads", str(args.threads), "--timeout", "300", "ml_backend.server.app:create_app()",
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.gunicorn = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            if self.gunicorn.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"gunicorn did not come up; log:\n{self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.label_config = (REPO / "label_config" / "dense.xml").read_text()
        self.project = f"{PROJECT_ID}.{int(time.time())}"
        resp = requests.post(self.url + "/setup", json={"project": self.project, "schema": self.label_config},
                             timeout=60)  # fmt: skip
        if resp.status_code != 200:
            self.close()
            raise RuntimeError(f"/setup answered {resp.status_code}: {resp.text[:300]}")
        self.tiles = args.tiles

    def predict_payload(self, i: int) -> tuple[str, dict]:
        k = i % self.tiles
        task = {"id": k + 1, "data": {"image": f"/data/local-files/?d=tiles/tile_{k:03d}.png"}}
        return "/predict", {"tasks": [task], "project": self.project, "label_config": self.label_config, "params": {}}

    def check_predict(self, body: dict) -> str | None:
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, list) or len(results) != 1 or results[0].get("model_version") != self.version:
            return f"unexpected /predict answer: {str(body)[:120]}"
        return None

    @staticmethod
    def webhook_payload(i: int) -> tuple[str, dict]:
        task = 1 + i % 5000
        pid = PROJECT_ID
        annotation = {"id": 100000 + i, "task": task, "project": pid, "result": []}
        return "/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": pid}, "annotation": annotation,
                            "task": {"id": task, "project": pid}}  # fmt: skip

    @staticmethod
    def check_webhook(body: dict) -> str | None:
        status = body.get("status") if isinstance(body, dict) else None
        return None if status in {"counted", "queued", "coalesced"} else f"webhook answer: {str(body)[:120]}"

    def queued_training_jobs(self) -> int:
        import redis

        conn = redis.Redis(port=self.redis_port)
        return sum(1 for k in conn.scan_iter("rq:job:*") if not k.endswith(b":dependents"))

    def close(self) -> None:
        if self.gunicorn.poll() is None:
            self.gunicorn.terminate()
            try:
                self.gunicorn.wait(30)
            except subprocess.TimeoutExpired:
                self.gunicorn.kill()
        stop_redis(self.redis)


# ----------------------------------------------------------------------------------------------- report
def report(args: argparse.Namespace, machine: str, results: dict) -> str:
    cmd = "python scripts/bench_load.py " + " ".join(sys.argv[1:])
    lines = [
        "# Load benchmark (issue 9)",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {machine}  ",
        f"gunicorn `--workers {args.workers} --threads {args.threads}` (torch threads per worker "
        f"{args.torch_threads}), real redis-server (AOF everysec), all on 127.0.0.1. U-Net width {args.width} depth "
        f"{args.depth}, fixed random weights (timing does not depend on them), {args.tile_size} x {args.tile_size} "
        f"tiles, one task per /predict. Clients: {args.webhook_concurrency} webhook, {args.predict_concurrency} "
        "predict (mixed phase only).",
        "",
        "| phase | route | requests | throughput (req/s) | p50 | p99 | max | errors | webhooks >= 1 s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for phase in results["phases"]:
        for route, s in phase["routes"].items():
            lines.append(
                f"| {phase['phase']} ({phase['wall_s']:.0f} s) | {route} | {s['requests']} | {s['throughput_per_s']} "
                f"| {s['p50_ms']} ms | {s['p99_ms']} ms | {s['max_ms']} ms | {s['errors']} "
                f"| {s['over_1s'] if route == '/webhook' else '-'} |"
            )
    mem = results["memory"]
    lines += [
        "",
        f"Peak RSS of gunicorn (master + {args.workers} workers, summed): **{mem['peak_total_mib']} MiB** "
        f"(largest single process {mem['peak_single_mib']} MiB). Training jobs queued by all the webhooks: "
        f"{results['queued_training_jobs']} (one per project: the batch is counted, the job coalesced).",
        "",
        f"Errors in total: **{results['errors_total']}**. Webhook p99 while predictions are served: "
        f"**{results['webhook_p99_mixed_ms']} ms** against Label Studio's {WEBHOOK_BUDGET_S * 1000:.0f} ms timeout.",
        "",
        "```json",
        json.dumps(results, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = _machine()
    print(f"[load] {machine}", file=sys.stderr, flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        stack = Stack(args, Path(tmp))
        try:
            memory = MemorySampler(stack.gunicorn.pid)
            with memory:
                import requests

                for _ in range(args.workers * 2):  # warm-up: each worker loads the model once
                    path, payload = stack.predict_payload(random.randrange(args.tiles))
                    requests.post(stack.url + path, json=payload, timeout=300).raise_for_status()
                webhook = ("/webhook", args.webhook_concurrency, args.webhook_count, stack.webhook_payload,
                           stack.check_webhook)  # fmt: skip
                predict = ("/predict", args.predict_concurrency, args.predict_count, stack.predict_payload,
                           stack.check_predict)  # fmt: skip
                phases = [run_phase("webhook only", [webhook], args.baseline, stack.url, memory)]
                phases.append(run_phase("mixed", [webhook, predict], args.duration, stack.url, memory))
            queued = stack.queued_training_jobs()
        finally:
            stack.close()
    errors = sum(s["errors"] for ph in phases for s in ph["routes"].values())
    results = {
        "machine": machine,
        "args": {k: v for k, v in vars(args).items() if k not in {"out", "json"}},
        "phases": phases,
        "memory": {
            "peak_total_mib": round(memory.peak_total / 2**20, 1),
            "peak_single_mib": round(max(memory.peak_per_process.values()) / 2**20, 1),
        },
        "queued_training_jobs": queued,
        "errors_total": errors,
        "webhook_p99_mixed_ms": phases[1]["routes"]["/webhook"]["p99_ms"],
        "wall_min": round((time.monotonic() - started) / 60, 2),
    }
    text = report(args, machine, results)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"[load] wrote {args.out}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"[load] wrote {args.json}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
