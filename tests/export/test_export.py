"""Whole-stack export on generated volumes: annotations win (known objects measured through the whole pipeline),
chunked = unchunked, TIFF = OME-Zarr, resume after an interruption, the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from export_helpers import ls_export, publish_model
from scipy import ndimage as ndi

from ml_backend.export import run as export_run
from ml_backend.export.cli import main as export_main
from ml_backend.export.driver import export_stack
from ml_backend.export.run import work_dir_for

pytestmark = pytest.mark.timeout(300)

OPTS = {"project": "1", "tile": 48, "overlap": 8, "progress": False}


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_annotations_win_and_known_objects_are_measured(tmp_path, volume, stack_file, model_dir, monkeypatch):
    """Every tile annotated with the ground truth (Label Studio JSON export): the segmentation IS the ground truth
    whatever the model says, and the object table matches scipy on it (counts, volumes, centroids, µm³)."""
    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    tasks = ls_export(volume.mask, str(stack_file.resolve()))
    tasks_file = tmp_path / "export.json"
    tasks_file.write_text(json.dumps(tasks))
    out = tmp_path / "out"
    rc = export_main(["--project", "1", str(stack_file), "-o", str(out), "--annotations", str(tasks_file),
                      "--label-config", "label_config/dense.xml", "--chunk-slices", "4", "--min-voxels", "20",
                      "--voxel-size", "0.01,0.005,0.005", "--quiet"])  # fmt: skip
    assert rc == 0
    seg = tifffile.imread(out / "segmentation.tif")
    assert np.array_equal(seg, volume.mask)
    ref, _ = ndi.label(volume.mask, np.ones((3, 3, 3)))
    sizes = np.bincount(ref.ravel())
    keep = [lab for lab in range(1, len(sizes)) if sizes[lab] >= 20]
    rows = read_csv(out / "objects_mitochondria.csv")
    assert len(rows) == len(keep) > 3
    assert sorted(int(r["voxels"]) for r in rows) == sorted(int(sizes[lab]) for lab in keep)
    want = np.sort(np.array(ndi.center_of_mass(volume.mask, ref, keep)), axis=0)
    got = np.sort(np.array([[float(r[f"centroid_{a}"]) for a in "zyx"] for r in rows]), axis=0)
    np.testing.assert_allclose(got, want, atol=1e-4)
    for r in rows:
        assert float(r["volume_um3"]) == pytest.approx(int(r["voxels"]) * 0.01 * 0.005 * 0.005, rel=1e-5)
        assert float(r["centroid_z_um"]) == pytest.approx(float(r["centroid_z"]) * 0.01, rel=1e-3)
    objects = tifffile.imread(out / "objects.tif")
    assert np.array_equal(np.bincount(objects.ravel())[1:], [int(r["voxels"]) for r in rows])
    slices = read_csv(out / "slices.csv")
    assert len(slices) == volume.mask.shape[0]
    for z, row in enumerate(slices):
        assert float(row["fraction_mitochondria"]) == pytest.approx(volume.mask[z].mean(), abs=1e-6)
        assert int(row["annotated_pixels"]) == volume.mask[z].size
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["extra"]["annotated_tiles"] == len(tasks)
    assert not work_dir_for(out.resolve()).exists()
    assert not (out / "chunks").exists() and not (out / "plan.json").exists()


def test_annotation_placed_at_its_tile_only(tmp_path, volume, stack_file, model_dir):
    """One annotated tile (slice 5, the tile at y=48 x=48): exactly its pixels change, to the annotation."""
    plain = export_stack(stack_file, tmp_path / "plain", model_dir=model_dir, chunk_slices=5, **OPTS)
    labels = np.zeros(volume.mask.shape, dtype=np.uint8)
    labels[5, 50:70, 60:80] = 1
    tasks = [t for t in ls_export(labels, str(stack_file.resolve()), slices=[5])
             if (t["data"]["tile_y"], t["data"]["tile_x"]) == (32, 48)]  # fmt: skip
    from ml_backend.export.annotations import overrides_for_stack
    from ml_backend.labelstudio.labelconfig import parse_label_config

    config = parse_label_config(Path("label_config/dense.xml").read_text())
    overrides, skipped = overrides_for_stack(tasks, config, str(stack_file.resolve()), labels.shape[1:],
                                             labels.shape[0])  # fmt: skip
    assert len(overrides) == 1 and not skipped
    export_stack(stack_file, tmp_path / "ann", model_dir=model_dir, chunk_slices=5, overrides=overrides,
                 annotations_digest="x", **OPTS)  # fmt: skip
    a = tifffile.imread(tmp_path / "plain" / "segmentation.tif")
    b = tifffile.imread(tmp_path / "ann" / "segmentation.tif")
    assert plain["objects"]["foreground"] > 0
    window = (5, slice(32, 80), slice(48, 96))
    assert np.array_equal(b[window], labels[window])
    outside = np.ones(a.shape, dtype=bool)
    outside[window] = False
    assert np.array_equal(a[outside], b[outside])


def test_chunked_equals_unchunked_and_zarr_equals_tiff(tmp_path, volume, stack_file, model_dir):
    whole = export_stack(stack_file, tmp_path / "whole", model_dir=model_dir, chunk_slices=100, min_voxels=5,
                         voxel_size_um=(0.05, 0.005, 0.005), probabilities=True, **OPTS)  # fmt: skip
    chunked = export_stack(stack_file, tmp_path / "chunked", model_dir=model_dir, chunk_slices=3, min_voxels=5,
                           fmt="zarr", probabilities=True, voxel_size_um=(0.05, 0.005, 0.005), **OPTS)  # fmt: skip
    assert whole["objects"] == chunked["objects"] and whole["objects"]["foreground"] > 3
    assert (tmp_path / "whole" / "objects_foreground.csv").read_text() == read_csv_text(tmp_path, "chunked")
    store = zarr.open_group(str(tmp_path / "chunked" / "export.ome.zarr"), mode="r")
    assert np.array_equal(np.asarray(store["segmentation/0"]), tifffile.imread(tmp_path / "whole" / "segmentation.tif"))
    assert np.array_equal(np.asarray(store["objects/0"]), tifffile.imread(tmp_path / "whole" / "objects.tif"))
    probs = np.asarray(store["probabilities/0"])
    assert probs.shape == (2, *volume.image.shape)
    assert np.array_equal(tifffile.imread(tmp_path / "whole" / "probabilities.tif"), probs)
    disagree = (probs.argmax(0) == 1) != (np.asarray(store["segmentation/0"]) == 1)
    assert disagree.mean() < 1e-3  # only ties at p = 0.5 after uint8 rounding may disagree
    scale = store["segmentation"].attrs.asdict()["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert scale[0]["scale"] == [0.05, 0.005, 0.005]


def read_csv_text(tmp_path, name):
    return (tmp_path / name / "objects_foreground.csv").read_text()


def test_interrupted_export_resumes(tmp_path, volume, stack_file, model_dir, monkeypatch):
    reference = export_stack(stack_file, tmp_path / "ref", model_dir=model_dir, chunk_slices=3, **OPTS)
    out = tmp_path / "out"
    real = export_run.predict_chunk
    calls = []

    def interrupted(work, j, **kw):
        if j == 3:
            raise KeyboardInterrupt  # Ctrl-C (or a killed process) after three of five chunks
        calls.append(j)
        return real(work, j, **kw)

    monkeypatch.setattr(export_run, "predict_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_stack(stack_file, out, model_dir=model_dir, chunk_slices=3, **OPTS)
    assert not out.exists(), "an interrupted export must not look complete"
    assert work_dir_for(out.resolve()).is_dir()
    monkeypatch.setattr(export_run, "predict_chunk", real)
    with pytest.raises(export_run.ExportError, match="another configuration"):
        export_stack(stack_file, out, model_dir=model_dir, chunk_slices=4, **OPTS)
    resumed = export_stack(stack_file, out, model_dir=model_dir, chunk_slices=3, **OPTS)
    assert calls == [0, 1, 2] and resumed["resumed_chunks"] == 3
    assert resumed["objects"] == reference["objects"]
    assert (out / "objects_foreground.csv").read_text() == (tmp_path / "ref" / "objects_foreground.csv").read_text()
    assert np.array_equal(tifffile.imread(out / "objects.tif"), tifffile.imread(tmp_path / "ref" / "objects.tif"))


def test_context_model_exports_with_its_own_slices(tmp_path, volume, stack_file):
    """A 2.5D version (slices z-1, z, z+1 as channels) reads its neighbours from the stack, whatever the chunking."""
    model_dir = tmp_path / "models25"
    publish_model(model_dir, image=volume.image[0], in_channels=3, context_offsets=[-1, 0, 1])
    a = export_stack(stack_file, tmp_path / "a", model_dir=model_dir, chunk_slices=2, **OPTS)
    export_stack(stack_file, tmp_path / "b", model_dir=model_dir, chunk_slices=50, **OPTS)
    assert a["offsets"] == [-1, 0, 1]
    assert np.array_equal(tifffile.imread(tmp_path / "a" / "segmentation.tif"),
                          tifffile.imread(tmp_path / "b" / "segmentation.tif"))  # fmt: skip


def test_multiclass_version_gives_one_table_per_class(tmp_path, volume, stack_file):
    model_dir = tmp_path / "models3"
    publish_model(model_dir, image=volume.image[0], num_classes=3)
    manifest = export_stack(stack_file, tmp_path / "out", model_dir=model_dir, chunk_slices=4, min_voxels=1,
                            class_names=("background", "mitochondria", "nuclei"), **OPTS)  # fmt: skip
    seg = tifffile.imread(tmp_path / "out" / "segmentation.tif")
    objects = tifffile.imread(tmp_path / "out" / "objects.tif")
    for c, name in ((1, "mitochondria"), (2, "nuclei")):
        rows = read_csv(tmp_path / "out" / f"objects_{name}.csv")
        assert len(rows) == manifest["objects"][name] > 0
        assert sum(int(r["voxels"]) for r in rows) == int((seg == c).sum())
        for r in rows[:20]:
            assert r["class"] == name and np.all(seg[objects == int(r["label"])] == c)
    with pytest.raises(export_run.ExportError, match="predicts 3 classes but 2 class names"):
        export_stack(stack_file, tmp_path / "bad", model_dir=model_dir, class_names=("background", "mito"), **OPTS)


def test_killed_export_process_resumes(tmp_path, volume, model_dir):
    """`ml-backend export` killed with SIGKILL mid-run (a real process): no output appears, and the same command
    resumes from the chunks on disk and gives what an uninterrupted export gives."""
    import os
    import signal
    import subprocess
    import sys
    import time

    stack = tmp_path / "long.tif"
    tifffile.imwrite(stack, np.concatenate([volume.image] * 4))  # 56 slices, 28 chunks of 2
    out = tmp_path / "out"
    env = {**os.environ, "MODEL_DIR": str(model_dir), "TILE_SIZE": "48", "TILE_OVERLAP": "8", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ml_backend.cli", "export", "--project", "1", str(stack), "-o", str(out),
           "--chunk-slices", "2", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = work_dir_for(out.resolve()) / "chunks"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if chunks.is_dir() and len(list(chunks.glob("*.objects.npz"))) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the export finished before it could be killed"
    assert not out.exists()
    done_before = len(list(chunks.glob("*.objects.npz")))
    assert 3 <= done_before < 28
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode == 0
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["resumed_chunks"] == done_before
    ref = export_stack(stack, tmp_path / "ref", model_dir=model_dir, chunk_slices=2, **OPTS)
    assert manifest["objects"] == ref["objects"]
    assert (out / "objects_foreground.csv").read_text() == (tmp_path / "ref" / "objects_foreground.csv").read_text()
    assert np.array_equal(tifffile.imread(out / "objects.tif"), tifffile.imread(tmp_path / "ref" / "objects.tif"))
