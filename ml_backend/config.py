"""Configuration from environment variables, read once per process.

Every setting has a documented default (see README.md, "Configuration"); the
backend, the RQ worker and the scripts all read the same `Settings`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any


def _env(name: str, default: Any, cast: type = str) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if cast is bool:
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    try:
        return cast(raw)
    except ValueError as exc:  # a clear message beats a traceback deep in the code
        raise ValueError(f"environment variable {name}={raw!r} is not a valid {cast.__name__}") from exc


@dataclass(frozen=True)
class Settings:
    """All tunables of the backend. Field metadata holds the environment variable name."""

    # Where versions, project state and caches live.
    model_dir: Path = field(default=Path("models"), metadata={"env": "MODEL_DIR", "cast": Path})
    # Label Studio connection (the source of truth for annotations).
    label_studio_url: str = field(default="http://127.0.0.1:8080", metadata={"env": "LABEL_STUDIO_URL"})
    label_studio_api_key: str = field(default="", metadata={"env": "LABEL_STUDIO_API_KEY"})
    # Queue.
    redis_url: str = field(default="redis://127.0.0.1:6379/0", metadata={"env": "REDIS_URL"})
    queue_name: str = field(default="ml-backend", metadata={"env": "RQ_QUEUE"})
    # Optional HTTP basic auth expected from Label Studio.
    basic_auth_user: str = field(default="", metadata={"env": "BASIC_AUTH_USER"})
    basic_auth_pass: str = field(default="", metadata={"env": "BASIC_AUTH_PASS"})
    # Active learning.
    strategy: str = field(default="entropy", metadata={"env": "STRATEGY"})
    aggregation: str = field(default="sum", metadata={"env": "SCORE_AGGREGATION"})
    mc_passes: int = field(default=8, metadata={"env": "MC_PASSES", "cast": int})
    train_batch_size: int = field(default=20, metadata={"env": "TRAIN_BATCH_SIZE", "cast": int})
    # Model architecture (used when a project trains its first version).
    model_width: int = field(default=16, metadata={"env": "MODEL_WIDTH", "cast": int})
    model_depth: int = field(default=4, metadata={"env": "MODEL_DEPTH", "cast": int})
    model_dropout: float = field(default=0.2, metadata={"env": "MODEL_DROPOUT", "cast": float})
    model_norm: str = field(default="batch", metadata={"env": "MODEL_NORM"})  # batch | group | instance | none
    # Training.
    learning_rate: float = field(default=5e-4, metadata={"env": "LEARNING_RATE", "cast": float})
    # A project's first version trains from scratch: the papers' initial rate (1e-3) rather than the fine-tuning one.
    initial_learning_rate: float = field(default=1e-3, metadata={"env": "INITIAL_LEARNING_RATE", "cast": float})
    train_steps: int = field(default=400, metadata={"env": "TRAIN_STEPS", "cast": int})
    train_time_budget_s: float = field(default=900.0, metadata={"env": "TRAIN_TIME_BUDGET_S", "cast": float})
    train_crop: int = field(default=128, metadata={"env": "TRAIN_CROP", "cast": int})
    val_fraction: float = field(default=0.2, metadata={"env": "VAL_FRACTION", "cast": float})
    # Project tiles (a seeded sample of all tasks, labelled or not) whose crops re-estimate BatchNorm statistics after
    # each training: the labelled set is biased by the strategy, the pool is not. 0 disables.
    bn_calibration_tiles: int = field(default=64, metadata={"env": "BN_CALIBRATION_TILES", "cast": int})
    seed: int = field(default=0, metadata={"env": "SEED", "cast": int})
    keep_versions: int = field(default=10, metadata={"env": "KEEP_VERSIONS", "cast": int})
    # Inference.
    device: str = field(default="auto", metadata={"env": "DEVICE"})
    tile_size: int = field(default=256, metadata={"env": "TILE_SIZE", "cast": int})
    tile_overlap: int = field(default=32, metadata={"env": "TILE_OVERLAP", "cast": int})
    inference_batch: int = field(default=4, metadata={"env": "INFERENCE_BATCH", "cast": int})
    max_image_pixels: int = field(default=120_000_000, metadata={"env": "MAX_IMAGE_PIXELS", "cast": int})
    rescore_chunk: int = field(default=50, metadata={"env": "RESCORE_CHUNK", "cast": int})
    # Where relative /data/local-files/?d= paths resolve when the backend shares a disk with Label Studio.
    local_files_root: str = field(default="", metadata={"env": "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"})

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in overrides:
                values[f.name] = overrides[f.name]
                continue
            values[f.name] = _env(f.metadata["env"], f.default, f.metadata.get("cast", str))
        return cls(**values)

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        return (self.basic_auth_user, self.basic_auth_pass) if self.basic_auth_user else None

    @staticmethod
    def documented() -> list[tuple[str, str]]:
        """(environment variable, default) pairs, for the README table."""
        return [(f.metadata["env"], str(f.default)) for f in fields(Settings)]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()


def torch_device(preference: str = "auto"):
    """CUDA when present (or asked for), CPU otherwise."""
    import torch

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)
