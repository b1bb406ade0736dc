"""Tile import (ml_backend.labelstudio.importing) and local Label Studio (ml_backend.services.label_studio) helpers,
without a server.

(Importing into a real Label Studio, idempotency against existing tasks and the project set-up are exercised in
tests/integration/test_predict_e2e.py.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def importer():
    from ml_backend.labelstudio import importing

    return importing


@pytest.fixture(scope="module")
def lss():
    from ml_backend.services import label_studio

    return label_studio


def test_tile_origins_cover_the_slice_with_full_size_tiles(importer):
    assert list(importer.tile_origins(100, 100, 64)) == [(0, 0), (0, 36), (36, 0), (36, 36)]
    assert list(importer.tile_origins(40, 70, 64)) == [(0, 0), (0, 6)]  # smaller than a tile: one row
    assert list(importer.tile_origins(128, 128, 64)) == [(0, 0), (0, 64), (64, 0), (64, 64)]


def test_png_arrays_keep_bit_depth(importer):
    u8 = np.arange(16, dtype=np.uint8).reshape(4, 4)
    u16 = (np.arange(16, dtype=np.uint16) * 4000).reshape(4, 4)
    assert importer.to_png_array(u8) is u8
    assert importer.to_png_array(u16) is u16
    f = importer.to_png_array(np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4))
    assert f.dtype == np.uint16 and f.min() == 0 and f.max() == 65535


def test_make_tiles_from_tiff_stack_and_16bit_folder(importer, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    stack = (np.random.default_rng(0).random((2, 100, 90)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    folder = tmp_path / "slices"
    folder.mkdir()
    slices16 = (np.random.default_rng(1).random((2, 50, 50)) * 60000).astype(np.uint16)
    for i, s in enumerate(slices16):
        Image.fromarray(s).save(folder / f"s{i}.png")
    tiles = importer.make_tiles([tmp_path / "stack.tif", folder], root / "tiles", root, tile=64, progress=False)
    assert len(tiles) == 2 * 4 + 2
    first = tiles[0]
    assert first.data["image"].startswith("/data/local-files/?d=tiles/stack/")
    assert first.data["source"] == str(tmp_path / "stack.tif")
    assert (first.data["slice"], first.data["tile_x"], first.data["tile_y"]) == (0, 0, 0)
    last_stack = tiles[3]
    assert (last_stack.data["tile_y"], last_stack.data["tile_x"]) == (36, 26)
    np.testing.assert_array_equal(np.asarray(Image.open(last_stack.path)), stack[0, 36:100, 26:90])
    sixteen = tiles[-1]
    with Image.open(sixteen.path) as img:
        arr = np.asarray(img)
    assert arr.dtype == np.uint16 and arr.shape == (50, 50)  # 16-bit stays 16-bit, smaller than a tile: one tile
    np.testing.assert_array_equal(arr, slices16[1])
    assert (sixteen.data["tile_width"], sixteen.data["tile_height"]) == (50, 50)
    # running again writes nothing new and yields the same task data
    mtimes = {t.path: t.path.stat().st_mtime_ns for t in tiles}
    again = importer.make_tiles([tmp_path / "stack.tif", folder], root / "tiles", root, tile=64, progress=False)
    assert [t.data for t in again] == [t.data for t in tiles]
    assert all(t.path.stat().st_mtime_ns == mtimes[t.path] for t in again)


def test_tile_folder_must_be_inside_the_document_root(importer, tmp_path):
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((1, 32, 32), np.uint8), photometric="minisblack")
    with pytest.raises(importer.ImportTilesError, match="inside the local-files document root"):
        importer.make_tiles([tmp_path / "s.tif"], tmp_path / "elsewhere", tmp_path / "root", tile=32)
    with pytest.raises(importer.ImportTilesError, match="--tile must be >= 16"):
        importer.make_tiles([tmp_path / "s.tif"], tmp_path, tmp_path, tile=8)


def test_server_token_is_kept_in_the_data_dir(lss, tmp_path):
    token = lss._token_for(tmp_path, None)
    assert len(token) == 40 and set(token) <= set("0123456789abcdef")
    saved = tmp_path / lss.TOKEN_FILE
    assert saved.read_text() == token and saved.stat().st_mode & 0o777 == 0o600  # only the owner can read it
    assert lss._token_for(tmp_path, None) == token  # a restart reuses the admin's token
    other = tmp_path / "other"
    other.mkdir()
    assert lss._token_for(other, None) != token  # each data dir has its own token
    given = tmp_path / "given"
    given.mkdir()
    assert lss._token_for(given, "g" * 40) == "g" * 40 and (given / lss.TOKEN_FILE).read_text() == "g" * 40
    assert lss._token_for(given, None) == "g" * 40  # a given token is saved and reused after a restart


def test_server_environment_allows_a_local_backend_and_stays_offline(lss, monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "elsewhere"))  # the backend's own paths must not leak into LS
    monkeypatch.setenv("VIRTUAL_ENV", str(tmp_path / "venv"))
    monkeypatch.setenv("KEEP_ME", "1")
    env = lss.server_environment(data_dir=tmp_path, document_root=tmp_path / "f", username="a@b.c", password="p",
                                 token="t" * 40)  # fmt: skip
    assert env["ML_BLOCK_LOCAL_IP"] == "false" and env["SSRF_PROTECTION_ENABLED"] == "false"
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert env["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"] == "true"
    assert env["LATEST_VERSION_CHECK"] == "false" and env["COLLECT_ANALYTICS"] == "false"
    assert env["LABEL_STUDIO_BASE_DATA_DIR"] == str(tmp_path)
    assert env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] == str(tmp_path / "f")
    assert (env["LABEL_STUDIO_USERNAME"], env["LABEL_STUDIO_PASSWORD"]) == ("a@b.c", "p")
    assert env["LABEL_STUDIO_USER_TOKEN"] == "t" * 40
    assert "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env and env["KEEP_ME"] == "1"


def test_default_venv_follows_the_environment(lss, monkeypatch, tmp_path):
    monkeypatch.setenv("LABEL_STUDIO_VENV", str(tmp_path / "v"))
    assert lss.default_venv() == tmp_path / "v"
    monkeypatch.delenv("LABEL_STUDIO_VENV")
    assert lss.default_venv() == REPO / ".cache" / "label-studio-venv"
