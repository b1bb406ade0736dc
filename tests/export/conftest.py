"""Fixtures of the export tests: a generated volume, its stack on disk, a project's model version."""

from __future__ import annotations

from pathlib import Path

import pytest
import tifffile
from export_helpers import SHAPE, publish_model

from ml_backend.data.volume import generate_volume


@pytest.fixture(scope="session")
def volume():
    return generate_volume(SHAPE, seed=3)


@pytest.fixture
def stack_file(tmp_path, volume) -> Path:
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, volume.image)
    return path


@pytest.fixture
def model_dir(tmp_path, volume) -> Path:
    d = tmp_path / "models"
    publish_model(d, image=volume.image[0])
    return d
