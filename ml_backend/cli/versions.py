"""``ml-backend versions / rollback / prune``: a project's model versions in the registry."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ml_backend.config import Settings
from ml_backend.store.registry import ModelRegistry, RegistryError


def fmt_metric(value: Any) -> str:
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
            f"{fmt_metric(metrics.get('val_iou')):>8} {fmt_metric(metrics.get('val_dice')):>8} "
            f"{fmt_metric(m.get('training_seconds')):>8}  {m.get('parent') or '-'}"
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


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    removed = ModelRegistry(settings.model_dir, args.project).prune(args.keep)
    print(f"project {args.project}: removed {len(removed)} version(s): {', '.join(removed) or '-'}")
    return 0
