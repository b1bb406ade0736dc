"""Operator commands: model versions, rollback, per-project status with a learning curve, the RQ worker.

    python -m ml_backend.cli versions --project 1
    python -m ml_backend.cli rollback --project 1 --version v0003-20260101T120000Z
    python -m ml_backend.cli status   --project 1 --plot learning_curve.png
    python -m ml_backend.cli train    --project 1          # enqueue a training now (like "Start training")
    ml-backend benchmark --quick                            # AL learning curves (ml_backend.benchmarks)
    ml-backend import --project 1 STACK.tif                 # tiles into Label Studio (ml_backend.cli.importing)
    ml-backend setup --backend-url http://127.0.0.1:9090    # project + ML backend (ml_backend.labelstudio.setup)
    ml-backend label-studio --port 8080                     # a local Label Studio (ml_backend.services.label_studio)
    ml-backend export --project 1 STACK.tif -o out          # whole-stack segmentation + 3-D objects (ml_backend.export)
    python -m ml_backend.cli worker                         # = rq worker --serializer rq.serializers.JSONSerializer
                                                            #   --with-scheduler --worker-class
                                                            #   ml_backend.worker.RecoveringWorker (+ intervals)
                                                            #   -u $REDIS_URL $RQ_QUEUE

Every command reads the same environment as the backend (MODEL_DIR, REDIS_URL, RQ_QUEUE, ...; see README).
"""

from __future__ import annotations

import argparse
import sys

from ml_backend import ids
from ml_backend.config import get_settings

from .status import cmd_status, cmd_train, learning_curve, plot_learning_curve
from .versions import cmd_prune, cmd_rollback, cmd_versions
from .worker import WORKER_CLASS, cmd_worker, worker_command

__all__ = ["WORKER_CLASS", "build_parser", "learning_curve", "main", "plot_learning_curve", "worker_command"]

# Subcommands whose module has its own argument parser: `ml-backend <name> ARGS` = that module's main(ARGS).
DELEGATED = {
    "benchmark": ("ml_backend.benchmarks.cli", "simulated active learning: learning curves of every strategy"),
    "import": ("ml_backend.cli.importing", "import EM stacks into a Label Studio project as tiles"),
    "setup": ("ml_backend.labelstudio.setup", "create/update the Label Studio project and connect the backend"),
    "label-studio": ("ml_backend.services.label_studio", "install (once) and run a local Label Studio"),
    "redis": ("ml_backend.services.redis", "run a local Redis (system redis-server or the bundled one)"),
    "quickstart": ("ml_backend.quickstart", "the whole annotation loop on generated or given data"),
    "export": ("ml_backend.export.cli", "segment whole stacks with a model version; 3-D object tables"),
}


def project_arg(text: str) -> str:
    """``--project``: a Label Studio project id in 1..MAX_ID (``ml_backend.ids``, the one id parser), as the text that
    names its folder under MODEL_DIR/projects; anything else is a usage error before any file or key is touched."""
    return str(ids.project_arg(text))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ml_backend.cli", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("versions", help="list a project's model versions (oldest first)")
    p.add_argument("--project", required=True, type=project_arg)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("rollback", help="make an existing version current again")
    p.add_argument("--project", required=True, type=project_arg)
    p.add_argument("--version", required=True)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("status", help="current version, queue state, last metrics, learning curve")
    p.add_argument("--project", required=True, type=project_arg)
    p.add_argument("--plot", help="save the learning curve (val IoU vs annotations) as this PNG")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("prune", help="delete all but the newest K versions (never the current one)")
    p.add_argument("--project", required=True, type=project_arg)
    p.add_argument("--keep", type=int, default=None, help="default: KEEP_VERSIONS")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("train", help="enqueue a training job now (same as Label Studio's Start training)")
    p.add_argument("--project", required=True, type=project_arg)
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
