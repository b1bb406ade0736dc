"""Operator commands: model versions, rollback, per-project status with a learning curve, the RQ worker.

    python -m ml_backend.cli versions --project 1
    python -m ml_backend.cli rollback --project 1 --version v0003-20260101T120000Z
    python -m ml_backend.cli status   --project 1 --plot learning_curve.png
    python -m ml_backend.cli train    --project 1          # enqueue a training now (like "Start training")
    ml-backend benchmark --quick                            # AL learning curves (ml_backend.benchmarks)
    ml-backend import --project 1 STACK.tif                 # tiles into Label Studio (ml_backend.labelstudio.importing)
    ml-backend setup --backend-url http://127.0.0.1:9090    # project + ML backend (ml_backend.labelstudio.setup)
    ml-backend label-studio --port 8080                     # a local Label Studio (ml_backend.services.label_studio)
    python -m ml_backend.cli worker                         # = rq worker --serializer rq.serializers.JSONSerializer
                                                            #   --with-scheduler --worker-class
                                                            #   ml_backend.worker.RecoveringWorker (+ intervals)
                                                            #   -u $REDIS_URL $RQ_QUEUE

Every command reads the same environment as the backend (MODEL_DIR, REDIS_URL, RQ_QUEUE, ...; see README).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from ml_backend.config import ConfigError, Settings, get_settings
from ml_backend.registry import ModelRegistry, RegistryError

WORKER_CLASS = "ml_backend.worker.RecoveringWorker"

# Subcommands whose module has its own argument parser: `ml-backend <name> ARGS` = that module's main(ARGS).
DELEGATED = {
    "benchmark": ("ml_backend.benchmarks.cli", "simulated active learning: learning curves of every strategy"),
    "import": ("ml_backend.labelstudio.importing", "import EM stacks into a Label Studio project as tiles"),
    "setup": ("ml_backend.labelstudio.setup", "create/update the Label Studio project and connect the backend"),
    "label-studio": ("ml_backend.services.label_studio", "install (once) and run a local Label Studio"),
}


def worker_command(settings: Settings, *, burst: bool = False, name: str | None = None, extra: list[str] | None = None):
    """The `rq worker` command line for this backend: JSON serializer (no pickles), the backend's queue, the
    scheduler (needed for retries with backoff intervals) and the crash-recovery timing of ``ml_backend.worker``.

    An idle RQ worker wakes every ``worker_ttl - 15`` s and then cleans the registries (re-queues abandoned jobs) if
    ``maintenance_interval`` has passed: both are derived from WORKER_MAINTENANCE_S so a dead worker's job is found
    within WORKER_ABANDONED_AFTER_S + WORKER_MAINTENANCE_S.
    """
    heartbeat, abandoned, maintenance = (
        settings.worker_heartbeat_s,
        settings.worker_abandoned_after_s,
        settings.worker_maintenance_s,
    )
    if abandoned <= heartbeat:
        raise ConfigError(
            f"WORKER_ABANDONED_AFTER_S={abandoned} must exceed WORKER_HEARTBEAT_S={heartbeat} (a healthy job would "
            "look abandoned between two heartbeats)"
        )
    rq_bin = shutil.which("rq", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    base = [rq_bin] if rq_bin else [sys.executable, "-m", "rq.cli"]
    cmd = [*base, "worker", "--serializer", "rq.serializers.JSONSerializer", "--with-scheduler"]
    cmd += ["--worker-class", WORKER_CLASS, "--job-monitoring-interval", str(heartbeat)]
    cmd += ["--maintenance-interval", str(max(1, maintenance - 1)), "--worker-ttl", str(maintenance + 15)]
    cmd += ["-u", settings.redis_url]
    if burst:
        cmd.append("--burst")
    if name:
        cmd += ["--name", name]
    cmd += list(extra or [])
    cmd.append(settings.queue_name)
    return cmd


def _fmt_metric(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def cmd_versions(args: argparse.Namespace, settings: Settings) -> int:
    reg = ModelRegistry(settings.model_dir, args.project)
    metas = reg.versions()
    current = reg.current_version()
    if args.json:
        print(json.dumps([{**m, "current": m["version"] == current} for m in metas], indent=2, default=str))
        return 0
    if not metas:
        print(f"project {args.project}: no model versions in {reg.versions_dir}")
        return 0
    print(f"{'':2}{'version':<24} {'created':<26} {'annot.':>6} {'val IoU':>8} {'val Dice':>8} {'train s':>8}  parent")
    for m in metas:
        metrics = m.get("metrics") or {}
        mark = "* " if m["version"] == current else "  "
        print(
            f"{mark}{m['version']:<24} {str(m.get('created', ''))[:25]:<26} {m.get('n_annotations', '-'):>6} "
            f"{_fmt_metric(metrics.get('val_iou')):>8} {_fmt_metric(metrics.get('val_dice')):>8} "
            f"{_fmt_metric(m.get('training_seconds')):>8}  {m.get('parent') or '-'}"
        )
    print("(* = current)")
    return 0


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    reg = ModelRegistry(settings.model_dir, args.project)
    previous = reg.current_version()
    try:
        reg.rollback(args.version)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"project {args.project}: current model {previous} -> {args.version}")
    print("serving processes pick it up on their next request; Label Studio keeps showing the predictions of the")
    print("version its project is set to until the next training re-scores the queue")
    return 0


def learning_curve(metas: list[dict]) -> list[tuple[int, float, str]]:
    """(number of annotations, validation IoU, version) for every version that has both."""
    points = []
    for m in metas:
        iou = (m.get("metrics") or {}).get("val_iou")
        n = m.get("n_annotations")
        if iou is not None and n is not None:
            points.append((int(n), float(iou), m["version"]))
    return points


def plot_learning_curve(points: list[tuple[int, float, str]], current: str | None, out: Path, title: str) -> Path:
    """Validation IoU against the number of annotations, one point per version (PNG, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if points:
        xs, ys, names = zip(*points, strict=True)
        ax.plot(xs, ys, "o-", color="tab:blue", label="version")
        for x, y, name in points:
            if name == current:
                ax.plot([x], [y], "*", color="tab:red", markersize=14, label=f"current ({name.split('-')[0]})")
    else:
        ax.text(0.5, 0.5, "no trained version yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("annotated tiles used for training")
    ax.set_ylabel("validation IoU (foreground)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if points:
        ax.legend(loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend import queue as q

    reg = ModelRegistry(settings.model_dir, args.project)
    try:
        current = reg.current_version()
        current_meta = reg.current_meta()
    except RegistryError as exc:
        current, current_meta = None, None
        print(f"warning: {exc}", file=sys.stderr)
    metas = reg.versions()
    try:
        state: dict[str, Any] | None = q.queue_state(int(args.project), settings)
        queue_error = None
    except q.QueueUnavailable as exc:
        state, queue_error = None, str(exc)
    points = learning_curve(metas)
    report = {
        "project": args.project,
        "current_version": current,
        "versions": len(metas),
        "last_training": None
        if current_meta is None
        else {
            k: current_meta.get(k)
            for k in ("version", "created", "n_annotations", "metrics", "training_seconds", "device", "steps")
        },
        "queue": state,
        "queue_error": queue_error,
        "learning_curve": [{"n_annotations": n, "val_iou": v, "version": name} for n, v, name in points],
    }
    if args.plot:
        report["plot"] = str(plot_learning_curve(points, current, Path(args.plot), f"project {args.project}"))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"project {args.project}")
    print(f"  current version : {current or 'none (not trained yet)'} ({len(metas)} version(s) stored)")
    if current_meta:
        metrics = current_meta.get("metrics") or {}
        print(
            f"  last training   : {current_meta.get('n_annotations')} annotations, val IoU "
            f"{_fmt_metric(metrics.get('val_iou'))}, val Dice {_fmt_metric(metrics.get('val_dice'))}, "
            f"{_fmt_metric(current_meta.get('training_seconds'))} s on {current_meta.get('device')}"
        )
    if state is None:
        print(f"  queue           : unavailable ({queue_error})")
    else:
        print(
            f"  queue           : {len(state['queued'])} queued, running: {state['running'] or 'none'}, "
            f"{len(state['scheduled_retries'])} waiting for a retry, {len(state['failed'])} failed"
        )
        print(f"  pending         : {state['pending_annotations']} / {state['threshold']} new annotations")
        if state.get("running_progress"):
            print(f"  progress        : {json.dumps(state['running_progress'], default=str)}")
        for failed in state["failed"]:
            print(f"  failed job      : {failed['id']} at {failed['ended']}: {' '.join(failed['error'])}")
        if state.get("last_job"):
            last = state["last_job"]
            print(f"  last job        : {last.get('status')} {last.get('version') or ''} {last.get('error') or ''}")
    print("  learning curve  : " + (", ".join(f"{n} -> {v:.3f}" for n, v, _ in points) or "no points yet"))
    if args.plot:
        print(f"  plot            : {report['plot']}")
    return 0


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    removed = ModelRegistry(settings.model_dir, args.project).prune(args.keep)
    print(f"project {args.project}: removed {len(removed)} version(s): {', '.join(removed) or '-'}")
    return 0


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend import queue as q

    try:
        out = q.schedule_training(int(args.project), settings, reason="cli", force=True)
    except (q.QueueUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    cmd = worker_command(settings, burst=args.burst, name=args.name, extra=args.rq_args)
    print("starting: " + " ".join(cmd), file=sys.stderr, flush=True)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    os.execv(cmd[0], cmd)  # the worker replaces this process (signals go straight to rq)
    return 1  # pragma: no cover


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ml_backend.cli", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("versions", help="list a project's model versions (oldest first)")
    p.add_argument("--project", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("rollback", help="make an existing version current again")
    p.add_argument("--project", required=True)
    p.add_argument("--version", required=True)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("status", help="current version, queue state, last metrics, learning curve")
    p.add_argument("--project", required=True)
    p.add_argument("--plot", help="save the learning curve (val IoU vs annotations) as this PNG")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("prune", help="delete all but the newest K versions (never the current one)")
    p.add_argument("--project", required=True)
    p.add_argument("--keep", type=int, default=None, help="default: KEEP_VERSIONS")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("train", help="enqueue a training job now (same as Label Studio's Start training)")
    p.add_argument("--project", required=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "worker",
        help="start an RQ worker for the training jobs",
        description="Runs: rq worker --serializer rq.serializers.JSONSerializer --with-scheduler --worker-class "
        "ml_backend.worker.RecoveringWorker with the WORKER_* recovery intervals, -u $REDIS_URL $RQ_QUEUE (start one "
        "per CPU/GPU you want to train or re-score on).",
    )
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--name", help="worker name")
    p.add_argument("--dry-run", action="store_true", help="print the rq command instead of running it")
    p.add_argument("rq_args", nargs=argparse.REMAINDER, help="further arguments passed to `rq worker`")
    p.set_defaults(func=cmd_worker)

    for name, (_module, text) in DELEGATED.items():
        p = sub.add_parser(name, help=f"{text} (`ml-backend {name} --help`)", add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        return int(importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    settings = get_settings()
    if getattr(args, "keep", "unset") is None:
        args.keep = settings.keep_versions
    return int(args.func(args, settings) or 0)


if __name__ == "__main__":
    sys.exit(main())
