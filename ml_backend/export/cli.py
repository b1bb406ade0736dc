"""`ml-backend export`: segment whole stacks with a model version and measure their 3-D objects.

    ml-backend export --project 1 STACK.tif -o exports/stack1                 # the live version, TIFF + CSV tables
    ml-backend export --project 1 --version v0003-... SLICES/ -o out --voxel-size 0.005,0.005,0.005 --format zarr
    ml-backend export --project 1 -o exports --from-label-studio               # the stacks the tasks were imported
                                                                               # from, annotators' masks winning
    ml-backend export --project 1 STACK.tif -o out --annotations export.json  # annotations from an LS JSON export

Running the same command again after an interruption resumes it (``--restart`` starts afresh).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import sys
from pathlib import Path
from typing import Any

from ml_backend.config import Settings
from ml_backend.data.context import parse_offsets
from ml_backend.ids import project_arg
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.project_data import LabelStudioProject
from ml_backend.store.projects import ProjectStore

from .annotations import load_tasks_file, overrides_for_stack
from .driver import export_stack
from .run import ExportError
from .source import ExportInputError, open_stack

log = logging.getLogger(__name__)


def _voxel_size(text: str | None) -> tuple[float, float, float] | None:
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X in micrometres, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected three positive sizes Z,Y,X in micrometres, got {text!r}")
    return values  # type: ignore[return-value]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_").lower() or "class"


def _label_config(args: argparse.Namespace, settings: Settings, project: Any) -> Any:
    """The project's BrushConfig: --label-config, else Label Studio's, else the one /setup stored; None if none."""
    if args.label_config:
        return parse_label_config(Path(args.label_config).read_text())
    if project is not None:  # the Label Studio project's (ProjectData.label_config)
        return project.label_config()[0]
    xml = ProjectStore(settings.model_dir).label_config_xml(str(args.project))
    return parse_label_config(xml) if xml else None


def _digest(overrides: list) -> str:
    h = hashlib.sha1()
    for o in overrides:
        h.update(f"{o.task_id},{o.z},{o.y},{o.x},{o.mask.shape}".encode())
        h.update(o.mask.astype("int8").tobytes())
    return h.hexdigest() if overrides else ""


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ml-backend export",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("stacks", nargs="*", help="multi-page TIFF files, images or folders of slices (the importer's "
                   "inputs); none: the stacks recorded in the project's tasks (needs --from-label-studio)")  # fmt: skip
    p.add_argument("--project", required=True, type=project_arg,
                   help="project id in 1..2**31-1 (its versions live under MODEL_DIR/projects/<id>)")
    p.add_argument("--version", default=None, help="model version (default: the project's live version)")
    p.add_argument("-o", "--output", required=True, help="output directory (one sub-directory per stack when "
                   "several stacks are exported); must not exist")  # fmt: skip
    p.add_argument("--format", choices=("auto", "tiff", "zarr"), default="auto",
                   help="multi-page TIFF, OME-Zarr, or auto: OME-Zarr above EXPORT_TIFF_MAX_BYTES")  # fmt: skip
    p.add_argument("--voxel-size", type=_voxel_size, default=None,
                   help="voxel size in micrometres, Z,Y,X (or one value): volumes in um^3, OME-Zarr scale")  # fmt: skip
    p.add_argument("--probabilities", action="store_true", help="also write per-class probability maps (uint8)")
    p.add_argument("--annotations", default=None, help="Label Studio JSON export: its annotations win over the "
                   "prediction on their tiles")  # fmt: skip
    p.add_argument("--from-label-studio", action="store_true",
                   help="read the project's tasks and annotations from Label Studio (LABEL_STUDIO_URL)")
    p.add_argument("--label-config", default=None, help="label config XML file (default: the project's)")
    p.add_argument("--context-offsets", default=None, help="refuse a version that does not read exactly these "
                   "slice offsets (e.g. the project's CONTEXT_OFFSETS); default: the version's own")  # fmt: skip
    p.add_argument("--chunk-slices", type=int, default=settings.export_chunk_slices)
    p.add_argument("--min-voxels", type=int, default=settings.export_min_voxels)
    p.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=26)
    p.add_argument("--backend", choices=("cc3d", "skimage"), default="cc3d", help="connected-components library")
    p.add_argument("--executor", choices=("local", "rq"), default="local",
                   help="local: this process; rq: one job per chunk on the RQ workers (RQ_QUEUE)")  # fmt: skip
    p.add_argument("--restart", action="store_true", help="discard an interrupted export instead of resuming it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_env()
    args = build_parser(settings).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        results = run(args, settings)
    except (ExportError, ExportInputError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, manifest in results:
        counts = ", ".join(f"{n} {c}" for c, n in manifest["objects"].items())
        print(f"{manifest['stack']}: {counts} objects -> {path} ({manifest['timing']['total_s']:.1f} s)")
    return 0


def run(args: argparse.Namespace, settings: Settings) -> list[tuple[Path, dict]]:
    project = None
    tasks: list[dict] = []
    if args.from_label_studio:
        project = LabelStudioProject(int(args.project), settings)  # connects (checked, retried)
        tasks = list(project.tasks().values())
    if args.annotations:
        tasks += load_tasks_file(args.annotations)
    stacks = list(args.stacks) or sorted({str((t.get("data") or {}).get("stack")) for t in tasks
                                          if (t.get("data") or {}).get("stack")})  # fmt: skip
    if not stacks:
        raise ExportError("no stack to export: give stack paths, or --from-label-studio for the stacks recorded in "
                          "the project's tasks")  # fmt: skip
    config = _label_config(args, settings, project)
    if tasks and config is None:
        raise ExportError(f"annotations given but no label config for project {args.project} (neither stored by "
                          "/setup nor from Label Studio): pass --label-config")  # fmt: skip
    names = ("background", *(_slug(n) for n in config.foreground_labels)) if config is not None else None
    out = Path(args.output)
    sources = [open_stack(s) for s in stacks]  # every stack checked before the first is exported
    results = []
    for src in sources:
        target = out if len(sources) == 1 else out / _slug(src.path.stem if src.path.is_file() else src.path.name)
        overrides, skipped = ([], [])
        if tasks and config is not None:
            overrides, skipped = overrides_for_stack(tasks, config, src.key, src.shape, src.n_slices)
            log.info("%s: %d annotated tiles win over the prediction (%d skipped)", src.key, len(overrides),
                     len(skipped))  # fmt: skip
        manifest = export_stack(
            src.key, target, executor=args.executor, progress=not args.quiet, settings=settings,
            model_dir=settings.model_dir, project=str(args.project), version=args.version,
            expected_offsets=parse_offsets(args.context_offsets) if args.context_offsets else None,
            class_names=names, overrides=overrides, annotations_digest=_digest(overrides), fmt=args.format,
            tiff_max_bytes=settings.export_tiff_max_bytes, restart=args.restart, chunk_slices=args.chunk_slices,
            connectivity=args.connectivity, backend=args.backend, min_voxels=args.min_voxels,
            probabilities=args.probabilities, voxel_size_um=args.voxel_size, tile=settings.tile_size,
            overlap=settings.tile_overlap, batch=settings.inference_batch, device=settings.device,
            extra={"annotated_tiles": len(overrides), "skipped_annotations": skipped[:50]},
        )  # fmt: skip
        results.append((target.resolve(), manifest))
    return results


if __name__ == "__main__":
    sys.exit(main())
