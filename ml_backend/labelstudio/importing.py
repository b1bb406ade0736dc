"""Import EM stacks into a Label Studio project as tiles, without duplicating tasks when run again.

Input: multi-page TIFF stacks, single images, or folders of PNG/TIFF slices (8- or 16-bit; read with
``ml_backend.data.stacks.read_stack``). Each slice is cut into tiles of ``--tile`` pixels (the last row/column of
tiles is shifted inwards so every tile has full size; slices smaller than a tile become one tile). Tiles are written
as lossless PNG (8-bit stays 8-bit, 16-bit stays 16-bit; float data is scaled to 16-bit) under a folder inside
Label Studio's local-files document root, and imported as tasks whose image is ``/data/local-files/?d=<relative
path>``. A local storage covering that folder is created (never synced: syncing would add a second task per file)
so that Label Studio serves the files. Task data: the image plus ``source`` (the slice's file), ``stack`` (the
imported path), ``slice``, ``tile_x``, ``tile_y``, ``tile_width``, ``tile_height``, and ``<image key>_prev`` /
``<image key>_next``: the URLs of the same tile window on slices z-1 and z+1 of the stack (the tile's own URL at the
stack's ends or where that slice has no such tile), which ``label_config/dense_25d.xml`` shows beside the tile and
2.5D context (CONTEXT_OFFSETS, ``labelstudio.neighbours``) reads.

Idempotent: tasks whose image URL already exists in the project are skipped, files already written are kept.
When new tasks were created, ``ml-backend import`` (``cli/importing.py``, which runs this module's ``main``) queues
the project's cold start (``cli.importing.enqueue_cold_start``: pretraining on the tiles, then a coverage-ordered
first queue; ``--no-pretrain`` or PRETRAIN=false to skip).

    ml-backend import --project 1 --tile 256 path/to/stack.tif path/to/slices_folder/
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from ml_backend.config import Settings
from ml_backend.data.stacks import read_stack
from ml_backend.ids import project_arg
from ml_backend.imaging import normalize, to_greyscale
from ml_backend.labelstudio.client import (
    LabelStudioError,
    call,
    connect,
    ensure_local_storage,
    list_tasks,
)
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.neighbours import neighbour_keys
from ml_backend.store.atomic import write_atomic

REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("import_tiles")

IMPORT_CHUNK = 500


class ImportTilesError(RuntimeError):
    """Bad arguments or inputs (message says what to fix)."""


@dataclass(frozen=True)
class Tile:
    path: Path  # PNG file under the document root
    data: dict[str, Any]  # task data


def tile_origins(height: int, width: int, tile: int) -> Iterator[tuple[int, int]]:
    """(y, x) of tiles covering the slice without overlap except the last row/column, shifted to fit inside."""
    from ml_backend.inference.tiling import tile_starts  # local: inference/ loads torch; `ml-backend import` does not

    for y in tile_starts(height, tile, 0):
        for x in tile_starts(width, tile, 0):
            yield y, x


def to_png_array(image: np.ndarray) -> np.ndarray:
    """uint8/uint16 (H, W) or uint8 (H, W, 3|4) as is; other dtypes scaled to uint16 (robust, per slice)."""
    arr = np.asarray(image)
    if arr.dtype == np.uint8 or (arr.dtype == np.uint16 and arr.ndim == 2):
        return arr
    if arr.ndim == 3:
        arr = to_greyscale(arr)

    return np.round(normalize(arr) * 65535.0).astype(np.uint16)


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _write_if_missing(path: Path, data: bytes) -> bool:
    """Write a tile once (a re-run keeps the existing file); atomic, so Label Studio never serves half a PNG."""
    if path.is_file():
        return False
    write_atomic(path, data)
    return True


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "stack"


def local_files_url(path: Path, document_root: Path) -> str:
    rel = path.resolve().relative_to(document_root.resolve()).as_posix()
    return "/data/local-files/?d=" + quote(rel, safe="/")


def make_tiles(
    stacks: list[str | Path],
    out_dir: Path,
    document_root: Path,
    *,
    tile: int = 256,
    image_key: str = "image",
    progress: bool = True,
) -> list[Tile]:
    """Cut every slice of every stack into tiles, write the PNGs under ``out_dir`` and return the tiles' task data."""
    from tqdm.auto import tqdm

    if tile < 16:
        raise ImportTilesError(f"--tile must be >= 16 pixels, got {tile}")
    document_root = document_root.resolve()
    out_dir = out_dir.resolve()
    if document_root != out_dir and document_root not in out_dir.parents:
        raise ImportTilesError(
            f"tile folder {out_dir} must be inside the local-files document root {document_root} "
            "(LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT), or Label Studio cannot serve it"
        )
    tiles: list[Tile] = []
    for stack in stacks:
        stack_path = Path(stack).expanduser().resolve()
        slices = read_stack(stack_path)
        folder = out_dir / _slug(stack_path.stem if stack_path.is_file() else stack_path.name)
        before, written = len(tiles), 0
        by_slice: dict[tuple[int, int, int, int, int], str] = {}  # (z, y, x, h, w) -> URL, for the neighbours
        for sl in tqdm(slices, desc=f"tiling {stack_path.name}", unit="slice", disable=not progress):
            arr = to_png_array(sl.image)
            h, w = arr.shape[:2]
            for y, x in tile_origins(h, w, tile):
                crop = arr[y : y + tile, x : x + tile]
                name = f"{_slug(Path(sl.source).stem)}_z{sl.index:04d}_y{y:05d}_x{x:05d}_{tile}.png"
                path = folder / name
                written += _write_if_missing(path, _png_bytes(crop))
                url = local_files_url(path, document_root)
                by_slice[(int(sl.index), int(y), int(x), int(crop.shape[0]), int(crop.shape[1]))] = url
                tiles.append(
                    Tile(
                        path,
                        {
                            image_key: url,
                            "source": str(Path(sl.source)),
                            "stack": str(stack_path),
                            "slice": int(sl.index),
                            "tile_x": int(x),
                            "tile_y": int(y),
                            "tile_width": int(crop.shape[1]),
                            "tile_height": int(crop.shape[0]),
                        },
                    )
                )
        add_neighbour_urls(tiles[before:], by_slice, image_key)
        log.info("%s: %d slices, %d tiles (%d new files) in %s", stack_path, len(slices), len(tiles) - before, written,
                 folder)  # fmt: skip
    return tiles


def add_neighbour_urls(tiles: list[Tile], by_slice: dict[tuple[int, int, int, int, int], str], image_key: str) -> None:
    """Write ``<image key>_prev`` / ``_next`` into the task data of one stack's tiles: the URL of the same window
    (y, x, h, w) on slice z-1 / z+1, or the tile's own URL at the stack's ends and where that slice has no such tile
    (``data.context``'s rules: edges replicate, a missing neighbour is the tile itself)."""
    keys = neighbour_keys(image_key)
    for t in tiles:
        d = t.data
        z, y, x, h, w = d["slice"], d["tile_y"], d["tile_x"], d["tile_height"], d["tile_width"]
        for offset, key in keys.items():
            d[key] = by_slice.get((z + offset, y, x, h, w), d[image_key])


def project_image_key(ls: Any, project_id: int) -> str:
    """The task data key of the project's <Image> (from its label config)."""
    project = call(ls, ls.projects.get, id=int(project_id), what=f"reading project {project_id}")
    return parse_label_config(project.label_config).image_key


def import_tiles(
    ls: Any,
    project_id: int,
    stacks: list[str | Path],
    *,
    document_root: str | Path,
    out_dir: str | Path | None = None,
    tile: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Tile ``stacks`` into the project; returns {"tiles", "created", "skipped", "task_ids", "storage", "folder"}."""
    from tqdm.auto import tqdm

    document_root = Path(document_root).expanduser().resolve()
    if not document_root.is_dir():
        raise ImportTilesError(f"local-files document root {document_root} does not exist")
    folder = Path(out_dir).expanduser().resolve() if out_dir else document_root / "tiles" / f"project-{project_id}"
    image_key = project_image_key(ls, project_id)
    tiles = make_tiles(stacks, folder, document_root, tile=tile, image_key=image_key, progress=progress)
    storage = ensure_local_storage(ls, project_id, str(folder))
    existing = {
        str((t.get("data") or {}).get(image_key))
        for t in list_tasks(ls, project_id, fields="task_only")
        if (t.get("data") or {}).get(image_key)
    }
    seen: set[str] = set()
    new = []
    for t in tiles:
        url = t.data[image_key]
        if url in existing or url in seen:
            continue
        seen.add(url)
        new.append(t.data)
    task_ids: list[int] = []
    with tqdm(total=len(new), desc="importing tasks", unit="task", disable=not progress) as bar:
        for start in range(0, len(new), IMPORT_CHUNK):
            chunk = new[start : start + IMPORT_CHUNK]
            resp = call(
                ls, ls.projects.import_tasks, id=int(project_id), request=chunk, return_task_ids=True,
                what=f"importing {len(chunk)} tasks into project {project_id}",
            )  # fmt: skip
            task_ids.extend(int(i) for i in (getattr(resp, "task_ids", None) or []))
            bar.update(len(chunk))
    summary = {
        "tiles": len(tiles),
        "created": len(new),
        "skipped": len(tiles) - len(new),
        "task_ids": task_ids,
        "storage": storage.get("id"),
        "folder": str(folder),
    }
    log.info("project %s: %d tiles, %d new tasks, %d already imported", project_id, len(tiles), len(new),
             summary["skipped"])  # fmt: skip
    return summary


def main(argv: list[str] | None = None, *, cold_start: Callable[[int, Settings, Any], dict] | None = None) -> int:
    """``ml-backend import`` (``cli/importing.py`` passes ``cold_start``, the queueing of the project's cold start,
    called when tasks were created unless ``--no-pretrain``)."""
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stacks", nargs="+", help="multi-page TIFF files, images, or folders of PNG/TIFF slices")
    parser.add_argument("--project", type=project_arg, required=True, help="Label Studio project id (1..2**31-1)")
    parser.add_argument("--tile", type=int, default=256, help="tile size in pixels (default 256)")
    parser.add_argument("--out-dir", default=None, help="tile folder inside the document root "
                        "(default <root>/tiles/project-<id>)")  # fmt: skip
    parser.add_argument("--document-root", default=settings.local_files_root or None,
                        help="LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT of the Label Studio server")  # fmt: skip
    parser.add_argument("--url", default=settings.label_studio_url, help="LABEL_STUDIO_URL")
    parser.add_argument("--token", default=settings.label_studio_api_key, help="LABEL_STUDIO_API_KEY")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--no-pretrain",
        action="store_true",
        help="do not queue the cold start (self-supervised pretraining + coverage-ordered queue)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.document_root:
        parser.error("--document-root (or LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) is required")
    try:
        ls = connect(Settings.from_env(label_studio_url=args.url, label_studio_api_key=args.token))
        summary = import_tiles(
            ls, args.project, args.stacks, document_root=args.document_root, out_dir=args.out_dir, tile=args.tile,
            progress=not args.quiet,
        )  # fmt: skip
    except (LabelStudioError, ImportTilesError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{summary['created']} tasks created, {summary['skipped']} already there ({summary['tiles']} tiles in "
          f"{summary['folder']})")  # fmt: skip
    if summary["created"] and not args.no_pretrain and cold_start is not None:
        try:
            queued = cold_start(args.project, settings, ls)
        except LabelStudioError as exc:  # the tiles are in; only the first queue's order is missing
            print(f"warning: first queue not published: {exc}", file=sys.stderr)
            return 0
        print(f"cold start: {queued['status']}")
    return 0

