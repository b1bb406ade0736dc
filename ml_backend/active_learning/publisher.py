"""Publishing a round's model into the project's registry (the product's ``Publisher`` of ``run_round``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ml_backend.active_learning.round import Evaluation, LabelledSet
from ml_backend.config import Settings
from ml_backend.store.registry import ModelRegistry
from ml_backend.training.recipe import TrainedModel


@dataclass
class RegistryPublisher:
    """The product's publisher: the version goes into the project's registry with its full metadata (and bootstrap
    members), is promoted unless the evaluation says otherwise, and old versions are pruned."""

    registry: ModelRegistry
    config: Any
    settings: Settings
    strategy: Any = None
    extra_meta: dict | None = None
    announce: Callable[[str, dict], None] | None = None  # called with (version, meta) once published
    meta: dict = field(default_factory=dict)  # the published version's metadata, after ``publish``

    def publish(self, trained: TrainedModel, labelled: LabelledSet, evaluation: Evaluation) -> str:
        result, model, tiles = trained.result, trained.model, labelled.tiles
        strategy, config = self.strategy, self.config
        meta = {
            "parent": trained.state.parent,
            "initialised": trained.state.how,
            "device": result.device,
            "n_annotations": len(tiles),
            "annotation_ids": [t.annotation_id for t in tiles],
            "task_ids": [t.task_id for t in tiles],
            "metrics": result.metrics,
            "n_train": result.n_train,
            "n_val": result.n_val,
            "steps": result.steps,
            "training_seconds": round(trained.seconds, 3),
            "fine_tune_seconds": round(result.seconds, 3),
            "strategy": None if strategy is None else {"name": strategy.name, "params": strategy.params()},
            "hyper_parameters": {"train": trained.train_config.to_dict(), "model": dict(getattr(model, "hparams", {}))},
            "label_config": {"mode": config.mode, "labels": list(config.labels), "from_name": config.from_name},
            **({"evaluation": evaluation.metrics} if evaluation.metrics else {}),
            **(evaluation.meta or {}),  # issue 11: meta["audit"], meta["promotion"] (read by the status page)
            **(self.extra_meta or {}),
        }
        extras = {f"ensemble_{i}": m for i, m in enumerate(trained.ensemble)}
        version = self.registry.publish(model, meta, promote=evaluation.promote, extra_models=extras)
        self.registry.prune(self.settings.keep_versions)
        self.meta = self.registry.meta(version)
        if self.announce is not None and evaluation.promote:  # an unpromoted version does not serve: nothing to show
            self.announce(version, self.meta)
        return version


@dataclass
class KeepVersion:
    """Publisher of a round that re-delivers an already published version (nothing trained)."""

    version: str
    meta: dict
    announce: Callable[[str, dict], None] | None = None

    def publish(self, trained: TrainedModel, labelled: LabelledSet, evaluation: Evaluation) -> str:
        if self.announce is not None:
            self.announce(self.version, self.meta)
        return self.version
