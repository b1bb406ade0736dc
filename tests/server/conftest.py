"""Fixtures for the backend's contract tests: a briefly trained U-Net, tiles on disk, an app per test."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

from ml_backend.config import Settings


@pytest.fixture(scope="session")
def trained_model(train_tiny_unet):
    """A tiny U-Net really trained (a few seconds, CPU) on generated EM-like tiles: its masks mean something."""
    model, metrics = train_tiny_unet(n=10, seed=11, depth=2, steps=40)
    assert metrics["val_iou"] > metrics["initial_val_iou"]
    return model


@pytest.fixture(scope="session")
def em_tiles():
    """(images uint8 (n, 64, 64), masks) of generated EM-like data, different from the training tiles."""
    from ml_backend.data.synthetic import generate_em_like

    return generate_em_like(4, 64, seed=99)


@pytest.fixture
def doc_root(tmp_path, em_tiles):
    """A local-files document root holding the tiles as PNG (t0.png ...), a corrupt file and a huge image."""
    root = tmp_path / "files"
    root.mkdir()
    for i, img in enumerate(em_tiles[0]):
        Image.fromarray(img).save(root / f"t{i}.png")
    Image.fromarray(np.full((48, 80), 7, dtype=np.uint8)).save(root / "flat.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    Image.fromarray(np.zeros((300, 300), dtype=np.uint8)).save(root / "huge.png")
    return root


@pytest.fixture
def settings(tmp_path, doc_root):
    return Settings.from_env(
        model_dir=tmp_path / "models",
        local_files_root=str(doc_root),
        label_studio_url="http://127.0.0.1:9",  # nothing listens: files must come from the document root
        label_studio_api_key="",
        max_image_pixels=200 * 200,
        redis_url="redis://127.0.0.1:9/0",
        basic_auth_user="",
        basic_auth_pass="",
        device="cpu",
    )


@pytest.fixture
def make_client(settings):
    """make_client(**overrides) -> Flask test client of a fresh app."""

    from ml_backend.server.app import create_app

    def make(**overrides):
        app = create_app(settings.replace(**overrides))
        app.testing = True
        return app.test_client()

    return make


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def publish(settings, trained_model):
    """publish(project_id, model=None) -> version id, through E's registry (as a training job would)."""
    from ml_backend.store.registry import ModelRegistry

    def do(project_id, model=None, **meta):
        return ModelRegistry(settings.model_dir, project_id).publish(
            copy.deepcopy(model if model is not None else trained_model), {"note": "test", **meta}
        )

    return do
