"""``ml-backend status / train``: a project's current version, queue state, last job and learning curve; enqueue a
training now."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ml_backend.config import Settings
from ml_backend.store.registry import ModelRegistry, RegistryError

from .versions import fmt_metric


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
    from ml_backend import queue as q  # local: queue/ loads torch, rq and redis; every ml-backend command imports cli/

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
            f"{fmt_metric(metrics.get('val_iou'))}, val Dice {fmt_metric(metrics.get('val_dice'))}, "
            f"{fmt_metric(current_meta.get('training_seconds'))} s on {current_meta.get('device')}"
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
            if isinstance(last.get("promotion"), dict) and last["promotion"].get("reason"):
                print(f"  promotion       : {last['promotion']['reason']}")
    print("  learning curve  : " + (", ".join(f"{n} -> {v:.3f}" for n, v, _ in points) or "no points yet"))
    if args.plot:
        print(f"  plot            : {report['plot']}")
    return 0


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from ml_backend import queue as q  # local: queue/ loads torch, rq and redis; every ml-backend command imports cli/

    try:
        out = q.schedule_training(int(args.project), settings, reason="cli", force=True)
    except (q.QueueUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0
