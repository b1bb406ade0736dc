"""3-D objects: known boxes (exact voxels, centroids, boxes, slices, border contact), chunked = unchunked, objects
crossing chunk borders merged once, the minimum-size filter on whole objects, both labelling libraries."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from ml_backend.export.objects import label_chunk, merge_chunks, time_backends


def objects(vol: np.ndarray, chunk: int, *, classes=(1,), connectivity: int = 26, min_voxels: int = 1):
    """(table, label volume) through the chunked path, as the export runs it."""
    locals_, chunks = [], []
    for z0 in range(0, vol.shape[0], chunk):
        local, co = label_chunk(vol[z0 : z0 + chunk], z0, vol.shape, classes, connectivity=connectivity)
        locals_.append(local)
        chunks.append(co)
    table, maps = merge_chunks(chunks, lambda j: (locals_[j - 1][-1], locals_[j][0]), vol.shape,
                               connectivity=connectivity, min_voxels=min_voxels)  # fmt: skip
    return table, np.concatenate([m[loc] for m, loc in zip(maps, locals_, strict=True)])


def known_volume() -> tuple[np.ndarray, list[dict]]:
    """Boxes with known geometry; two cross the chunk borders at z = 4 and 8 (chunk 4), one is a U that is two
    pieces inside the first chunk and joins only in the third, one touches the border, one is tiny."""
    vol = np.zeros((12, 40, 50), dtype=np.uint8)
    boxes = [
        ((1, 5), (2, 8), (3, 10)),  # inside chunk 0
        ((2, 11), (15, 25), (20, 24)),  # crosses z=4 and z=8
        ((0, 3), (30, 40), (40, 50)),  # touches three borders
    ]
    for (z0, z1), (y0, y1), (x0, x1) in boxes:
        vol[z0:z1, y0:y1, x0:x1] = 1
    # U: two arms z 1..9 at x 30..32 and x 36..38, joined by a bar at z 9..10
    vol[1:10, 5:8, 30:33] = 1
    vol[1:10, 5:8, 36:39] = 1
    vol[9:11, 5:8, 30:39] = 1
    vol[6, 35, 5] = 1  # a one-voxel speck
    expected = []
    for (z0, z1), (y0, y1), (x0, x1) in boxes:
        expected.append({"voxels": (z1 - z0) * (y1 - y0) * (x1 - x0),
                         "centroid": ((z0 + z1 - 1) / 2, (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2),
                         "bbox": (z0, y0, x0, z1 - 1, y1 - 1, x1 - 1), "n_slices": z1 - z0,
                         "border": z0 == 0 or y1 == 40 or x1 == 50})  # fmt: skip
    u = np.zeros_like(vol)
    u[1:10, 5:8, 30:33] = u[1:10, 5:8, 36:39] = u[9:11, 5:8, 30:39] = 1
    zz, yy, xx = np.nonzero(u)
    expected.append({"voxels": int(u.sum()), "centroid": (zz.mean(), yy.mean(), xx.mean()),
                     "bbox": (1, 5, 30, 10, 7, 38), "n_slices": 10, "border": False})  # fmt: skip
    return vol, expected


@pytest.mark.parametrize("chunk", [1, 3, 4, 12])
def test_known_boxes_measured_exactly_whatever_the_chunking(chunk):
    vol, expected = known_volume()
    table, labels = objects(vol, chunk, min_voxels=2)
    assert len(table) == len(expected)  # the speck is filtered, the U is one object
    got = sorted(zip(table.voxels.tolist(), map(tuple, table.centroid.tolist()),
                     map(tuple, np.hstack([table.bbox_min, table.bbox_max]).tolist()), table.n_slices.tolist(),
                     table.touches_border.tolist(), strict=True))  # fmt: skip
    want = sorted((e["voxels"], e["centroid"], e["bbox"], e["n_slices"], e["border"]) for e in expected)
    for g, w in zip(got, want, strict=True):
        assert g[0] == w[0] and g[2:] == w[2:]
        np.testing.assert_allclose(g[1], w[1])
    # the label volume holds exactly the kept objects, numbered in raster order of their first voxel
    assert labels[6, 35, 5] == 0
    assert np.array_equal(np.bincount(labels.ravel())[1:], table.voxels)
    firsts = [np.flatnonzero(labels.ravel() == lab)[0] for lab in table.label]
    assert firsts == sorted(firsts)


def test_chunked_equals_unchunked_and_scipy_on_a_generated_volume(volume):
    vol = volume.mask
    whole, whole_labels = objects(vol, vol.shape[0], min_voxels=10)
    for chunk in (1, 2, 5):
        table, labels = objects(vol, chunk, min_voxels=10)
        for name in ("label", "classes", "voxels", "centroid", "bbox_min", "bbox_max", "n_slices", "touches_border"):
            assert np.array_equal(getattr(table, name), getattr(whole, name)), name
        assert np.array_equal(labels, whole_labels)
    ref, n = ndi.label(vol, np.ones((3, 3, 3)))
    sizes = np.bincount(ref.ravel())[1:]
    keep = np.flatnonzero(sizes >= 10) + 1
    assert len(whole) == len(keep) > 3
    assert sorted(whole.voxels.tolist()) == sorted(sizes[keep - 1].tolist())
    centroids = np.array(ndi.center_of_mass(vol, ref, keep))
    np.testing.assert_allclose(np.sort(whole.centroid, axis=0), np.sort(centroids, axis=0))


def test_classes_are_separate_objects_and_connectivity_matters():
    vol = np.zeros((4, 10, 10), dtype=np.uint8)
    vol[0:2, 2:4, 2:4] = 1
    vol[2:4, 2:4, 2:4] = 2  # touches the class-1 box across the chunk border: another class, another object
    vol[2, 6, 6] = 1
    vol[3, 7, 7] = 1  # diagonal neighbour: one object under 26-connectivity, two under 6
    t26, _ = objects(vol, 2, classes=(1, 2))
    assert sorted(zip(t26.classes.tolist(), t26.voxels.tolist(), strict=True)) == [(1, 2), (1, 8), (2, 8)]
    t6, _ = objects(vol, 2, classes=(1, 2), connectivity=6)
    assert sorted(zip(t6.classes.tolist(), t6.voxels.tolist(), strict=True)) == [(1, 1), (1, 1), (1, 8), (2, 8)]


def test_cc3d_and_skimage_agree(volume):
    result = time_backends(volume.mask.astype(bool), repeats=1)
    assert result["cc3d"]["objects"] == result["skimage"]["objects"] > 0
    assert result["skimage"]["same_objects"]
