"""The product's round plan: what ``run_round`` does for a project, from Settings (recipe, seeds, scoring) and the
project's current version (the model to fine-tune)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ml_backend.active_learning.round import RoundPlan
from ml_backend.config import Settings, torch_device
from ml_backend.inference.scoring import ScoringConfig
from ml_backend.training.recipe import EnsembleSpec, ModelState, initial_model, product_train_config

log = logging.getLogger(__name__)


def product_plan(
    registry: Any,  # store: the project's ModelRegistry (its current version is fine-tuned)
    config: Any,
    settings: Settings,
    strategy: Any,
    *,
    train_overrides: dict | None = None,
    calibration: Callable[[], list[np.ndarray]] | None = None,
    progress: Callable[[dict], None] | None = None,
    score: bool = True,
) -> RoundPlan:
    """The product's round: fine-tune the current version (or a new U-Net), Settings' recipe and seeds."""
    model, parent, how = initial_model(registry, config, settings)
    tcfg = product_train_config(settings, parent, train_overrides)
    return RoundPlan(
        strategy,
        ModelState(model, parent, how),
        train=tcfg,
        ensemble=EnsembleSpec.from_train_config(tcfg),
        calibration=calibration,
        progress=progress,
        scoring=ScoringConfig.from_settings(settings),
        score_seed=settings.seed,
        select_seed=settings.seed,
        score=score,
    )


def log_plan(registry: Any, plan: RoundPlan, n_tiles: int) -> None:
    tcfg = plan.train
    log.info(
        "project %s: training (%s, parent %s) on %d tiles, %d steps, lr %g, budget %.0f s, device %s",
        registry.project_id, plan.model.how, plan.model.parent, n_tiles, tcfg.steps, tcfg.lr, tcfg.time_budget_s,
        torch_device(tcfg.device),
    )  # fmt: skip
