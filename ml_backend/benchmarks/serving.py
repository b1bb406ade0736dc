"""Serving benchmark: /predict latency and throughput next to the bare model, and peak memory of a huge section.

What it measures (issue 2, "Benchmark"):
1. ``/predict`` latency for one tile (default 1024x1024) and throughput for a batch of tiles sent in ONE request
   (as Label Studio's "Retrieve predictions" does), against the real Flask app (``ml_backend.server.app``) under
   gunicorn (``--server gunicorn``, default) or in-process through Flask's test client (``--server flask``);
2. the bare model on the same images in the same run: ``predict_tiled`` with the server's tile/overlap/batch
   settings; the ratio server / bare is the serving overhead (fetch, decode, normalise, RLE, scoring, JSON, HTTP);
3. peak memory of ``predict_tiled`` on an 8624 x 8416 section (the largest dataset of the papers), in a fresh
   subprocess: peak RSS (``ru_maxrss``, includes torch's activations) and the tracemalloc peak (numpy buffers).

Timings do not depend on the weights, so the model is a default-size U-Net with fixed random weights; it is
published to a temporary model registry so the server loads it like a trained version. Images are generated
EM-like tiles, served to the backend as Label Studio local files (``/data/local-files/?d=...``) so Label Studio's
own file serving is not part of the figure. Results are printed as a table and written as Markdown (``--out``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from ml_backend.benchmarks.machine import describe_text
from ml_backend.config import Settings, get_settings
from ml_backend.data.synthetic import generate_em_like
from ml_backend.imaging import normalize
from ml_backend.inference import predict_tiled
from ml_backend.model import build_model
from ml_backend.services.ports import free_port
from ml_backend.store.registry import ModelRegistry

REPO = Path(__file__).resolve().parents[2]

PROJECT_ID = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tile-size", type=int, default=1024, help="side of the served tiles (default 1024)")
    p.add_argument("--batch", type=int, default=4, help="tiles in the throughput request (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of the single-tile request (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, benchmark and server alike (default 2)")
    p.add_argument("--width", type=int, default=16, help="U-Net width (default: the backend default, 16)")
    p.add_argument("--depth", type=int, default=4, help="U-Net depth (default: the backend default, 4)")
    p.add_argument("--huge", default="8624x8416", help="HxW of the memory test image (default 8624x8416)")
    p.add_argument("--server", choices=("gunicorn", "flask"), default="gunicorn", help="how /predict is served")
    p.add_argument("--skip-server", action="store_true", help="bare model and memory only")
    p.add_argument("--skip-huge", action="store_true", help="no peak-memory measurement")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "serving.md"), help="Markdown report ('' = none)")
    p.add_argument("--huge-child", action="store_true", help=argparse.SUPPRESS)  # internal: memory subprocess
    args = p.parse_args(argv)
    try:
        h, w = (int(v) for v in args.huge.lower().split("x"))
    except ValueError:
        p.error(f"--huge must look like 8624x8416, got {args.huge!r}")
    args.huge_hw = (h, w)
    if min(args.tile_size, args.batch, args.repeats, args.threads) < 1:
        p.error("--tile-size, --batch, --repeats and --threads must be >= 1")
    return args


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)


def _machine() -> str:
    return describe_text() + " (shared machine)"


def _model(width: int, depth: int):
    import torch

    torch.manual_seed(0)
    return build_model("unet", width=width, depth=depth).eval()


def _settings_kwargs() -> dict:
    s = get_settings()
    return {"tile": s.tile_size, "overlap": s.tile_overlap, "batch_size": s.inference_batch}


# ----------------------------------------------------------------------------------------------- peak memory
def _current_rss_mib() -> float:
    """Resident set size now (Linux /proc), in MiB; falls back to the peak so far elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def huge_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: prints JSON with the peak memory of predict_tiled on a huge section."""
    import numpy as np

    _set_threads(args.threads)

    model = _model(args.width, args.depth)
    h, w = args.huge_hw
    # A real-looking section without generating 72 M pixels of Voronoi: repeat a generated 1024 tile (uint8, as
    # decoded from disk), then normalise as the server does.
    base, _ = generate_em_like(1, 1024, seed=0)
    raw = np.tile(base[0], (-(-h // 1024), -(-w // 1024)))[:h, :w]
    image = normalize(raw)
    del raw
    kw = _settings_kwargs()
    # Warm-up on one tile: torch's one-off costs (oneDNN kernels, thread pool) are not the image's memory.
    predict_tiled(model, np.ascontiguousarray(image[: kw["tile"], : kw["tile"]]), **kw)
    rss_before = _current_rss_mib()
    tracemalloc.start()
    t0 = time.perf_counter()
    probs = predict_tiled(model, image, **kw)
    seconds = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "shape": [h, w],
                "seconds": seconds,
                "rss_before_mib": rss_before,
                "rss_peak_mib": rss_peak,
                "traced_peak_mib": traced_peak / 2**20,
                "image_mib": image.nbytes / 2**20,
                "output_mib": probs.nbytes / 2**20,
                **kw,
            }
        )
    )


def measure_huge(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "ml_backend.benchmarks.serving", "--huge-child", "--huge", args.huge]
    cmd += ["--threads", str(args.threads), "--width", str(args.width), "--depth", str(args.depth)]
    print(f"[bench] peak memory of predict_tiled on {args.huge} (subprocess) ...", file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- bare model
class _Bare:
    """predict_tiled in this process with the server's tile/overlap/batch settings."""

    def __init__(self, model, images: list) -> None:
        self.model, self.kw = model, _settings_kwargs()
        self.norm = [normalize(im) for im in images]

    def run(self, count: int) -> float:
        """Seconds to predict the first ``count`` images."""
        t0 = time.perf_counter()
        for im in self.norm[:count]:
            predict_tiled(self.model, im, **self.kw)
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- server
class _Client:
    """POST JSON to the app, either over HTTP (gunicorn) or through Flask's test client."""

    def __init__(self, mode: str, env: dict[str, str], workdir: Path, threads: int) -> None:
        self.mode = mode
        self.proc: subprocess.Popen | None = None
        if mode == "flask":
            os.environ.update(env)

            get_settings.cache_clear()  # the app must see MODEL_DIR etc. set above
            server_app = importlib.import_module("ml_backend.server.app")
            self.client = server_app.create_app(Settings.from_env()).test_client()
            return
        import requests

        self.session = requests.Session()
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or shutil.which("gunicorn")
        if gunicorn is None:
            raise RuntimeError("gunicorn not found; install it or use --server flask")
        log = (workdir / "gunicorn.log").open("w")
        self.proc = subprocess.Popen(
            [
                gunicorn,
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "1",
                "--timeout",
                "600",
                "ml_backend.server.app:create_app()",
            ],
            env={**os.environ, **env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_healthy(workdir, requests)
        except BaseException:
            self.close()  # never leave a server behind when the benchmark aborts
            raise

    def _wait_healthy(self, workdir: Path, requests) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited ({self.proc.returncode}); see {workdir / 'gunicorn.log'}")
            try:
                if self.session.get(f"{self.base}/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or the worker is still importing torch
                pass
            time.sleep(0.3)
        raise RuntimeError(f"gunicorn did not answer /health within 120 s; see {workdir / 'gunicorn.log'}")

    def post(self, route: str, payload: dict) -> tuple[int, dict]:
        if self.mode == "flask":
            resp = self.client.post(route, json=payload)
            return resp.status_code, resp.get_json(silent=True) or {}
        resp = self.session.post(f"{self.base}{route}", json=payload, timeout=600)
        try:
            return resp.status_code, resp.json()
        except ValueError:
            return resp.status_code, {"raw": resp.text[:500]}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class _Backend:
    """The real app with the model published to a temporary registry; ``run(n)`` times /predict of n tasks."""

    def __init__(self, args: argparse.Namespace, model, images: list, workdir: Path) -> None:
        from PIL import Image

        media = workdir / "media"
        (media / "tiles").mkdir(parents=True)
        for i, im in enumerate(images):
            Image.fromarray(im).save(media / "tiles" / f"tile_{i:03d}.png")
        model_dir = workdir / "models"
        self.version = ModelRegistry(model_dir, PROJECT_ID).publish(
            model, {"note": "benchmark: fixed random weights (timing does not depend on weights)", "benchmark": True}
        )
        self.label_config = (REPO / "label_config" / "dense.xml").read_text()  # the product's dense config
        env = {
            "MODEL_DIR": str(model_dir),
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(media),
            "LABEL_STUDIO_URL": "http://127.0.0.1:9",  # never contacted: images are local files
        }
        self.tasks = [
            {"id": i + 1, "data": {"image": f"/data/local-files/?d=tiles/tile_{i:03d}.png"}} for i in range(len(images))
        ]
        self.project = f"{PROJECT_ID}.{int(time.time())}"
        print(f"[bench] starting the backend ({args.server}) ...", file=sys.stderr, flush=True)
        self.client = _Client(args.server, env, workdir, args.threads)
        try:
            setup = {"project": self.project, "schema": self.label_config, "extra_params": {}}
            status, body = self.client.post("/setup", setup)
            if status != 200:
                raise RuntimeError(f"/setup answered {status}: {body}")
        except BaseException:
            self.client.close()
            raise

    def run(self, count: int) -> float:
        """Seconds for one /predict request carrying the first ``count`` tasks."""
        batch = self.tasks[:count]
        payload = {"tasks": batch, "project": self.project, "label_config": self.label_config, "params": {}}
        t0 = time.perf_counter()
        status, body = self.client.post("/predict", payload)
        elapsed = time.perf_counter() - t0
        results = body.get("results") if isinstance(body, dict) else None
        if status != 200 or not isinstance(results, list) or len(results) != len(batch):
            raise RuntimeError(f"/predict answered {status}: {str(body)[:500]}")
        if not all(isinstance(r, dict) and r.get("model_version") == self.version for r in results):
            # Cold-start answers (no model) or failed tasks skip inference: their timing would be meaningless.
            raise RuntimeError(f"/predict did not run model {self.version} on every task: {str(body)[:500]}")
        return elapsed

    def close(self) -> None:
        self.client.close()


def measure_latency(args: argparse.Namespace, model, images: list) -> tuple[dict, dict | None]:
    """Bare and served timings, interleaved (bare, server, bare, ...) so both see the same machine load."""
    bare = _Bare(model, images)
    bare.run(1)  # warm-up: allocator, oneDNN kernels
    if args.skip_server:
        print(f"[bench] bare predict_tiled on {args.tile_size}px tiles ...", file=sys.stderr, flush=True)
        single = [bare.run(1) for _ in range(args.repeats)]
        return {"single": single, "batch": bare.run(len(images))}, None
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        backend = _Backend(args, model, images, Path(tmp))
        try:
            backend.run(1)  # warm-up: model load in the worker, kernels
            print("[bench] timing /predict and bare predict_tiled, interleaved ...", file=sys.stderr, flush=True)
            b_single, s_single = [], []
            for _ in range(args.repeats):
                b_single.append(bare.run(1))
                s_single.append(backend.run(1))
            b_batch = bare.run(len(images))
            s_batch = backend.run(len(images))
        finally:
            backend.close()
    return {"single": b_single, "batch": b_batch}, {"single": s_single, "batch": s_batch, "version": backend.version}


# ----------------------------------------------------------------------------------------------- report
def _fmt_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _spread(times: list[float]) -> str:
    """Median and range: the machine may be shared, so the spread tells how much to trust the median."""
    return f"{statistics.median(times):.2f} s ({min(times):.2f}-{max(times):.2f})"


def report(args: argparse.Namespace, machine: str, bare: dict, served: dict | None, huge: dict | None) -> str:
    n, side = args.batch, args.tile_size
    kw = _settings_kwargs()
    bt = n / bare["batch"]
    rows = [["measure", "/predict (server)", "bare predict_tiled", "ratio (overhead)"], ["---", "---:", "---:", "---:"]]
    latency = f"latency, 1 tile {side}x{side}: median (min-max) of {args.repeats}"
    throughput = f"throughput, {n} tiles in one request"
    if served:
        st = n / served["batch"]
        paired = statistics.median(sv / bv for sv, bv in zip(served["single"], bare["single"], strict=True))
        ratio = f"{paired:.2f}x (of minima: {min(served['single']) / min(bare['single']):.2f}x)"
        rows.append([latency, _spread(served["single"]), _spread(bare["single"]), ratio])
        rows.append([throughput, f"{st:.3f} tiles/s", f"{bt:.3f} tiles/s", f"{bt / st:.2f}x"])
    else:
        rows.append([latency, "skipped", _spread(bare["single"]), "-"])
        rows.append([throughput, "skipped", f"{bt:.3f} tiles/s", "-"])
    table = "\n".join(_fmt_row(r) for r in rows)
    mem = "(skipped)"
    if huge:
        h, w = huge["shape"]
        increase = huge["rss_peak_mib"] - huge["rss_before_mib"]
        mem_rows = [
            ["predict_tiled on one section", "value"],
            ["---", "---:"],
            ["image", f"{h} x {w} ({h * w / 1e6:.1f} Mpx), normalised float32 input {huge['image_mib']:.0f} MiB"],
            ["output (C, H, W) float32 probabilities", f"{huge['output_mib']:.0f} MiB"],
            ["peak RSS of the process (ru_maxrss)", f"{huge['rss_peak_mib']:.0f} MiB"],
            ["RSS just before inference (interpreter, torch, model, input)", f"{huge['rss_before_mib']:.0f} MiB"],
            ["peak increase during inference", f"{increase:.0f} MiB"],
            [
                "... of which beyond the output (tiles in flight, torch workspace)",
                f"{increase - huge['output_mib']:.0f} MiB",
            ],
            ["tracemalloc peak (numpy buffers only)", f"{huge['traced_peak_mib']:.0f} MiB"],
            ["time", f"{huge['seconds']:.0f} s ({h * w / 1e6 / huge['seconds']:.2f} Mpx/s)"],
        ]
        mem = "\n".join(_fmt_row(r) for r in mem_rows)
    cmd = " ".join(["python scripts/bench_serving.py", *sys.argv[1:]])
    load_end = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    raw = json.dumps({"bare": bare, "served": served, "huge": huge}, indent=1, default=str)
    return f"""# Serving benchmark

Command (from the repository root; about {bare.get("wall_min", 0):.0f} min on the machine below):

```
{cmd}
```

Machine: {machine}; load average at the end {load_end}. Torch threads: {args.threads} (benchmark and server).
Model: U-Net width {args.width}, depth {args.depth} ({bare["params"]:,} parameters), fixed random weights (timing does
not depend on weights). Inference settings (server defaults): tile {kw["tile"]}, overlap {kw["overlap"]}, batch
{kw["batch_size"]}. Server: {args.server}{"" if served else " (skipped)"}, one worker; images are {side}x{side}
generated EM-like 8-bit PNG tiles read as Label Studio local files (`/data/local-files/?d=`), so Label Studio's own
file serving is not included.

{table}

The ratio is server time / bare time: what fetching, decoding, normalising, scoring, RLE-encoding and HTTP/JSON add
on top of the forward passes (the throughput ratio is bare / server, so both read "x times slower when served").
Bare and served runs are interleaved so both see the same machine load; the latency ratio is the median of the
paired ratios, and the ratio of the fastest runs is the figure least disturbed by other load.

Peak memory of tiled inference on an image the size of the largest dataset in the papers (a generated tile repeated,
then normalised as the server does), measured in a fresh subprocess:

{mem}

Tiles are streamed one batch at a time and the blending weights are separable (no (H, W) weight map), so beyond the
input and the (C, H, W) output only a few tiles of activations are held.

<details><summary>raw figures (seconds, MiB)</summary>

```json
{raw}
```
</details>
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.huge_child:
        huge_child(args)
        return 0
    _set_threads(args.threads)

    started = time.monotonic()
    machine = _machine()
    print(f"[bench] {machine}; torch threads {args.threads}", file=sys.stderr, flush=True)
    model = _model(args.width, args.depth)
    images = list(generate_em_like(args.batch, args.tile_size, seed=0)[0])
    bare, served = measure_latency(args, model, images)
    bare["params"] = sum(p.numel() for p in model.parameters())
    huge = None if args.skip_huge else measure_huge(args)
    bare["wall_min"] = (time.monotonic() - started) / 60
    text = report(args, machine, bare, served, huge)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"[bench] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
