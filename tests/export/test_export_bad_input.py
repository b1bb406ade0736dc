"""Bad input gets a clear error and leaves nothing behind: slices of different sizes, an unreadable slice (header
and pixels), an unknown version, a version trained on other input channels, a full disk (a real 1 MiB tmpfs)."""

from __future__ import annotations

import numpy as np
import pytest
from export_helpers import publish_model
from PIL import Image

from ml_backend.export.driver import export_stack
from ml_backend.export.run import ExportError, ExportWriteError, work_dir_for
from ml_backend.export.source import ExportInputError

pytestmark = pytest.mark.timeout(300)
OPTS = {"project": "1", "tile": 48, "overlap": 8, "progress": False}


def slices_folder(tmp_path, volume, n=6):
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(n):
        Image.fromarray(volume.image[z]).save(folder / f"s{z:03d}.png")
    return folder


def nothing_left(out):
    assert not out.exists()
    assert not work_dir_for(out.resolve()).exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_slices_of_different_sizes(tmp_path, volume, model_dir):
    folder = slices_folder(tmp_path, volume)
    Image.fromarray(volume.image[0][:60, :100]).save(folder / "s002.png")
    out = tmp_path / "out"
    with pytest.raises(ExportInputError, match=r"differ in size .*100x60: 1 slice\(s\), e.g. s002.png"):
        export_stack(folder, out, model_dir=model_dir, **OPTS)
    nothing_left(out)


def test_unreadable_slice_header(tmp_path, volume, model_dir):
    folder = slices_folder(tmp_path, volume)
    (folder / "s003.png").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    with pytest.raises(ExportInputError, match="unreadable slice .*s003.png"):
        export_stack(folder, out, model_dir=model_dir, **OPTS)
    nothing_left(out)


def test_slice_whose_pixels_do_not_decode_midway(tmp_path, volume, model_dir):
    """The header is fine (sizes pass the up-front check) but the data is cut: found while exporting, and the work
    directory with the slices already done is removed."""
    folder = slices_folder(tmp_path, volume)
    data = (folder / "s004.png").read_bytes()
    (folder / "s004.png").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    with pytest.raises(ExportInputError, match="unreadable slice .*s004.png"):
        export_stack(folder, out, model_dir=model_dir, chunk_slices=2, **OPTS)
    nothing_left(out)


def test_unknown_version_names_the_known_ones(tmp_path, stack_file, model_dir):
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"no version 'v0042-20260101T000000Z' \(known: v0001-"):
        export_stack(stack_file, out, model_dir=model_dir, version="v0042-20260101T000000Z", **OPTS)
    nothing_left(out)
    with pytest.raises(ExportError, match="has no live model version"):
        export_stack(stack_file, out, model_dir=tmp_path / "empty-models", **OPTS)
    nothing_left(out)


def test_version_trained_on_other_input_channels(tmp_path, volume, stack_file):
    model_dir = tmp_path / "models25"
    publish_model(model_dir, in_channels=3, context_offsets=[-1, 0, 1])
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"trained on 3 input channel\(s\) \(slices z\[-1, 0, 1\]\), but this "
                       r"export asks for slices z\[0\]"):  # fmt: skip
        export_stack(stack_file, out, model_dir=model_dir, expected_offsets=(0,), **OPTS)
    nothing_left(out)
    model = publish_model(tmp_path / "bad", image=None)
    from ml_backend.store.registry import ModelRegistry

    loaded, _ = ModelRegistry(tmp_path / "bad", "1").load(model)
    loaded.hparams["in_channels"] = 2  # weights read 1 channel: an inconsistent version
    from ml_backend.export.run import check_channels

    with pytest.raises(ExportError, match="weights read 1 input channel"):
        check_channels(loaded, model)


def test_full_disk_removes_the_partial_export(tmp_path, volume, model_dir, tmpfs):
    """A real 1 MiB tmpfs: the probability maps and labels of 40 slices of 80x112 do not fit."""
    import tifffile

    big = np.concatenate([volume.image] * 3)
    stack = tmp_path / "big.tif"
    tifffile.imwrite(stack, big)
    disk = tmpfs("1m")
    out = disk / "out"
    with pytest.raises(ExportWriteError, match="no space left on the disk holding"):
        export_stack(stack, out, model_dir=model_dir, probabilities=True, chunk_slices=4, **OPTS)
    assert list(disk.iterdir()) == []
