"""The training recipe: which model a round starts from, how it is fine-tuned, and its bootstrap ensemble.

One place for both callers: the product builds its ``TrainConfig`` from Settings (``train_config``) and starts from
the project's current version (``initial_model``); the benchmark builds its own configs from its protocol and carries
the model from round to round. Both then call ``train_model``, so the published learning curves measure the
product's training, not a copy of it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ml_backend.config import Settings
from ml_backend.data.context import model_offsets
from ml_backend.model import build_model
from ml_backend.strategies import bootstrap_indices
from ml_backend.training.semi import SemiConfig
from ml_backend.training.trainer import TrainConfig, batchnorm_layers, fine_tune

log = logging.getLogger(__name__)

ENSEMBLE_MEMBERS = 4  # suggestive annotation (Yang et al. 2017) uses 4 bootstrap members


@dataclass
class ModelState:
    """The model a round starts from, where it came from (parent version) and how it was obtained."""

    model: Any
    parent: str | None = None
    how: str = "from scratch"  # "fine-tuned" | "from scratch" | "kept" (not trained again this round)
    ensemble: list[Any] = field(default_factory=list)  # stored bootstrap members (valid only while not retrained)


@dataclass(frozen=True)
class EnsembleSpec:
    """How the bootstrap members of suggestive annotation are trained (resamples, steps, seeds, config changes).

    The product derives it from its round's TrainConfig (``EnsembleSpec.from_train_config``); the benchmark states it
    in its protocol. ``member_seeds[i]`` seeds member i's fine-tuning; ``bootstrap_seed`` draws the resamples; each
    member trains with ``base`` (None: the round's TrainConfig) with ``steps`` and its seed replaced.
    """

    members: int
    steps: int
    bootstrap_seed: int
    member_seeds: tuple[int, ...]
    base: Any = None  # training.TrainConfig

    @classmethod
    def from_train_config(cls, tcfg: Any, members: int = ENSEMBLE_MEMBERS) -> EnsembleSpec:
        """The product's rule: a quarter of the round's steps (>= 10), seeds following the round's seed."""
        seeds = tuple(tcfg.seed + i + 1 for i in range(members))
        return cls(members, max(10, tcfg.steps // 4), tcfg.seed, seeds, base=tcfg)


@dataclass
class TrainedModel:
    """What one training step produced: the model, its bootstrap members, the fine-tune result and timings."""

    state: ModelState
    ensemble: list[Any] = field(default_factory=list)
    result: Any = None  # training.TrainResult, None when the model was kept as it was
    train_config: Any = None
    seconds: float = 0.0
    calibration_images: list[np.ndarray] | None = None  # BatchNorm re-estimation crops, reused by the members
    ensemble_seconds: float = 0.0

    @property
    def model(self) -> Any:
        return self.state.model


def semi_config(settings: Settings) -> Any:
    """The semi-supervised term from Settings (SEMI_SUPERVISED, SEMI_THRESHOLD, SEMI_WEIGHT, SEMI_UNLABELLED_BATCH)."""
    return SemiConfig(
        enabled=settings.semi_supervised,
        threshold=settings.semi_threshold,
        weight=settings.semi_weight,
        unlabelled_batch=settings.semi_unlabelled_batch,
    )


def train_config(settings: Settings, **overrides: Any):
    """The product's fine-tuning recipe from Settings (papers' lr 5e-4, time budget, seed, semi-supervised term)."""
    values = {
        "steps": settings.train_steps,
        "lr": settings.learning_rate,
        "crop": settings.train_crop,
        "val_fraction": settings.val_fraction,
        "time_budget_s": settings.train_time_budget_s,
        "seed": settings.seed,
        "device": settings.device,
        "semi": semi_config(settings),
    }
    values.update(overrides)
    return TrainConfig(**values)


def new_model(settings: Settings, num_classes: int) -> Any:
    """A fresh U-Net whose initial weights depend on SEED only (not on earlier use of the global RNG); one input
    channel per CONTEXT_OFFSETS slice (the offsets are recorded in its hparams, hence in its checkpoints)."""
    import torch

    offsets = settings.context_offset_list
    context = {} if offsets == (0,) else {"context_offsets": list(offsets)}  # 2-D: hparams as before
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return build_model(
            "unet",
            in_channels=len(offsets),
            num_classes=num_classes,
            width=settings.model_width,
            depth=settings.model_depth,
            dropout=settings.model_dropout,
            norm=settings.model_norm,
            **context,
        )


def initial_model(registry: Any, config: Any, settings: Settings) -> tuple[Any, str | None, str]:
    """(model, parent version, how): the current version to fine-tune, or a new U-Net when there is none, its
    classes no longer match the label config, or its input slices no longer match CONTEXT_OFFSETS."""
    current = registry.load_current()
    if current is not None:
        model, meta = current
        hp = getattr(model, "hparams", {})
        offsets = settings.context_offset_list
        same_classes = int(hp.get("num_classes", -1)) == config.num_classes
        same_input = int(hp.get("in_channels", 1)) == len(offsets) and model_offsets(model) == offsets
        if same_classes and same_input:
            return model, meta["version"], "fine-tuned"
        log.warning(
            "project %s: current %s predicts %s classes from slices %s, label config has %d classes and "
            "CONTEXT_OFFSETS %s: training a new model from scratch",
            registry.project_id, meta["version"], hp.get("num_classes"), list(model_offsets(model)),
            config.num_classes, list(offsets),
        )  # fmt: skip
    return new_model(settings, config.num_classes), None, "from scratch"


def first_steps(settings: Settings) -> int:
    """Steps of a project's first version: TRAIN_STEPS x INITIAL_TRAIN_FACTOR."""
    return max(1, round(settings.train_steps * settings.initial_train_factor))


def first_version_overrides(settings: Settings) -> dict[str, Any]:
    """A first version's recipe: TRAIN_STEPS x INITIAL_TRAIN_FACTOR steps at INITIAL_LEARNING_RATE, stopped by
    FIRST_VERSION_TIME_BUDGET_S (or TRAIN_TIME_BUDGET_S if shorter) with the schedule annealed by the clock."""
    budget = min(settings.first_version_time_budget_s, settings.train_time_budget_s)
    return {"lr": settings.initial_learning_rate, "steps": first_steps(settings), "time_budget_s": budget,
            "anneal_by_time": True}  # fmt: skip


def product_train_config(settings: Settings, parent: str | None, overrides: dict | None = None):
    """The round's TrainConfig: the from-scratch recipe for a first version (``first_version_overrides``), the
    fine-tuning one after."""
    first = first_version_overrides(settings) if parent is None else {}
    return train_config(settings, **{**first, **(overrides or {})})


def train_ensemble(
    model: Any,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    spec: EnsembleSpec | Any,
    calibration_images: list[np.ndarray] | None = None,
) -> list[Any]:
    """Bootstrap members for suggestive annotation: copies of the trained model, briefly fine-tuned on resamples.

    ``spec`` is an EnsembleSpec, or a TrainConfig (the product's rule: ``EnsembleSpec.from_train_config``). Members
    train supervised only: they measure disagreement on resamples of the labels, and are a quarter as long.
    """
    if not isinstance(spec, EnsembleSpec):
        spec = dataclasses.replace(EnsembleSpec.from_train_config(spec), base=spec)
    if spec.base is None:
        raise ValueError("EnsembleSpec.base: the TrainConfig the members start from is missing")
    members = []
    for i, idx in enumerate(bootstrap_indices(len(images), spec.members, seed=spec.bootstrap_seed)):
        member = copy.deepcopy(model)
        cfg = dataclasses.replace(spec.base, steps=spec.steps, seed=spec.member_seeds[i])
        cfg = dataclasses.replace(cfg, semi=dataclasses.replace(cfg.semi, enabled=False))
        fine_tune(member, [images[j] for j in idx], [masks[j] for j in idx], cfg, calibration_images=calibration_images)
        members.append(member.eval())
    return members


def train_model(
    state: ModelState,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    tcfg: Any,
    *,
    calibration: Callable[[], list[np.ndarray] | None] | None = None,
    progress: Callable[[dict], None] | None = None,
    unlabelled: Callable[[], list[np.ndarray] | None] | None = None,
) -> TrainedModel:
    """Fine-tune ``state.model`` in place (``tcfg`` None: keep it as it is).

    ``calibration()`` returns unlabelled crops that re-estimate BatchNorm statistics; it is called only for a model
    that has BatchNorm layers (the product fetches those images for nothing otherwise), once per round: the
    bootstrap members (``add_ensemble``) reuse them. ``unlabelled()`` returns the unlabelled pool's tiles for the
    semi-supervised term (``training.semi``); it is called only when ``tcfg.semi`` is enabled.
    """
    t0 = time.monotonic()
    needs_cal = calibration is not None and bool(batchnorm_layers(state.model))
    calibration_images = calibration() if needs_cal else None
    result = None
    if tcfg is not None:
        semi = getattr(tcfg, "semi", None)
        pool = unlabelled() if unlabelled is not None and semi is not None and semi.active else None
        result = fine_tune(
            state.model, list(images), list(masks), tcfg, progress=progress, calibration_images=calibration_images,
            unlabelled_images=pool,
        )  # fmt: skip
    members = list(state.ensemble) if tcfg is None else []  # retraining invalidates the stored members
    return TrainedModel(state, members, result, tcfg, time.monotonic() - t0, calibration_images=calibration_images)


def add_ensemble(
    trained: TrainedModel, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], spec: EnsembleSpec
) -> TrainedModel:
    """Train the bootstrap members of ``trained`` (suggestive annotation) with ``spec`` (base: the round's config)."""
    t0 = time.monotonic()
    spec = spec if spec.base is not None else dataclasses.replace(spec, base=trained.train_config)
    trained.ensemble = train_ensemble(trained.model, images, masks, spec, trained.calibration_images)
    trained.ensemble_seconds = time.monotonic() - t0
    trained.seconds += trained.ensemble_seconds
    return trained
