"""Export benchmark (issue 21): export time against bare tiled inference, peak memory against the number of
slices, and the two connected-components libraries on the same volume.

    python -m ml_backend.benchmarks.export lucchi --data ../shared/data/lucchi --out /tmp/bench-export
    python -m ml_backend.benchmarks.export memory --slices 50 500
    python -m ml_backend.benchmarks.export cc --data ../shared/data/lucchi
    python -m ml_backend.benchmarks.export figure /tmp/bench-export/export --png docs/export-objects.png

``lucchi``: one run, in one process, of (a) bare tiled inference (read, normalise, ``predict_tiled``) of every slice
and (b) the whole export of the same slices with the same model (the product's default U-Net: width 16, depth 4,
BatchNorm; untrained, since time does not depend on the weights) and the ground-truth masks given as annotations
in Label Studio's export format, so the objects in the figure are real mitochondria. ``memory``: the export of a
generated volume of N small slices in a fresh process each, peak RSS from ``getrusage``. ``cc``: cc3d and
scikit-image labelling the same mask. Wall-clock and process CPU time are both reported: on a shared machine
the CPU time (all threads of this process) is the steadier comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ml_backend.benchmarks.machine import describe_text
from ml_backend.config import get_settings
from ml_backend.data.stacks import read_stack
from ml_backend.data.volume import generate_volume
from ml_backend.export.annotations import overrides_for_stack
from ml_backend.export.driver import export_stack
from ml_backend.export.objects import time_backends
from ml_backend.export.run import _load_model
from ml_backend.export.source import open_stack
from ml_backend.inference.tiling import predict_tiled
from ml_backend.labelstudio.importing import tile_origins
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.rle import mask_to_results
from ml_backend.model import build_model
from ml_backend.store.registry import ModelRegistry


def _model_dir(root: Path, width: int = 16, depth: int = 4) -> Path:
    import torch

    torch.manual_seed(0)
    d = root / "models"
    ModelRegistry(d, "1").publish(build_model("unet", width=width, depth=depth, norm="batch"), {"note": "bench"})
    return d


def _ground_truth_tasks(masks_dir: Path, stack_key: str, tile: int = 256) -> list[dict]:
    """The masks as annotated tiles in Label Studio's JSON export format (what ``--annotations`` reads)."""
    config = parse_label_config((Path(__file__).resolve().parents[2] / "label_config" / "dense.xml").read_text())
    tasks, tid = [], 1
    for sl in read_stack(masks_dir):
        m = (np.asarray(sl.image) >= 128).astype(np.int64)
        for y, x in tile_origins(m.shape[0], m.shape[1], tile):
            crop = m[y : y + tile, x : x + tile]
            tasks.append({"id": tid, "data": {"stack": stack_key, "slice": sl.index, "tile_x": x, "tile_y": y,
                                              "tile_width": crop.shape[1], "tile_height": crop.shape[0]},
                          "annotations": [{"id": tid, "result": mask_to_results(crop, config)}]})  # fmt: skip
            tid += 1
    return tasks


def bench_lucchi(data: Path, out: Path) -> dict:
    from tqdm.auto import tqdm

    settings = get_settings()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = _model_dir(out)
    src = open_stack(data / "images")
    version = next(p.name for p in (model_dir / "projects" / "1" / "versions").iterdir())
    model = _load_model(str(model_dir), "1", version, "auto")
    load_before = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    for z in tqdm(range(src.n_slices), desc="bare tiled inference", unit="slice"):
        predict_tiled(model, src.normalised(z), tile=settings.tile_size, overlap=settings.tile_overlap,
                      batch_size=settings.inference_batch)  # fmt: skip
    bare, bare_cpu = time.perf_counter() - t0, time.process_time() - c0
    config = parse_label_config((Path(__file__).resolve().parents[2] / "label_config" / "dense.xml").read_text())
    t1 = time.perf_counter()
    tasks = _ground_truth_tasks(data / "masks", src.key)
    overrides, _skipped = overrides_for_stack(tasks, config, src.key, src.shape, src.n_slices)
    t_ann = time.perf_counter() - t1
    t2, c2 = time.perf_counter(), time.process_time()
    manifest = export_stack(src.key, out / "export", model_dir=model_dir, project="1", class_names=("background",
                            "mitochondria"), overrides=overrides, annotations_digest="gt", tile=settings.tile_size,
                            overlap=settings.tile_overlap, batch=settings.inference_batch,
                            voxel_size_um=(0.005, 0.005, 0.005), chunk_slices=settings.export_chunk_slices,
                            min_voxels=settings.export_min_voxels)  # fmt: skip
    export_s, export_cpu = time.perf_counter() - t2, time.process_time() - c2
    return {"slices": src.n_slices, "shape": [src.n_slices, *src.shape], "bare_inference_s": round(bare, 1),
            "export_s": round(export_s, 1), "ratio": round(export_s / bare, 3),
            "bare_inference_cpu_s": round(bare_cpu, 1), "export_cpu_s": round(export_cpu, 1),
            "cpu_ratio": round(export_cpu / bare_cpu, 3),
            "annotation_decoding_s": round(t_ann, 1), "objects": manifest["objects"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "load_before": [round(v, 2) for v in load_before], "load_after": [round(v, 2) for v in os.getloadavg()],
            "torch_threads": __import__("torch").get_num_threads()}  # fmt: skip


def _memory_child(stack: str, model_dir: str, out: str) -> None:
    export_stack(stack, out, model_dir=model_dir, project="1", tile=64, overlap=8, chunk_slices=16, progress=False,
                 probabilities=True)  # fmt: skip
    print(json.dumps({"peak_rss_mb": _vm_hwm_mb()}))


def _vm_hwm_mb() -> float:
    """This process's peak RSS since exec (VmHWM). Not ``getrusage``'s ru_maxrss: Linux carries that across
    fork + exec, so a child started by a big parent would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_memory(slices: list[int], size: int = 64) -> list[dict]:
    import tifffile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = _model_dir(root, width=8, depth=3)
        for n in slices:
            vol = generate_volume((n, size, size), seed=0)
            stack = root / f"stack{n}.tif"
            tifffile.imwrite(stack, vol.image)
            del vol
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "ml_backend.benchmarks.export", "_child", str(stack), str(model_dir),
                   str(root / f"out{n}")]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"export of {n} slices failed:\n{done.stderr[-3000:]}")
            peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]
            rows.append({"slices": n, "slice_shape": [size, size], "peak_rss_mb": round(peak, 1),
                         "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
    return rows


def bench_cc(data: Path) -> dict:
    mask = np.stack([np.asarray(s.image) >= 128 for s in read_stack(data / "masks")])
    return {"shape": list(mask.shape), "foreground": round(float(mask.mean()), 4), **time_backends(mask)}


def figure(export_dir: Path, png: Path, z: int | None = None) -> Path:
    """One slice with its objects, the objects seen from the side (max over y), and the largest objects' rows."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tifffile

    manifest = json.loads((export_dir / "export.json").read_text())
    objects = tifffile.memmap(export_dir / "objects.tif") if (export_dir / "objects.tif").is_file() else None
    if objects is None:
        import zarr

        objects = zarr.open_group(str(export_dir / "export.ome.zarr"), mode="r")["objects/0"]
    name = next(c for c in manifest["classes"][1:])
    with open(export_dir / f"objects_{name}.csv") as fh:
        rows = list(csv.DictReader(fh))
    z = objects.shape[0] // 2 if z is None else z
    src = open_stack(manifest["stack"])
    rng = np.random.default_rng(0)
    colours = np.vstack([[0, 0, 0], rng.uniform(0.25, 1.0, (len(rows) + 1, 3))])
    lab = np.asarray(objects[z])
    side = np.asarray(objects[:, :, :]).max(axis=1)  # (Z, X): the stack seen from the side
    fig = plt.figure(figsize=(13, 8.5), dpi=90)
    ax1 = fig.add_axes([0.01, 0.40, 0.50, 0.56])
    ax1.imshow(src.normalised(z), cmap="gray")
    overlay = np.zeros((*lab.shape, 4))
    overlay[..., :3] = colours[lab]
    overlay[..., 3] = (lab > 0) * 0.45
    ax1.imshow(overlay)
    ax1.set_title(f"slice {z} of {objects.shape[0]}: 3-D objects (one colour each)")
    ax1.axis("off")
    ax2 = fig.add_axes([0.58, 0.43, 0.41, 0.52])
    ax2.imshow(colours[side], aspect="auto", interpolation="nearest")
    ax2.set_title("the same objects from the side (max over y)")
    ax2.set_xlabel("x (voxels)")
    ax2.set_ylabel("z (slice)")
    ax3 = fig.add_axes([0.02, 0.0, 0.96, 0.31])
    ax3.axis("off")
    cols = ["label", "voxels", "volume_um3", "centroid_z", "centroid_y", "centroid_x", "n_slices", "touches_border"]
    top = sorted(rows, key=lambda r: -int(r["voxels"]))[:8]
    table = ax3.table(cellText=[[r[c] for c in cols] for r in top], colLabels=cols, loc="upper center")
    table.scale(1, 1.3)
    ax3.set_title(f"objects_{name}.csv: {len(rows)} objects, the 8 largest (voxel size "
                  f"{manifest.get('voxel_size_um')} um)", fontsize=10)  # fmt: skip
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        _memory_child(*argv[1:4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("lucchi")
    a.add_argument("--data", type=Path, default=Path("../shared/data/lucchi"))
    a.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-export")
    m = sub.add_parser("memory")
    m.add_argument("--slices", type=int, nargs="+", default=[50, 500])
    c = sub.add_parser("cc")
    c.add_argument("--data", type=Path, default=Path("../shared/data/lucchi"))
    f = sub.add_parser("figure", help="PNG of an export: a slice with its objects, a side view, the object table")
    f.add_argument("export_dir", type=Path)
    f.add_argument("--png", type=Path, default=Path("docs/export-objects.png"))
    args = p.parse_args(argv)
    if args.what == "figure":
        print(figure(args.export_dir, args.png))
        return 0
    print(describe_text())
    if args.what == "lucchi":
        if not (args.data / "images").is_dir():
            print(f"skipped: no Lucchi data at {args.data}")
            return 0
        result = bench_lucchi(args.data, args.out)
    elif args.what == "memory":
        result = bench_memory(args.slices)
    else:
        result = bench_cc(args.data)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
