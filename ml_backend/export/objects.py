"""3-D objects of a segmented stack: connected components per class, labelled chunk by chunk and merged exactly.

Why chunks: a whole stack's label volume does not have to fit in memory, and chunks can run on several workers.
Each z-chunk (a slab of whole slices) is labelled on its own (``label_chunk``, cc3d by default: 5x faster than
scikit-image on the Lucchi mask, BENCHMARKS.md) and reduced to per-component sums: voxel count, coordinate sums,
bounding box, first voxel in raster order, and the (component, slice) pairs it touches. ``merge_chunks`` then joins
components that touch across a chunk border (the last slice of one chunk against the first of the next, with the
connectivity's in-plane shifts), as a graph solved by ``scipy.sparse.csgraph.connected_components``, so an object
crossing any number of borders becomes one object exactly once. Sums merge exactly (integer coordinates summed in
float64, exact below 2**53), and final labels are numbered by each object's first voxel in raster order, so the
table does not depend on the chunking: a chunked and an unchunked export give identical objects.

The minimum-size filter applies to whole 3-D objects (after merging): an object of fewer than ``min_voxels`` voxels
is left out of the tables and the label volume (a fragment cut by a chunk border is never dropped on its own).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["BACKENDS", "ChunkObjects", "ObjectTable", "label_chunk", "label_components", "merge_chunks",
           "time_backends", "write_object_tables"]  # fmt: skip

CONNECTIVITIES = (6, 18, 26)
BACKENDS = ("cc3d", "skimage")
# In-plane shifts (dy, dx) that connect voxels of adjacent slices, per 3-D connectivity.
_FACE_SHIFTS = {
    6: [(0, 0)],
    18: [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)],
    26: [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
}


def label_components(mask: np.ndarray, connectivity: int = 26, backend: str = "cc3d") -> tuple[np.ndarray, int]:
    """(uint32 labels 1..n, n) of a boolean (Z, H, W) volume; ``backend`` cc3d or scikit-image (same result)."""
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity}")
    if backend == "cc3d":
        import cc3d

        labels, n = cc3d.connected_components(mask, connectivity=connectivity, return_N=True, out_dtype=np.uint32)
        return labels, int(n)
    if backend == "skimage":
        from skimage.measure import label

        labels, n = label(mask, connectivity={6: 1, 18: 2, 26: 3}[connectivity], return_num=True)
        return labels.astype(np.uint32, copy=False), int(n)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


@dataclass
class ChunkObjects:
    """Per-component sums of one chunk (local component k = label k + 1 in its label slab)."""

    z0: int
    classes: np.ndarray  # (n,) class index
    count: np.ndarray  # (n,) voxels
    sums: np.ndarray  # (n, 3) float64 sums of z, y, x (global coordinates)
    bbox_min: np.ndarray  # (n, 3) inclusive
    bbox_max: np.ndarray  # (n, 3) inclusive
    first: np.ndarray  # (n,) linear index of the first voxel in raster order
    zpairs: np.ndarray  # (m, 2) (component, slice) pairs

    @property
    def n(self) -> int:
        return int(self.count.shape[0])

    def save(self, path: Path) -> None:
        np.savez(path, z0=np.int64(self.z0), classes=self.classes, count=self.count, sums=self.sums,
                 bbox_min=self.bbox_min, bbox_max=self.bbox_max, first=self.first, zpairs=self.zpairs)  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> ChunkObjects:
        with np.load(path, allow_pickle=False) as f:
            return cls(int(f["z0"]), f["classes"], f["count"], f["sums"], f["bbox_min"], f["bbox_max"], f["first"],
                       f["zpairs"])  # fmt: skip


def label_chunk(
    classmap: np.ndarray,
    z0: int,
    shape: tuple[int, int, int],
    classes: Sequence[int],
    *,
    connectivity: int = 26,
    backend: str = "cc3d",
) -> tuple[np.ndarray, ChunkObjects]:
    """Local labels (uint32 (k, H, W), unique across ``classes``) and sums of a slab of class map starting at z0."""
    slab = np.asarray(classmap)
    k, h, w = slab.shape
    local = np.zeros(slab.shape, dtype=np.uint32)
    cls_of: list[np.ndarray] = []
    n_total = 0
    for c in classes:
        labels, n = label_components(slab == c, connectivity, backend)
        if n:
            np.add(labels, np.uint32(n_total), out=labels, where=labels > 0)
            local += labels
            cls_of.append(np.full(n, c, dtype=np.int64))
            n_total += n
    zz, yy, xx = np.nonzero(local)  # raster order
    lab = local[zz, yy, xx].astype(np.int64) - 1
    zg = zz.astype(np.int64) + z0
    count = np.bincount(lab, minlength=n_total).astype(np.int64)
    sums = np.stack([np.bincount(lab, weights=a, minlength=n_total) for a in (zg, yy, xx)], axis=1)
    boxes = ndi.find_objects(local, max_label=n_total)
    bbox_min = np.array([[b[0].start + z0, b[1].start, b[2].start] for b in boxes], dtype=np.int64).reshape(-1, 3)
    bbox_max = np.array([[b[0].stop - 1 + z0, b[1].stop - 1, b[2].stop - 1] for b in boxes],
                        dtype=np.int64).reshape(-1, 3)  # fmt: skip
    _, first_idx = np.unique(lab, return_index=True)
    first = (zg[first_idx] * h + yy[first_idx]) * w + xx[first_idx]
    pair_keys = np.unique(lab * k + zz)
    zpairs = np.stack([pair_keys // k, pair_keys % k + z0], axis=1).astype(np.int64).reshape(-1, 2)
    classes_arr = np.concatenate(cls_of) if cls_of else np.zeros(0, dtype=np.int64)
    del shape  # the slab's own (k, H, W) is what matters; kept in the signature for callers' clarity
    return local, ChunkObjects(z0, classes_arr, count, sums, bbox_min, bbox_max, first.astype(np.int64), zpairs)


def _face_pairs(a: np.ndarray, b: np.ndarray, connectivity: int) -> np.ndarray:
    """(m, 2) unique (label in a, label in b) of voxels of two adjacent slices connected under ``connectivity``."""
    h, w = a.shape
    out = []
    for dy, dx in _FACE_SHIFTS[connectivity]:
        a_sub = a[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
        b_sub = b[max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
        both = (a_sub > 0) & (b_sub > 0)
        if both.any():
            out.append(np.stack([a_sub[both], b_sub[both]], axis=1).astype(np.int64))
    return np.unique(np.concatenate(out), axis=0) if out else np.zeros((0, 2), dtype=np.int64)


@dataclass
class ObjectTable:
    """The merged objects, label 1..M in raster order of their first voxel."""

    shape: tuple[int, int, int]
    label: np.ndarray
    classes: np.ndarray
    voxels: np.ndarray
    centroid: np.ndarray  # (M, 3) z, y, x in voxels
    bbox_min: np.ndarray
    bbox_max: np.ndarray
    n_slices: np.ndarray
    touches_border: np.ndarray

    def __len__(self) -> int:
        return int(self.label.shape[0])


def merge_chunks(
    chunks: Sequence[ChunkObjects],
    boundary_planes: Callable[[int], tuple[np.ndarray, np.ndarray]],
    shape: tuple[int, int, int],
    *,
    connectivity: int = 26,
    min_voxels: int = 1,
) -> tuple[ObjectTable, list[np.ndarray]]:
    """(table, per-chunk maps local label -> final label, 0 = dropped).

    ``boundary_planes(j)`` gives (last slice of chunk j-1, first slice of chunk j) of local labels for j >= 1; only
    two slices are in memory at a time.
    """
    offsets = np.cumsum([0] + [c.n for c in chunks])
    n = int(offsets[-1])
    classes = np.concatenate([c.classes for c in chunks]) if n else np.zeros(0, np.int64)
    edges = []
    for j in range(1, len(chunks)):
        a, b = boundary_planes(j)
        pairs = _face_pairs(a, b, connectivity)
        if len(pairs):
            ga, gb = pairs[:, 0] - 1 + offsets[j - 1], pairs[:, 1] - 1 + offsets[j]
            same = classes[ga] == classes[gb]
            edges.append(np.stack([ga[same], gb[same]], axis=1))
    e = np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64)
    graph = coo_matrix((np.ones(len(e), dtype=np.int8), (e[:, 0], e[:, 1])), shape=(n, n))
    k, comp = connected_components(graph, directed=False) if n else (0, np.zeros(0, dtype=np.int64))

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(c, name) for c in chunks])

    voxels = np.bincount(comp, weights=cat("count"), minlength=k).astype(np.int64) if n else np.zeros(0, np.int64)
    sums = np.stack([np.bincount(comp, weights=cat("sums")[:, i], minlength=k) for i in range(3)], axis=1) if n \
        else np.zeros((0, 3))  # fmt: skip
    bmin = np.full((k, 3), np.iinfo(np.int64).max, dtype=np.int64)
    bmax = np.full((k, 3), -1, dtype=np.int64)
    first = np.full(k, np.iinfo(np.int64).max, dtype=np.int64)
    cls = np.zeros(k, dtype=np.int64)
    if n:
        np.minimum.at(bmin, comp, cat("bbox_min"))
        np.maximum.at(bmax, comp, cat("bbox_max"))
        np.minimum.at(first, comp, cat("first"))
        cls[comp] = classes
    zp = [np.stack([comp[c.zpairs[:, 0] + offsets[j]], c.zpairs[:, 1]], axis=1) for j, c in enumerate(chunks)
          if len(c.zpairs)]  # fmt: skip
    n_slices = (np.bincount(np.unique(np.concatenate(zp), axis=0)[:, 0], minlength=k) if zp
                else np.zeros(k, dtype=np.int64))  # fmt: skip
    kept = np.flatnonzero(voxels >= max(1, int(min_voxels)))
    kept = kept[np.argsort(first[kept], kind="stable")]
    final = np.zeros(k, dtype=np.uint32)
    final[kept] = np.arange(1, len(kept) + 1, dtype=np.uint32)
    maps = [np.concatenate([[0], final[comp[offsets[j] : offsets[j + 1]]]]).astype(np.uint32)
            for j in range(len(chunks))]  # fmt: skip
    limit = np.array(shape, dtype=np.int64) - 1
    touches = ((bmin[kept] == 0) | (bmax[kept] == limit)).any(axis=1)
    table = ObjectTable(
        shape=tuple(int(s) for s in shape),
        label=np.arange(1, len(kept) + 1, dtype=np.int64),
        classes=cls[kept],
        voxels=voxels[kept],
        centroid=sums[kept] / np.maximum(voxels[kept], 1)[:, None],
        bbox_min=bmin[kept],
        bbox_max=bmax[kept],
        n_slices=n_slices[kept],
        touches_border=touches,
    )
    return table, maps


OBJECT_COLUMNS = ["label", "class", "voxels", "volume_um3", "centroid_z", "centroid_y", "centroid_x",
                  "centroid_z_um", "centroid_y_um", "centroid_x_um", "bbox_z_min", "bbox_y_min", "bbox_x_min",
                  "bbox_z_max", "bbox_y_max", "bbox_x_max", "n_slices", "touches_border"]  # fmt: skip


def write_object_tables(
    table: ObjectTable, class_names: Sequence[str], out_dir: Path, voxel_size_um: Sequence[float] | None = None
) -> dict[str, Path]:
    """One CSV per foreground class (``objects_<class>.csv``); µm columns empty without a voxel size (z, y, x)."""
    vs = None if voxel_size_um is None else np.asarray(voxel_size_um, dtype=np.float64)
    paths: dict[str, Path] = {}
    for c, name in enumerate(class_names):
        if c == 0:
            continue
        path = out_dir / f"objects_{name}.csv"
        rows = np.flatnonzero(table.classes == c)
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(OBJECT_COLUMNS)
            for i in rows:
                cz, cy, cx = table.centroid[i]
                um = ["", "", "", ""] if vs is None else [
                    f"{table.voxels[i] * float(np.prod(vs)):.6g}", *(f"{v:.6g}" for v in table.centroid[i] * vs)]
                writer.writerow([int(table.label[i]), name, int(table.voxels[i]), um[0], f"{cz:.4f}", f"{cy:.4f}",
                                 f"{cx:.4f}", *um[1:], *table.bbox_min[i].tolist(), *table.bbox_max[i].tolist(),
                                 int(table.n_slices[i]), int(bool(table.touches_border[i]))])  # fmt: skip
        paths[name] = path
    return paths


def time_backends(mask: np.ndarray, connectivity: int = 26, repeats: int = 3) -> dict[str, dict]:
    """Best-of-``repeats`` seconds of each backend on the same boolean volume, and whether they agree."""
    out: dict[str, dict] = {}
    ref = None
    for backend in BACKENDS:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            labels, n = label_components(mask, connectivity, backend)
            best = min(best, time.perf_counter() - t0)
        sizes = np.sort(np.bincount(labels.ravel())[1:])
        out[backend] = {"seconds": best, "objects": n}
        ref = sizes if ref is None else ref
        out[backend]["same_objects"] = bool(np.array_equal(sizes, ref))
    return out
