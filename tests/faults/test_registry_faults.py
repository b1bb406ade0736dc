"""Registry faults on real file systems: a full disk and a read-only MODEL_DIR while a version is published.

Tests run as root, and root ignores permission bits, so ``chmod`` cannot make a directory read-only here: each test
mounts a small tmpfs (the ``tmpfs`` fixture of tests/conftest.py), then remounts it read-only or fills it. Skipped
with the reason when mounting is not permitted (no CAP_SYS_ADMIN, e.g. an unprivileged container).

What each shows: the error names the cause (read-only / no space), the previous version stays current and loadable
(also by a fresh ModelCache, as a serving worker would), no half-written or unpromoted version is left in
``versions/``, no temporary file remains, and publishing works again once the fault is gone.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

from ml_backend.model import build_model
from ml_backend.store.cache import ModelCache
from ml_backend.store.registry import ModelRegistry, RegistryWriteError

pytestmark = pytest.mark.timeout(120)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("unet", width=8, depth=2).eval()


def _weights(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_previous_intact(model_dir: Path, version: str, weights: dict) -> None:
    """``version`` is still current, complete, alone in versions/, and loads with the same weights."""
    reg = ModelRegistry(model_dir, 1)
    assert reg.current_version() == version
    names = sorted(p.name for p in reg.versions_dir.iterdir())
    assert names == [version], f"left in versions/: {names}"  # no .tmp-*, no orphaned unpromoted version
    stray = [p.name for p in reg.root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith((".tmp", ".trash"))]
    assert stray == [], f"temporary files left: {stray}"
    model, meta = ModelCache(model_dir, device="cpu").get(1)  # a serving worker starting now
    assert meta["version"] == version
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert [e["version"] for e in reg.history()] == [version]


def test_read_only_model_dir_keeps_the_previous_version(tmpfs):
    model_dir = tmpfs("4m")
    reg = ModelRegistry(model_dir, 1)
    first = _model(1)
    v1 = reg.publish(first, {"n": 1})
    tmpfs.remount(model_dir, "ro")
    with pytest.raises(RegistryWriteError, match="read-only file system.*the current version \\(v0001-.*\\) stays"):
        reg.publish(_model(2), {"n": 2})
    _assert_previous_intact(model_dir, v1, _weights(first))
    tmpfs.remount(model_dir, "rw")  # the operator fixes the mount: the next job publishes normally
    v2 = reg.publish(_model(2), {"n": 2})
    assert reg.current_version() == v2 and reg.meta(v2)["parent"] == v1


def test_full_disk_while_writing_the_checkpoint_keeps_the_previous_version(tmpfs):
    model_dir = tmpfs("1m")
    reg = ModelRegistry(model_dir, 1)
    first = _model(1)
    v1 = reg.publish(first, {"n": 1})
    filler = model_dir / "filler"
    with open(filler, "wb") as fh, contextlib.suppress(OSError):  # fill what is left, up to ENOSPC
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()
    free = os.statvfs(model_dir)
    assert free.f_bavail * free.f_frsize < 64 * 1024, "the tmpfs is not full"
    with pytest.raises(RegistryWriteError, match="no space left|probably no space left") as info:
        reg.publish(_model(2), {"n": 2})
    assert "stays current" in str(info.value) and v1 in str(info.value)
    filler.unlink()
    _assert_previous_intact(model_dir, v1, _weights(first))
    v2 = reg.publish(_model(2), {"n": 2})
    assert reg.current_version() == v2


def test_no_inode_left_for_the_pointer_removes_the_unpromoted_version(tmpfs, caplog):
    """The version directory is written completely but CURRENT cannot be replaced (no inode left for its
    temporary file): the new version must not become current and must not be left behind."""
    model_dir = tmpfs("4m", nr_inodes=64)
    reg = ModelRegistry(model_dir, 1)
    first = _model(1)
    v1 = reg.publish(first, {"n": 1})
    st = os.statvfs(model_dir)
    used = st.f_files - st.f_ffree
    # a publish needs 3 new inodes for the version (temporary directory, model.pt, meta.json), then 1 for CURRENT
    tmpfs.remount(model_dir, f"nr_inodes={used + 3}")
    with (
        caplog.at_level("INFO", logger="ml_backend.store.registry"),
        pytest.raises(RegistryWriteError, match="no space"),
    ):
        reg.publish(_model(2), {"n": 2})
    assert "which could not be promoted" in caplog.text  # the failure hit the pointer, after the version was written
    tmpfs.remount(model_dir, "nr_inodes=64")
    _assert_previous_intact(model_dir, v1, _weights(first))
    assert reg.publish(_model(2), {"n": 2}).startswith("v0002-")
