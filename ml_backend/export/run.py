"""Whole-stack export: a model version applied to every slice, annotations placed over it, 3-D objects measured.

Stages (each chunk = ``chunk_slices`` whole slices; the work directory is ``.<output>.partial`` beside the output):

1. ``prepare``: every input is checked before a byte is written (slice sizes from headers, the version exists and
   reads the input channels this export can build, annotations decode); then ``plan.json``, the Zarr arrays and the
   annotators' masks are written into the work directory. A work directory from an interrupted run with the same
   plan is resumed; one with another plan is refused.
2. ``predict_chunk(j)`` (any order, any worker: the RQ job ``export.jobs.export_chunk`` runs the same function):
   tiled inference with blending per slice (``inference.tiling.predict_tiled``, the model's own 2.5D offsets read
   by ``data.context.read_context``), argmax, annotations win where they label a pixel, the class map (and optional
   uint8 probabilities) into Zarr, connected components of the slab (``objects.label_chunk``) with their sums. The
   chunk's ``.objects.npz``, written last and atomically, marks it done: a re-run skips it.
3. ``merge``: objects crossing chunk borders joined exactly once (``objects.merge_chunks``), labels numbered.
4. ``relabel_chunk(j)``: the final object labels into Zarr.
5. ``finalize``: per-class object tables, the per-slice summary, OME-Zarr metadata or multi-page TIFFs, a manifest;
   the work directory is renamed to the output in one ``os.rename``, so an output that exists is complete.

``driver.export_stack`` runs the stages (stage 2 in its process or as RQ jobs: ``jobs.run_chunks_on_rq``).

Memory: one chunk's slices plus one slice's probabilities, whatever the number of slices. A bad input leaves
nothing behind; a full disk removes the work directory (its space is what the disk needs) and says so; an
interruption (Ctrl-C, a killed worker) keeps it for the resume.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.config import torch_device
from ml_backend.data.context import SliceReader, model_offsets, read_context
from ml_backend.inference.tiling import predict_tiled
from ml_backend.store.atomic import open_atomic, write_atomic
from ml_backend.store.registry import ModelRegistry, RegistryError

from .annotations import apply_overrides, read_overrides, write_overrides
from .objects import ChunkObjects, ObjectTable, label_chunk, merge_chunks, write_object_tables
from .source import ExportInputError, StackSource, open_stack

log = logging.getLogger(__name__)

__all__ = ["ExportError", "ExportPlan", "ExportWriteError", "chunk_file", "finalize", "merge", "predict_chunk",
           "prepare", "relabel_chunk"]  # fmt: skip

PLAN = "plan.json"
ZARR = "export.ome.zarr"
LOCAL = "local_labels.zarr"
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# Plan fields that change the result: a partial export is resumed only when all of them agree.
_IDENTITY = ("stack", "shape", "project", "version", "offsets", "tile", "overlap", "chunk_slices", "connectivity",
             "probabilities", "classes", "annotations_digest")  # fmt: skip


class ExportError(RuntimeError):
    """The export cannot go on (unknown version, unusable model, foreign partial export, ...); says what to do."""


class ExportWriteError(ExportError):
    """Writing the export failed (disk full, read-only); the work directory is removed, nothing looks complete."""


@dataclass
class ExportPlan:
    """Everything a chunk job needs, stored as ``plan.json`` in the work directory."""

    stack: str
    shape: tuple[int, int, int]
    model_dir: str
    project: str
    version: str
    offsets: tuple[int, ...]
    classes: tuple[str, ...]
    output: str
    format: str
    chunk_slices: int = 16
    connectivity: int = 26
    backend: str = "cc3d"
    min_voxels: int = 64
    probabilities: bool = False
    voxel_size_um: tuple[float, float, float] | None = None
    tile: int = 256
    overlap: int = 32
    batch: int = 4
    device: str = "auto"
    annotations_digest: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_chunks(self) -> int:
        return -(-self.shape[0] // self.chunk_slices)

    def chunk_range(self, j: int) -> tuple[int, int]:
        z0 = j * self.chunk_slices
        return z0, min(self.shape[0], z0 + self.chunk_slices)

    def save(self, work: Path) -> None:
        write_atomic(work / PLAN, json.dumps(asdict(self), indent=2, sort_keys=True), durable=True)

    @classmethod
    def load(cls, work: Path) -> ExportPlan:
        data = json.loads((Path(work) / PLAN).read_text())
        for key in ("shape", "offsets", "classes"):
            data[key] = tuple(data[key])
        if data.get("voxel_size_um") is not None:
            data["voxel_size_um"] = tuple(data["voxel_size_um"])
        return cls(**data)


def work_dir_for(output: Path) -> Path:
    """The work directory of an output: hidden, beside it (same file system, so the final rename is atomic)."""
    return output.parent / f".{output.name}.partial"


# ------------------------------------------------------------------------------------------------ writing guards
def _no_space_message(exc: OSError, where: Path) -> str:
    free = ""
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(where)
        free = f" ({usage.free / 1e6:.1f} MB free of {usage.total / 1e6:.1f} MB)"
    return f"no space left on the disk holding {where}{free}"


def _is_no_space(exc: BaseException) -> bool:
    for err in (exc, exc.__cause__, exc.__context__):
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return True
    return "No space left" in str(exc)


@contextlib.contextmanager
def guarded_writes(work: Path) -> Any:
    """Turn a full disk into ``ExportWriteError`` and a bad input into an ``ExportInputError``, both after removing
    the work directory; any other interruption (KeyboardInterrupt, a killed job) leaves it for the resume."""
    try:
        yield
    except ExportInputError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    except (OSError, RuntimeError) as exc:
        if not _is_no_space(exc) or isinstance(exc, ExportError):
            raise
        message = _no_space_message(exc, work.parent)
        shutil.rmtree(work, ignore_errors=True)
        raise ExportWriteError(f"export to {work.parent} failed: {message}; the partial export was removed, nothing "
                               "was left that looks complete") from exc  # fmt: skip


# ------------------------------------------------------------------------------------------------ model
def check_channels(model: Any, version: str, expected: Sequence[int] | None = None) -> tuple[int, ...]:
    """The slice offsets the version reads; ExportError when its weights, its hparams and ``expected`` disagree."""
    from torch import nn

    hp = dict(getattr(model, "hparams", {}) or {})
    offsets = model_offsets(model)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    weights_in = None if first is None else int(first.weight.shape[1])
    declared = int(hp.get("in_channels", len(offsets)))
    if weights_in is not None and weights_in != declared or declared != len(offsets):
        raise ExportError(f"version {version} is inconsistent: its weights read {weights_in} input channel(s), its "
                          f"hyper-parameters say {declared}, slice offsets {list(offsets)}")  # fmt: skip
    if expected is not None and tuple(int(o) for o in expected) != offsets:
        raise ExportError(
            f"version {version} was trained on {len(offsets)} input channel(s) (slices z{list(offsets)}), but this "
            f"export asks for slices z{list(expected)}: export with that version's own channels (omit "
            "--context-offsets) or choose a version trained on these"
        )
    return offsets


def resolve_version(model_dir: Path, project: str, version: str | None) -> str:
    """The requested version, else the project's live one; ExportError naming the known versions otherwise."""
    registry = ModelRegistry(model_dir, project)
    known = [m["version"] for m in registry.versions()]
    if version in (None, "", "live", "current"):
        try:
            live = registry.current_version()
        except RegistryError as exc:
            raise ExportError(str(exc)) from exc
        if live is None:
            raise ExportError(f"project {project} has no live model version under {registry.root} (known: "
                              f"{', '.join(known) or 'none'}); train one first or pass --version")  # fmt: skip
        return live
    if version not in known:
        raise ExportError(f"project {project} has no version {version!r} (known: {', '.join(known) or 'none'})")
    return version


@functools.lru_cache(maxsize=2)
def _load_model(model_dir: str, project: str, version: str, device: str) -> Any:
    model, _meta = ModelRegistry(model_dir, project).load(version, map_location="cpu")
    return model.to(torch_device(device)).eval()


# ------------------------------------------------------------------------------------------------ zarr
def _zarr_group(work: Path, mode: str = "r+") -> Any:
    import zarr

    return zarr.open_group(str(work / ZARR), mode=mode)


def _create_arrays(work: Path, plan: ExportPlan) -> None:
    import zarr

    z, h, w = plan.shape
    xy = (min(h, 1024), min(w, 1024))
    root = zarr.open_group(str(work / ZARR), mode="w")
    root.create_array("segmentation/0", shape=(z, h, w), chunks=(1, *xy), dtype="uint8", fill_value=0)
    root.create_array("objects/0", shape=(z, h, w), chunks=(1, *xy), dtype="uint32", fill_value=0)
    if plan.probabilities:
        root.create_array("probabilities/0", shape=(len(plan.classes), z, h, w), chunks=(1, 1, *xy), dtype="uint8",
                          fill_value=0)  # fmt: skip
    zarr.open_array(str(work / LOCAL), mode="w", shape=(z, h, w), chunks=(1, *xy), dtype="uint32", fill_value=0)


def chunk_file(work: Path, j: int, kind: str) -> Path:
    return work / "chunks" / f"{j:05d}.{kind}"


# ------------------------------------------------------------------------------------------------ stages
def prepare(
    stack: str | Path,
    output: str | Path,
    *,
    model_dir: str | Path,
    project: str | int,
    version: str | None = None,
    expected_offsets: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    overrides: list | None = None,
    annotations_digest: str = "",
    fmt: str = "auto",
    tiff_max_bytes: int = 4 * 1024**3,
    restart: bool = False,
    **options: Any,
) -> tuple[Path, ExportPlan, StackSource]:
    """Check every input, then create (or find, to resume) the work directory; returns (work, plan, source).

    Parameters: the keyword options are ``ml-backend export``'s flags, passed by name through
    ``export_stack(**prepare_options)`` and recorded one by one in ``ExportPlan``; a grouping object would only be
    unpacked again.
    """
    out = Path(output).expanduser().resolve()
    if out.exists():
        raise ExportError(f"output {out} already exists; choose another path or remove it")
    source = open_stack(stack)
    project = str(project)
    version = resolve_version(Path(model_dir), project, version)
    model = _load_model(str(model_dir), project, version, str(options.get("device", "auto")))
    offsets = check_channels(model, version, expected_offsets)
    n_classes = int(model.hparams.get("num_classes", 2))
    generic = ("foreground",) if n_classes == 2 else tuple(f"class_{c}" for c in range(1, n_classes))
    names = tuple(class_names) if class_names else ("background", *generic)
    if len(names) != n_classes:
        raise ExportError(f"version {version} predicts {n_classes} classes but {len(names)} class names were given "
                          f"({', '.join(names)}): the label config must match the model")  # fmt: skip
    shape = (source.n_slices, *source.shape)
    if fmt not in ("auto", "tiff", "zarr"):
        raise ExportError(f"format must be auto, tiff or zarr, got {fmt!r}")
    if fmt == "auto":
        fmt = "zarr" if int(np.prod(shape)) * 4 > tiff_max_bytes else "tiff"  # the uint32 object labels dominate
    plan = ExportPlan(stack=source.key, shape=shape, model_dir=str(Path(model_dir).resolve()), project=project,
                      version=version, offsets=offsets, classes=names, output=str(out), format=fmt,
                      annotations_digest=annotations_digest, **options)  # fmt: skip
    work = work_dir_for(out)
    if work.exists():
        try:
            old = ExportPlan.load(work)
        except (OSError, ValueError, TypeError) as exc:
            old = None
            log.warning("unreadable plan in %s (%s): starting afresh", work, exc)
        if restart or old is None:
            shutil.rmtree(work)
        elif any(getattr(old, k) != getattr(plan, k) for k in _IDENTITY):
            diff = [k for k in _IDENTITY if getattr(old, k) != getattr(plan, k)]
            raise ExportError(f"{work} holds an interrupted export with another configuration ({', '.join(diff)} "
                              "differ): rerun with the same options to resume it, or pass --restart")  # fmt: skip
        else:
            done = sum(chunk_file(work, j, "objects.npz").is_file() for j in range(plan.n_chunks))
            log.info("resuming %s: %d of %d chunks done", work, done, plan.n_chunks)
            return work, old, source

    building = work.with_name(work.name + ".new")
    shutil.rmtree(building, ignore_errors=True)
    with guarded_writes(building):
        (building / "chunks").mkdir(parents=True)
        _create_arrays(building, plan)
        write_overrides(building / "annotations.npz", list(overrides or []))
        plan.save(building)
        os.rename(building, work)  # a work directory exists complete with its plan, or not at all
    return work, plan, source


def predict_chunk(work: Path, j: int, *, progress: Callable[[int], None] | None = None,
                  source: StackSource | None = None) -> bool:  # fmt: skip
    """Stage 2 for chunk ``j``; False when it was already done (resume)."""
    done = chunk_file(work, j, "objects.npz")
    if done.is_file():
        return False
    plan = ExportPlan.load(work)
    src = source if source is not None else open_stack(plan.stack)
    z0, z1 = plan.chunk_range(j)
    n_z, h, w = plan.shape
    model = _load_model(plan.model_dir, plan.project, plan.version, plan.device)
    overrides = read_overrides(work / "annotations.npz", z0, z1)
    root = _zarr_group(work)
    seg_arr = root["segmentation/0"]
    prob_arr = root["probabilities/0"] if plan.probabilities else None
    reader = SliceReader(n_z, src.normalised)
    slab = np.zeros((z1 - z0, h, w), dtype=np.uint8)
    counts = np.zeros((z1 - z0, len(plan.classes)), dtype=np.int64)
    annotated = np.zeros(z1 - z0, dtype=np.int64)
    for z in range(z0, z1):
        image = read_context(reader, z, 0, 0, (h, w), plan.offsets).image if plan.offsets != (0,) \
            else src.normalised(z)  # fmt: skip
        probs = predict_tiled(model, image, tile=plan.tile, overlap=plan.overlap, batch_size=plan.batch,
                              device=None if plan.device == "auto" else plan.device)  # fmt: skip
        cls = probs.argmax(axis=0).astype(np.uint8)
        annotated[z - z0] = apply_overrides(cls, overrides.get(z, []))
        seg_arr[z] = cls
        if prob_arr is not None:
            prob_arr[:, z] = np.round(probs * 255.0).astype(np.uint8)
        slab[z - z0] = cls
        counts[z - z0] = np.bincount(cls.ravel(), minlength=len(plan.classes))[: len(plan.classes)]
        if progress is not None:
            progress(1)
    local, objects = label_chunk(slab, z0, plan.shape, range(1, len(plan.classes)), connectivity=plan.connectivity,
                                 backend=plan.backend)  # fmt: skip
    import zarr

    zarr.open_array(str(work / LOCAL), mode="r+")[z0:z1] = local
    with open_atomic(chunk_file(work, j, "slices.npz")) as fh:
        np.savez(fh, counts=counts, annotated=annotated)
    with open_atomic(done, durable=True) as fh:  # last: marks the chunk done
        objects.save(fh)
    return True


def merge(work: Path) -> ObjectTable:
    """Stage 3: join objects across chunk borders; the table and per-chunk label maps go to ``merge.npz``."""
    import zarr

    plan = ExportPlan.load(work)
    missing = [j for j in range(plan.n_chunks) if not chunk_file(work, j, "objects.npz").is_file()]
    if missing:
        raise ExportError(f"chunks {missing[:10]} of {work} are not done yet; run the export again to finish them")
    chunks = [ChunkObjects.load(chunk_file(work, j, "objects.npz")) for j in range(plan.n_chunks)]
    local = zarr.open_array(str(work / LOCAL), mode="r")

    def planes(j: int) -> tuple[np.ndarray, np.ndarray]:
        z = plan.chunk_range(j)[0]
        return np.asarray(local[z - 1]), np.asarray(local[z])

    table, maps = merge_chunks(chunks, planes, plan.shape, connectivity=plan.connectivity,
                               min_voxels=plan.min_voxels)  # fmt: skip
    with open_atomic(work / "merge.npz", durable=True) as fh:
        np.savez(fh, **{f"map{j}": m for j, m in enumerate(maps)},
                 **{k: getattr(table, k) for k in ("label", "classes", "voxels", "centroid", "bbox_min", "bbox_max",
                                                   "n_slices", "touches_border")})  # fmt: skip
    return table


def load_table(path: Path, shape: tuple[int, int, int]) -> tuple[ObjectTable, list[np.ndarray]]:
    with np.load(path, allow_pickle=False) as f:
        maps = [f[k] for k in sorted((k for k in f.files if k.startswith("map")), key=lambda k: int(k[3:]))]
        table = ObjectTable(shape, *(f[k] for k in ("label", "classes", "voxels", "centroid", "bbox_min", "bbox_max",
                                                    "n_slices", "touches_border")))  # fmt: skip
    return table, maps


def relabel_chunk(work: Path, j: int) -> bool:
    """Stage 4 for chunk ``j``: final object labels into Zarr; False when already done."""
    import zarr

    marker = chunk_file(work, j, "relabelled")
    if marker.is_file():
        return False
    plan = ExportPlan.load(work)
    _table, maps = load_table(work / "merge.npz", plan.shape)
    z0, z1 = plan.chunk_range(j)
    local = np.asarray(zarr.open_array(str(work / LOCAL), mode="r")[z0:z1])
    _zarr_group(work)["objects/0"][z0:z1] = maps[j][local]
    write_atomic(marker, "done\n")
    return True


def _write_tiff(path: Path, array: Any, plan: ExportPlan, axes: str) -> None:
    """A multi-page TIFF streamed page by page from a Zarr array (bounded memory); ImageJ metadata when it fits."""
    import tifffile

    nbytes = int(np.prod(array.shape)) * array.dtype.itemsize
    big = nbytes > 2**31 - 2**25
    vs = plan.voxel_size_um
    kwargs: dict[str, Any] = {}
    if vs is not None:
        kwargs["resolution"] = (1.0 / vs[2], 1.0 / vs[1])
    metadata = {"axes": axes}
    if vs is not None:
        metadata.update(spacing=vs[0], unit="um")
    pages = (np.asarray(array[idx]) for idx in np.ndindex(*array.shape[:-2]))
    imagej = not big and array.dtype == np.uint8 and axes == "ZYX"  # ImageJ reads neither uint32 nor C before Z
    with tifffile.TiffWriter(path, bigtiff=big, imagej=imagej) as tw:
        tw.write(pages, shape=array.shape, dtype=array.dtype, metadata=metadata, compression="zlib" if big else None,
                 **kwargs)  # fmt: skip


def _ome_metadata(work: Path, plan: ExportPlan) -> None:
    from ome_zarr.writer import write_multiscales_metadata

    root = _zarr_group(work)
    vs = list(plan.voxel_size_um or (1.0, 1.0, 1.0))
    unit = "micrometer" if plan.voxel_size_um else None
    space = [{"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in "zyx"]
    for name in ("segmentation", "objects", "probabilities"):
        if name not in root:
            continue
        axes = ([{"name": "c", "type": "channel"}] if name == "probabilities" else []) + space
        scale = ([1.0] if name == "probabilities" else []) + vs
        write_multiscales_metadata(root[name], [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": scale}]}], axes=axes, name=name)  # fmt: skip


def finalize(work: Path, *, extra_manifest: dict | None = None) -> Path:
    """Stage 5: tables, summary, TIFF or OME-Zarr, manifest; then the atomic rename to the output."""
    plan = ExportPlan.load(work)
    out = Path(plan.output)
    table, _maps = load_table(work / "merge.npz", plan.shape)
    tables = write_object_tables(table, plan.classes, work, plan.voxel_size_um)
    src = open_stack(plan.stack)
    with open(work / "slices.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["z", "slice", *(f"fraction_{c}" for c in plan.classes), "annotated_pixels"])
        for j in range(plan.n_chunks):
            with np.load(chunk_file(work, j, "slices.npz")) as f:
                counts, annotated = f["counts"], f["annotated"]
            z0 = plan.chunk_range(j)[0]
            pixels = plan.shape[1] * plan.shape[2]
            for i in range(len(counts)):
                writer.writerow([z0 + i, src.slice_name(z0 + i), *(f"{c / pixels:.6f}" for c in counts[i]),
                                 int(annotated[i])])  # fmt: skip
    files = ["slices.csv", *(p.name for p in tables.values())]
    if plan.format == "tiff":
        root = _zarr_group(work, "r")
        for name in ("segmentation", "objects", "probabilities"):
            if name in root:
                _write_tiff(work / f"{name}.tif", root[f"{name}/0"], plan, "CZYX" if name == "probabilities" else "ZYX")
                files.append(f"{name}.tif")
        shutil.rmtree(work / ZARR)
    else:
        _ome_metadata(work, plan)
        files.append(ZARR)
    shutil.rmtree(work / LOCAL, ignore_errors=True)
    shutil.rmtree(work / "chunks", ignore_errors=True)  # work files: the manifest keeps the plan
    for name in ("merge.npz", "annotations.npz", PLAN):
        (work / name).unlink(missing_ok=True)
    n_by_class = {name: int((table.classes == c).sum()) for c, name in enumerate(plan.classes) if c}
    manifest = {**asdict(plan), "files": files, "objects": n_by_class, **(extra_manifest or {})}
    write_atomic(work / "export.json", json.dumps(manifest, indent=2, sort_keys=True), durable=True)
    os.rename(work, out)  # the output appears complete, or not at all
    return out
