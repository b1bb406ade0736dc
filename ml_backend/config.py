"""Configuration from environment variables, read and validated once per process (pydantic-settings).

Every setting has a documented default (see README.md, "Configuration"); the backend, the RQ worker and the scripts
all read the same `Settings`. A value that does not parse (``MC_PASSES=eight``) or breaks a rule (basic-auth user
without a password) stops the process at start-up with a message naming the variable, instead of failing later.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# CONTEXT_OFFSETS: the slice offsets of a 2.5D model input; ml_backend.data.context re-exports these (they sit here,
# the bottom layer, because the setting's validator needs them: issue 19, no config -> data import).
DEFAULT_OFFSETS = (-1, 0, 1)
# DIVERSITY_METHOD: the batch selection methods of ml_backend.strategies.batch (its METHODS).
DIVERSITY_METHODS = ("auto", "typiclust", "weighted_kmeans", "top", "stochastic")


def resolve_offsets(offsets: Sequence[int] = DEFAULT_OFFSETS) -> tuple[int, ...]:
    """Validated slice offsets: integers, no duplicates, containing 0 (the tile's own slice)."""
    out = tuple(int(o) for o in offsets)
    if not out or 0 not in out or len(set(out)) != len(out):
        raise ValueError(f"offsets must be distinct integers including 0, got {offsets}")
    return out


def parse_offsets(text: str | Sequence[int]) -> tuple[int, ...]:
    """Offsets from a comma-separated string (``"-1,0,1"``, the CONTEXT_OFFSETS setting) or a sequence, validated."""
    if isinstance(text, str):
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"expected comma-separated integers, got {text!r}") from None
        return resolve_offsets(values)
    return resolve_offsets(text)


def _env(name: str, *aliases: str) -> Any:
    """Field option: read from environment variable ``name`` (and ``aliases``); tests may pass the field name."""
    return AliasChoices(name, *aliases)


class ConfigError(ValueError):
    """A setting is invalid: raised at start-up with the variable's name."""


class Settings(BaseSettings):
    """All tunables of the backend. Each field's validation alias is its environment variable."""

    model_config = SettingsConfigDict(frozen=True, env_ignore_empty=True, populate_by_name=True, extra="ignore")

    # Where versions, project state and caches live.
    model_dir: Path = Field(Path("models"), validation_alias=_env("MODEL_DIR", "model_dir"))
    # Label Studio connection (the source of truth for annotations).
    label_studio_url: str = Field(
        "http://127.0.0.1:8080", validation_alias=_env("LABEL_STUDIO_URL", "label_studio_url")
    )
    label_studio_api_key: str = Field("", validation_alias=_env("LABEL_STUDIO_API_KEY", "label_studio_api_key"))
    # Queue.
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=_env("REDIS_URL", "redis_url"))
    queue_name: str = Field("ml-backend", validation_alias=_env("RQ_QUEUE", "queue_name"))
    # Worker crash recovery (RQ): a running job's heartbeat is refreshed every WORKER_HEARTBEAT_S; a job whose heartbeat
    # is older than WORKER_ABANDONED_AFTER_S (its worker died) is re-queued by an idle worker, which looks for such
    # jobs every WORKER_MAINTENANCE_S. Worst case from a kill to the re-queue: ABANDONED_AFTER + MAINTENANCE.
    worker_heartbeat_s: int = Field(10, ge=1, validation_alias=_env("WORKER_HEARTBEAT_S", "worker_heartbeat_s"))
    worker_abandoned_after_s: int = Field(
        30, ge=2, validation_alias=_env("WORKER_ABANDONED_AFTER_S", "worker_abandoned_after_s")
    )
    worker_maintenance_s: int = Field(15, ge=1, validation_alias=_env("WORKER_MAINTENANCE_S", "worker_maintenance_s"))
    # Redis outages (ml_backend.worker): an unreachable Redis is retried with exponential backoff (1 s, doubling, at
    # most WORKER_REDIS_RETRY_MAX_S between tries) while a running job goes on; the worker gives up (exit code 3) only
    # after WORKER_REDIS_GIVE_UP_S of outage, 0 = never (a restart policy would only restart it into the same outage).
    worker_redis_retry_max_s: float = Field(
        30.0, gt=0, validation_alias=_env("WORKER_REDIS_RETRY_MAX_S", "worker_redis_retry_max_s")
    )
    worker_redis_give_up_s: float = Field(
        0.0, ge=0, validation_alias=_env("WORKER_REDIS_GIVE_UP_S", "worker_redis_give_up_s")
    )
    # Optional HTTP basic auth expected from Label Studio (both or neither).
    basic_auth_user: str = Field("", validation_alias=_env("BASIC_AUTH_USER", "basic_auth_user"))
    basic_auth_pass: str = Field("", validation_alias=_env("BASIC_AUTH_PASS", "basic_auth_pass"))
    # Active learning.
    strategy: str = Field("entropy", validation_alias=_env("STRATEGY", "strategy"))
    aggregation: str = Field("sum", validation_alias=_env("SCORE_AGGREGATION", "aggregation"))
    mc_passes: int = Field(8, ge=1, validation_alias=_env("MC_PASSES", "mc_passes"))
    train_batch_size: int = Field(20, ge=1, validation_alias=_env("TRAIN_BATCH_SIZE", "train_batch_size"))
    # Model architecture (used when a project trains its first version).
    model_width: int = Field(16, ge=1, validation_alias=_env("MODEL_WIDTH", "model_width"))
    model_depth: int = Field(4, ge=1, validation_alias=_env("MODEL_DEPTH", "model_depth"))
    model_dropout: float = Field(0.2, ge=0, lt=1, validation_alias=_env("MODEL_DROPOUT", "model_dropout"))
    model_norm: str = Field("batch", validation_alias=_env("MODEL_NORM", "model_norm"))  # batch|group|instance|none
    # 2.5D context (issue 11): the slices z + offset the model reads as input channels (comma-separated, must hold
    # 0, e.g. "-1,0,1"); neighbours are the same tile window on the same stack (ml_backend.data.context rules: edges
    # clamped, missing slices replaced by the tile's own). "0" = plain 2-D. A stored model built for other offsets
    # is not fine-tuned: the next training starts a new model.
    context_offsets: str = Field("0", validation_alias=_env("CONTEXT_OFFSETS", "context_offsets"))
    # Training.
    learning_rate: float = Field(5e-4, gt=0, validation_alias=_env("LEARNING_RATE", "learning_rate"))
    # A project's first version trains from scratch: the papers' initial rate (1e-3) rather than the fine-tuning one.
    initial_learning_rate: float = Field(
        1e-3, gt=0, validation_alias=_env("INITIAL_LEARNING_RATE", "initial_learning_rate")
    )
    train_steps: int = Field(400, ge=1, validation_alias=_env("TRAIN_STEPS", "train_steps"))
    # A project's first version (no parent version) trains TRAIN_STEPS x INITIAL_TRAIN_FACTOR steps: a training
    # from random weights needs more than a fine-tuning to leave the all-background plateau (the benchmark's CPU
    # protocol trains its initial model 900 steps against 400 per round); a factor, so a short TRAIN_STEPS stays short.
    initial_train_factor: float = Field(
        2.25, ge=1.0, le=20.0, validation_alias=_env("INITIAL_TRAIN_FACTOR", "initial_train_factor")
    )
    train_time_budget_s: float = Field(900.0, gt=0, validation_alias=_env("TRAIN_TIME_BUDGET_S", "train_time_budget_s"))
    # Issue 18: a project's first version is live within minutes on a CPU. Its training stops after this many seconds
    # (its learning rate anneals by the clock, so it ends annealed), and when the clock cut it short a follow-up
    # training on the same labels continues from it at once (a fine-tuning round). A GPU never reaches it.
    first_version_time_budget_s: float = Field(
        300.0, gt=0, validation_alias=_env("FIRST_VERSION_TIME_BUDGET_S", "first_version_time_budget_s")
    )
    train_crop: int = Field(128, ge=8, validation_alias=_env("TRAIN_CROP", "train_crop"))
    val_fraction: float = Field(0.2, ge=0, lt=1, validation_alias=_env("VAL_FRACTION", "val_fraction"))
    # Project tiles (a seeded sample of all tasks, labelled or not) whose crops re-estimate BatchNorm statistics after
    # each training: the labelled set is biased by the strategy, the pool is not. 0 disables.
    bn_calibration_tiles: int = Field(64, ge=0, validation_alias=_env("BN_CALIBRATION_TILES", "bn_calibration_tiles"))
    seed: int = Field(0, validation_alias=_env("SEED", "seed"))
    keep_versions: int = Field(10, ge=1, validation_alias=_env("KEEP_VERSIONS", "keep_versions"))
    # Prediction hygiene: model versions whose predictions stay in Label Studio after a delivery (1: only the live
    # version's, 2: also the previous one's, 0: keep all). Older ones are deleted once the new ones are in.
    keep_prediction_versions: int = Field(
        1, ge=0, validation_alias=_env("KEEP_PREDICTION_VERSIONS", "keep_prediction_versions")
    )
    # Label Studio 1.23.2 deletes predictions by id one per call: at most this many per round (the rest next round),
    # this many calls at a time (issue 16: never by version; labelstudio.hygiene).
    hygiene_max_deletes: int = Field(2000, ge=0, validation_alias=_env("HYGIENE_MAX_DELETES", "hygiene_max_deletes"))
    hygiene_delete_workers: int = Field(
        4, ge=1, le=32, validation_alias=_env("HYGIENE_DELETE_WORKERS", "hygiene_delete_workers")
    )
    # Inference.
    device: str = Field("auto", validation_alias=_env("DEVICE", "device"))
    tile_size: int = Field(256, ge=16, validation_alias=_env("TILE_SIZE", "tile_size"))
    tile_overlap: int = Field(32, ge=0, validation_alias=_env("TILE_OVERLAP", "tile_overlap"))
    inference_batch: int = Field(4, ge=1, validation_alias=_env("INFERENCE_BATCH", "inference_batch"))
    # Issue 20.3 (inference.precision): the engine /predict and the re-scoring run the U-Net on. INFERENCE_PRECISION
    # auto = bf16 autocast on CUDA, fp32 on CPU; int8 = ONNX Runtime static quantisation (CPU; calibrated on the
    # first INT8_CALIBRATION_TILES images it scores). INFERENCE_RUNTIME auto = ONNX Runtime on CPU when installed
    # (BatchNorm folded, ReLU fused: measured faster, BENCHMARKS.md "Speed"), PyTorch on CUDA. CUDA_TUNING (CUDA
    # only): channels-last, cudnn.benchmark, pinned-memory transfers.
    # (Literal values, not a validator importing inference.precision: reading settings must not import torch.)
    inference_precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto", validation_alias=_env("INFERENCE_PRECISION", "inference_precision")
    )
    inference_runtime: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", validation_alias=_env("INFERENCE_RUNTIME", "inference_runtime")
    )
    int8_calibration_tiles: int = Field(
        16, ge=1, validation_alias=_env("INT8_CALIBRATION_TILES", "int8_calibration_tiles")
    )
    cuda_tuning: bool = Field(True, validation_alias=_env("CUDA_TUNING", "cuda_tuning"))
    max_image_pixels: int = Field(120_000_000, ge=1, validation_alias=_env("MAX_IMAGE_PIXELS", "max_image_pixels"))
    rescore_chunk: int = Field(50, ge=1, validation_alias=_env("RESCORE_CHUNK", "rescore_chunk"))
    # Issue 20.2 (active_learning.candidates): each training scores and ranks at most CANDIDATE_POOL unlabelled tiles
    # (the papers' pool of 2,000 random tiles; 0 = the whole pool), a fresh seeded draw per round plus up to
    # CANDIDATE_KEEP of the previous ranking's best still unlabelled (at most half the sample). The round's cost is
    # then bounded by the sample, not the dataset; tiles outside it keep their last prediction.
    candidate_pool: int = Field(2000, ge=0, validation_alias=_env("CANDIDATE_POOL", "candidate_pool"))
    candidate_keep: int = Field(200, ge=0, validation_alias=_env("CANDIDATE_KEEP", "candidate_keep"))
    # Issue 18: while fewer than UNCERTAINTY_FROM_LABELS tasks are labelled the batch is a random draw, so scores pick
    # nothing: a round then scores at most this many candidates (its pre-annotations and the next batches), not
    # CANDIDATE_POOL. 0 = CANDIDATE_POOL throughout.
    random_phase_candidates: int = Field(
        200, ge=0, validation_alias=_env("RANDOM_PHASE_CANDIDATES", "random_phase_candidates")
    )
    # Where relative /data/local-files/?d= paths resolve when the backend shares a disk with Label Studio.
    local_files_root: str = Field(
        "", validation_alias=_env("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "local_files_root")
    )
    # Media fetching (what the backend downloads, from where, how much, how long).
    # Comma-separated hosts (host or host:port) whose http(s) URLs may be fetched besides LABEL_STUDIO_URL's host;
    # "*" allows every host. The API token is only ever sent to LABEL_STUDIO_URL's scheme, host and port.
    media_allowed_hosts: str = Field("", validation_alias=_env("MEDIA_ALLOWED_HOSTS", "media_allowed_hosts"))
    # Largest image file downloaded (bytes), streamed to disk; larger answers are cut off with a per-task error.
    max_download_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, validation_alias=_env("MAX_DOWNLOAD_BYTES", "max_download_bytes")
    )
    # Size bound of the on-disk media cache (bytes); least recently used images are evicted beyond it.
    media_cache_bytes: int = Field(2 * 1024**3, ge=0, validation_alias=_env("MEDIA_CACHE_BYTES", "media_cache_bytes"))
    # Overall deadline of one image fetch (connect + all reads + retries), seconds.
    fetch_deadline_s: float = Field(20.0, gt=0, validation_alias=_env("FETCH_DEADLINE_S", "fetch_deadline_s"))
    # Overall deadline of one /predict request (well inside Label Studio's 100 s ML_TIMEOUT_PREDICT); tasks not done
    # by then are answered with an empty list (Label Studio stores nothing) and predicted in the background (RQ).
    predict_deadline_s: float = Field(60.0, gt=0, validation_alias=_env("PREDICT_DEADLINE_S", "predict_deadline_s"))
    # Largest accepted request body (bytes).
    max_request_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, validation_alias=_env("MAX_REQUEST_BYTES", "max_request_bytes")
    )
    # Largest /predict body (bytes). Label Studio sends every selected task in one request, each with its
    # annotations and predictions (a 512-px tile's mask + uncertainty layer: about 45 kB of RLE): 2,000 such tasks
    # are about 95 MB. /predict reads its body task by task (about twice the body in memory, not the parsed tree).
    predict_max_request_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, validation_alias=_env("PREDICT_MAX_REQUEST_BYTES", "predict_max_request_bytes")
    )
    # What the annotator sees beside the pre-annotation (issue 12), when the project's label config has the
    # display-only controls (label_config/*_uncertainty.xml, multiclass.xml, dense_25d.xml).
    # Uncertainty layer: normalised entropy (0 = certain, 1 = uniform) at or above each comma-separated threshold,
    # one level per label of the "uncertainty" control (the shipped configs have one); levels with fewer pixels than
    # UNCERTAINTY_MIN_PIXELS are not drawn.
    uncertainty_thresholds: str = Field(
        "0.5", validation_alias=_env("UNCERTAINTY_THRESHOLDS", "uncertainty_thresholds")
    )
    uncertainty_min_pixels: int = Field(
        16, ge=1, validation_alias=_env("UNCERTAINTY_MIN_PIXELS", "uncertainty_min_pixels")
    )
    # Suggested region (strategies.region, after Atzeni et al.): only on tiles with a side longer than
    # SUGGEST_MIN_TILE pixels and at most SUGGEST_MAX_PIXELS pixels; a SUGGEST_WINDOW-pixel square searched with
    # SUGGEST_STRIDE (0 = a quarter of the window); SUGGEST_REGION_COST is the fixed effort of one region, in pixel
    # edges of boundary to trace.
    suggest_min_tile: int = Field(384, ge=1, validation_alias=_env("SUGGEST_MIN_TILE", "suggest_min_tile"))
    suggest_window: int = Field(256, ge=8, validation_alias=_env("SUGGEST_WINDOW", "suggest_window"))
    suggest_stride: int = Field(0, ge=0, validation_alias=_env("SUGGEST_STRIDE", "suggest_stride"))
    suggest_region_cost: float = Field(64.0, ge=0, validation_alias=_env("SUGGEST_REGION_COST", "suggest_region_cost"))
    suggest_max_pixels: int = Field(
        4096 * 4096, ge=1, validation_alias=_env("SUGGEST_MAX_PIXELS", "suggest_max_pixels")
    )
    # Status page (GET /status): how long it waits for Label Studio's task counts before rendering without them,
    # and how many recent per-task /predict errors it keeps per project (in each worker process).
    status_ls_timeout_s: float = Field(3.0, gt=0, validation_alias=_env("STATUS_LS_TIMEOUT_S", "status_ls_timeout_s"))
    status_errors_kept: int = Field(50, ge=1, validation_alias=_env("STATUS_ERRORS_KEPT", "status_errors_kept"))
    # Public URL of this backend as Label Studio's users reach it, for the status link in the project description
    # (the set-up command falls back to its --backend-url).
    public_url: str = Field("", validation_alias=_env("BACKEND_PUBLIC_URL", "public_url"))

    # Issue 11: stack-aware selection, audit split + promotion gate, cold start (ml_backend.active_learning.plan,
    # .audit, ml_backend.jobs.pretrain). BATCH_DIVERSITY: the next TRAIN_BATCH_SIZE tasks of the queue hold no
    # near-duplicates (same stack, overlapping xy within DIVERSITY_Z_RADIUS slices, or closer than
    # DIVERSITY_FEATURE_RADIUS x the pool's median embedding distance); DIVERSITY_METHOD picks them
    # (top | stochastic | weighted_kmeans | typiclust | auto, strategies.batch). "top" (the strategy's order with
    # the exclusions) and a radius of 3 are the defaults because the benchmark measured them best over both data kinds
    # (VNC +8.5%, generated isotropic volume +0.5% vs random over rounds 1-5, 3 seeds; a measured radius, "auto",
    # and softrank draws, "stochastic", were not ahead on both; benchmarks/stack_aware.md).
    batch_diversity: bool = Field(True, validation_alias=_env("BATCH_DIVERSITY", "batch_diversity"))
    diversity_z_radius: int | Literal["auto"] = Field(
        3, validation_alias=_env("DIVERSITY_Z_RADIUS", "diversity_z_radius")
    )
    diversity_feature_radius: float = Field(
        0.05, ge=0, validation_alias=_env("DIVERSITY_FEATURE_RADIUS", "diversity_feature_radius")
    )
    diversity_method: str = Field("top", validation_alias=_env("DIVERSITY_METHOD", "diversity_method"))
    # Issue 17's hedges (strategies.batch.hedged_share): SELECTION_RANDOM_SHARE of every batch is a seeded uniform
    # draw among the allowed tiles instead of the strategy's picks; the whole batch is while fewer than
    # UNCERTAINTY_FROM_LABELS tasks are labelled (a budget switch). Defaults: benchmarks/label_efficiency/RULE.md.
    selection_random_share: float = Field(
        0.5, ge=0, le=1, validation_alias=_env("SELECTION_RANDOM_SHARE", "selection_random_share")
    )
    uncertainty_from_labels: int = Field(
        60, ge=0, validation_alias=_env("UNCERTAINTY_FROM_LABELS", "uncertainty_from_labels")
    )
    # Audit split: a fixed random AUDIT_FRACTION of the tasks (hash of the task id), served one in every
    # round(1 / AUDIT_FRACTION) queue places, never trained on; every new version is measured on its annotated tiles
    # and promoted only if its audit IoU is at most PROMOTION_TOLERANCE below the live version's (with at least
    # AUDIT_MIN_TILES annotated audit tiles; fewer: promoted, reason "not enough audit tiles"). 0 disables.
    audit_fraction: float = Field(0.1, ge=0, lt=1, validation_alias=_env("AUDIT_FRACTION", "audit_fraction"))
    audit_min_tiles: int = Field(4, ge=1, validation_alias=_env("AUDIT_MIN_TILES", "audit_min_tiles"))
    promotion_tolerance: float = Field(0.02, ge=0, validation_alias=_env("PROMOTION_TOLERANCE", "promotion_tolerance"))
    # Cold start: self-supervised pretraining on the project's unlabelled tiles after an import (an RQ job, bounded
    # and resumable), then the first queue ordered for coverage in its feature space; the first training starts
    # from the pretrained weights.
    pretrain: bool = Field(False, validation_alias=_env("PRETRAIN", "pretrain"))
    pretrain_steps: int = Field(600, ge=0, validation_alias=_env("PRETRAIN_STEPS", "pretrain_steps"))
    pretrain_time_budget_s: float = Field(
        180.0, gt=0, validation_alias=_env("PRETRAIN_TIME_BUDGET_S", "pretrain_time_budget_s")
    )
    pretrain_tiles: int = Field(256, ge=1, validation_alias=_env("PRETRAIN_TILES", "pretrain_tiles"))
    pretrain_crop: int = Field(64, ge=8, validation_alias=_env("PRETRAIN_CROP", "pretrain_crop"))
    # Issue 18: once a training waits for the cold start (a batch was labelled from the spread queue), pretraining
    # stops after running at least this long: the first version sooner rather than more pretraining.
    pretrain_yield_after_s: float = Field(
        60.0, ge=0, validation_alias=_env("PRETRAIN_YIELD_AFTER_S", "pretrain_yield_after_s")
    )
    # Issue 18: the cold start's coverage order embeds at most this many tiles, spread over the stack (the first
    # ones of the position-spread order); the rest keep that spread order behind them. Bounds the cold start's cost
    # whatever the stack's size.
    coldstart_embed_tiles: int = Field(
        512, ge=1, validation_alias=_env("COLDSTART_EMBED_TILES", "coldstart_embed_tiles")
    )
    # Issue 17: semi-supervised fine-tuning on the project's unlabelled tiles (ml_backend.training.semi: FixMatch
    # pseudo-labels from the EMA teacher, Sohn et al. 2020 / Tarvainen & Valpola 2017). Every training step also
    # draws SEMI_UNLABELLED_BATCH crops of a seeded sample of SEMI_UNLABELLED_TILES unlabelled tasks (audit tasks
    # left out); pixels the teacher predicts with probability >= SEMI_THRESHOLD train the student on a strongly
    # augmented view, weight SEMI_WEIGHT (ramped up). Off until the benchmark's default+semi arm decides it.
    semi_supervised: bool = Field(False, validation_alias=_env("SEMI_SUPERVISED", "semi_supervised"))
    semi_threshold: float = Field(0.95, gt=0, le=1, validation_alias=_env("SEMI_THRESHOLD", "semi_threshold"))
    semi_weight: float = Field(1.0, ge=0, validation_alias=_env("SEMI_WEIGHT", "semi_weight"))
    semi_unlabelled_batch: int = Field(8, ge=1, validation_alias=_env("SEMI_UNLABELLED_BATCH", "semi_unlabelled_batch"))
    semi_unlabelled_tiles: int = Field(
        256, ge=1, validation_alias=_env("SEMI_UNLABELLED_TILES", "semi_unlabelled_tiles")
    )
    # Issue 21: whole-stack export (ml_backend.export, `ml-backend export`). EXPORT_CHUNK_SLICES: slices per chunk
    # (the unit of resumption, of an RQ chunk job and of in-memory labelling: memory grows with it, not with the
    # stack); EXPORT_MIN_VOXELS: 3-D objects smaller than this are left out of the object tables and label volume;
    # EXPORT_TIFF_MAX_BYTES: with --format auto, a segmentation larger than this is written as OME-Zarr, not TIFF.
    export_chunk_slices: int = Field(16, ge=1, validation_alias=_env("EXPORT_CHUNK_SLICES", "export_chunk_slices"))
    export_min_voxels: int = Field(64, ge=1, validation_alias=_env("EXPORT_MIN_VOXELS", "export_min_voxels"))
    export_tiff_max_bytes: int = Field(
        4 * 1024**3, ge=1, validation_alias=_env("EXPORT_TIFF_MAX_BYTES", "export_tiff_max_bytes")
    )

    @field_validator("diversity_method")
    @classmethod
    def _diversity_method(cls, value: str) -> str:
        if value not in DIVERSITY_METHODS:
            raise ValueError(f"expected one of {', '.join(DIVERSITY_METHODS)}, got {value!r}")
        return value

    @field_validator("diversity_z_radius")
    @classmethod
    def _diversity_z_radius(cls, value: int | str) -> int | str:
        if value != "auto" and int(value) < -1:
            raise ValueError(f"expected an integer >= -1 or 'auto', got {value!r}")
        return value

    @field_validator("context_offsets")
    @classmethod
    def _context_offsets(cls, value: str) -> str:
        return ",".join(str(o) for o in parse_offsets(str(value)))

    @property
    def context_offset_list(self) -> tuple[int, ...]:
        """CONTEXT_OFFSETS as integers (validated: distinct, holding 0)."""
        return parse_offsets(self.context_offsets)

    @field_validator("uncertainty_thresholds")
    @classmethod
    def _thresholds(cls, value: str) -> str:
        try:
            levels = [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"expected comma-separated numbers, got {value!r}") from None
        if not levels or any(not 0.0 < t <= 1.0 for t in levels) or levels != sorted(set(levels)):
            raise ValueError(f"expected strictly increasing thresholds in (0, 1], got {value!r}")
        return value

    @property
    def uncertainty_levels(self) -> tuple[float, ...]:
        """UNCERTAINTY_THRESHOLDS as numbers."""
        return tuple(float(v) for v in self.uncertainty_thresholds.split(",") if v.strip())

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError(
                "BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together (a user without a password would turn "
                "basic auth on with an empty password)"
            )
        if self.tile_overlap >= self.tile_size:
            raise ValueError(f"TILE_OVERLAP={self.tile_overlap} must be less than TILE_SIZE={self.tile_size}")
        return self

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from the environment, ``overrides`` (field names) winning; ConfigError names what is wrong."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            problems = "; ".join(
                f"{_variable(err['loc'])}: {err['msg']}" if err["loc"] else err["msg"] for err in exc.errors()
            )
            raise ConfigError(f"invalid configuration: {problems}") from None

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (field names), validated like the original."""
        return type(self).from_env(**{**self.model_dump(), **changes})

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        return (self.basic_auth_user, self.basic_auth_pass) if self.basic_auth_user else None

    @staticmethod
    def documented() -> list[tuple[str, str]]:
        """(environment variable, default) pairs, for the README table."""
        return [(_variable((name,)), str(f.default)) for name, f in Settings.model_fields.items()]


def _variable(loc: tuple) -> str:
    field = Settings.model_fields.get(str(loc[0])) if loc else None
    alias = getattr(field, "validation_alias", None) if field else None
    choices = getattr(alias, "choices", None)
    return str(choices[0]) if choices else str(loc[0] if loc else "")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()


def torch_device(preference: str = "auto"):
    """CUDA when present (or asked for), CPU otherwise."""
    import torch

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)
