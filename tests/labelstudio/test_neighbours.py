"""2.5D context in the product: the importer writes each tile's neighbours on slices z-1 / z+1, a project's task
list is indexed to find the tile on any slice z + offset (the training job, re-scoring, the cold start), and the
model input is built from them through the media layer, a missing neighbour never failing a task."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from ml_backend.config import Settings
from ml_backend.imaging import normalize
from ml_backend.labelstudio.importing import make_tiles
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.neighbours import (
    NeighbourIndex,
    context_urls,
    load_context_image,
    stack_context_images,
)

XML = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">
<Label value="Mitochondria"/></BrushLabels></View>"""


@pytest.fixture
def project(tmp_path):
    """(stack (4, 80, 80) uint8, tiles of a 4-slice TIFF stack in a local-files root, settings reading that root)."""
    root = tmp_path / "root"
    root.mkdir()
    stack = (np.random.default_rng(0).random((4, 80, 80)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    tiles = make_tiles([tmp_path / "stack.tif"], root / "tiles", root, tile=48, progress=False)
    settings = Settings.from_env(
        model_dir=tmp_path / "models", local_files_root=str(root), label_studio_url="http://127.0.0.1:9",
        device="cpu", train_crop=32, bn_calibration_tiles=5,
    )  # fmt: skip
    return stack, tiles, settings


def _tasks(tiles, drop_neighbour_keys: bool = False) -> dict[int, dict]:
    tasks = {}
    for i, t in enumerate(tiles):
        data = dict(t.data)
        if drop_neighbour_keys:  # tasks imported before the importer wrote them: the index must find neighbours
            data.pop("image_prev")
            data.pop("image_next")
        tasks[i + 1] = {"id": i + 1, "data": data}
    return tasks


def _at(tiles, z, y, x):
    (tile,) = [t for t in tiles if (t.data["slice"], t.data["tile_y"], t.data["tile_x"]) == (z, y, x)]
    return tile.data


def test_import_writes_the_neighbouring_slices_urls_with_the_tile_itself_at_the_ends(project, tmp_path):
    _, tiles, _ = project
    assert len(tiles) == 4 * 4  # 4 slices x 4 tiles (48 px tiles on 80 px slices: origins 0 and 32)
    for y in (0, 32):
        for x in (0, 32):
            for z in range(4):
                d = _at(tiles, z, y, x)
                assert d["stack"] == str(tmp_path / "stack.tif")
                prev = d["image"] if z == 0 else _at(tiles, z - 1, y, x)["image"]
                nxt = d["image"] if z == 3 else _at(tiles, z + 1, y, x)["image"]
                assert (d["image_prev"], d["image_next"]) == (prev, nxt)
    assert len({t.data["image"] for t in tiles}) == 16


def test_a_folder_of_slices_is_one_stack(tmp_path):
    root = tmp_path / "root"
    folder = root / "raw"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((40, 40), 10 * i, np.uint8)).save(folder / f"s{i}.png")
    tiles = make_tiles([folder], root / "tiles", root, tile=40, progress=False)
    assert [t.data["source"] for t in tiles] == [str(folder / f"s{i}.png") for i in range(3)]  # one file per slice
    assert {t.data["stack"] for t in tiles} == {str(folder)}
    assert (
        tiles[1].data["image_prev"] == tiles[0].data["image"] and tiles[1].data["image_next"] == tiles[2].data["image"]
    )
    index = NeighbourIndex.from_tasks(_tasks(tiles, drop_neighbour_keys=True), "image")
    assert index.url(tiles[0].data, 2) == tiles[2].data["image"]


def test_context_urls_from_the_index_clamp_at_the_ends_and_skip_missing_slices(project):
    _, tiles, _ = project
    tasks = _tasks(tiles, drop_neighbour_keys=True)
    index = NeighbourIndex.from_tasks(tasks, "image")
    centre = next(
        t for t in tasks.values() if (t["data"]["slice"], t["data"]["tile_y"], t["data"]["tile_x"]) == (1, 32, 0)
    )
    urls = context_urls(centre, (-2, -1, 0, 1, 2), "image", index)
    assert urls[0] == centre["data"]["image"]
    assert urls[-1] == _at(tiles, 0, 32, 0)["image"] and urls[1] == _at(tiles, 2, 32, 0)["image"]
    assert urls[-2] == _at(tiles, 0, 32, 0)["image"]  # z-2 = -1 is clamped to slice 0 (data.context's edge rule)
    assert urls[2] == _at(tiles, 3, 32, 0)["image"]
    # slice 2 absent from the project: its neighbours fall back to the tile itself (None = centre)
    gap = NeighbourIndex.from_tasks({k: t for k, t in tasks.items() if t["data"]["slice"] != 2}, "image")
    assert context_urls(centre, (-1, 0, 1), "image", gap)[1] is None
    # a task without a position and without neighbour keys: the tile itself for every offset
    assert context_urls({"data": {"image": "/x.png"}}, (-1, 0, 1), "image", index) == {-1: None, 0: "/x.png", 1: None}
    # the importer's keys win for -1/+1 (written from the whole stack), other offsets come from the index
    keyed = _tasks(tiles)[next(k for k, t in tasks.items() if t is centre)]
    assert context_urls(keyed, (-1, 1), "image", None) == {
        -1: keyed["data"]["image_prev"],
        1: keyed["data"]["image_next"],
    }


def test_a_missing_or_bad_neighbour_is_the_tile_itself():
    centre = np.full((8, 8), 0.5, np.float32)
    good = np.full((8, 8), 0.25, np.float32)

    def fetch(url):
        if url == "gone":
            raise OSError("404")
        return {"good": good, "small": np.zeros((4, 4), np.float32)}[url]

    out = stack_context_images(centre, {-2: None, -1: "gone", 0: "c", 1: "good", 2: "small"}, (-2, -1, 0, 1, 2), fetch)
    assert out.shape == (5, 8, 8) and out.dtype == np.float32
    for c, expected in enumerate((centre, centre, centre, good, centre)):
        np.testing.assert_array_equal(out[c], expected)


def test_load_context_image_reads_the_neighbours_through_the_media_layer(project):
    stack, tiles, settings = project
    config = parse_label_config(XML)
    tasks = _tasks(tiles)
    tid = next(
        k for k, t in tasks.items() if (t["data"]["slice"], t["data"]["tile_y"], t["data"]["tile_x"]) == (0, 0, 32)
    )
    plain = load_context_image(tasks[tid], config, settings, (0,))
    assert plain.shape == (48, 48)  # offsets (0,): the tile alone, as without context
    img = load_context_image(tasks[tid], config, settings, (-1, 0, 1))
    assert img.shape == (3, 48, 48)
    expected = [normalize(stack[z, 0:48, 32:80]) for z in (0, 0, 1)]  # z-1 at slice 0: the tile itself
    for c in range(3):
        np.testing.assert_allclose(img[c], expected[c], atol=1e-6)
    broken = {**tasks[tid], "data": {**tasks[tid]["data"], "image_next": "/data/local-files/?d=tiles/none.png"}}
    img = load_context_image(broken, config, settings, (-1, 0, 1))  # a neighbour that is gone never fails the task
    np.testing.assert_array_equal(img[2], img[1])


def test_the_training_job_decodes_labelled_tiles_and_calibration_crops_with_context(project):
    from ml_backend.jobs.train import ProjectSnapshot, _decode
    from ml_backend.labelstudio.project_data import LabelStudioProject
    from ml_backend.labelstudio.rle import mask_to_results
    from ml_backend.labelstudio.tasks import calibration_crops

    stack, tiles, settings = project
    config = parse_label_config(XML)
    tasks = _tasks(tiles, drop_neighbour_keys=True)  # neighbours only through the project's task list
    labelled = [k for k, t in tasks.items() if t["data"]["slice"] in (1, 3)][:3]
    mask = np.zeros((48, 48), np.int64)
    mask[10:20, 10:20] = 1
    annotations = {k: {"id": 100 + k, "result": mask_to_results(mask, config)} for k in labelled}
    project_data = LabelStudioProject(1, settings, ls=object(), listed=tasks, config=config, label_xml=XML)  # no HTTP
    snap = ProjectSnapshot(project_data, config, XML, tasks, annotations, None, "sig")
    decoded = _decode(1, snap, settings, (-1, 0, 1))
    assert len(decoded.tiles) == 3
    for tile in decoded.tiles:
        d = tasks[tile.task_id]["data"]
        z, y, x = d["slice"], d["tile_y"], d["tile_x"]
        assert tile.image.shape == (3, 48, 48) and tile.mask.shape == (48, 48)
        for c, k in enumerate((z - 1, z, min(z + 1, 3))):
            np.testing.assert_allclose(tile.image[c], normalize(stack[k, y : y + 48, x : x + 48]), atol=1e-6)
    assert _decode(1, snap, settings).tiles[0].image.shape == (48, 48)  # 2-D as before
    crops = calibration_crops(tasks, settings, snap.load((-1, 0, 1)))
    assert len(crops) == 5 and all(c.shape == (3, 32, 32) for c in crops)
