"""U-Net model, registry/factory and safe checkpoint I/O."""

from ml_backend.model.checkpoint import (
    MODELS,
    CheckpointError,
    build_model,
    load_checkpoint,
    register_model,
    save_checkpoint,
)
from ml_backend.model.unet import UNet

__all__ = [
    "MODELS",
    "CheckpointError",
    "UNet",
    "build_model",
    "load_checkpoint",
    "register_model",
    "save_checkpoint",
]
