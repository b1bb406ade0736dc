"""Simulated active learning: the product's round (``active_learning.run_round``) with a ground-truth oracle.

Protocol (Roels & Saeys 2019): train an initial model on m random pool tiles; then for T rounds let the strategy pick
k tiles from the unlabelled pool, "annotate" them with the ground truth (the oracle), fine-tune from the previous
round's weights and measure IoU/Dice on the whole test region (tiled inference). Full supervision (every pool tile
labelled) is the upper reference.

Where the product plugs in Label Studio, the benchmark plugs in ``OracleLabels`` (labels), ``KeepInMemory``
(versions), ``LocalScorer`` (the pool, scored in process by ``inference.scoring``) and ``NextBatch`` (the picked
tiles). The rounds are ``active_learning.loop.ActiveLoop`` (with the seeds of ``SeedSchedule``): one call of
``run_round`` trains round r, measures it on the test region (the evaluator) and picks the tiles of round r + 1, so
the order of operations on the model is the same as in the product.

Arms: a strategy name, optionally with a selector suffix (issue 11): ``entropy`` is the strategy's plain top-k
(``TopK``), ``entropy+stack`` wraps it in ``selection.StackAware`` with the score ranking kept and the stack/feature
exclusions applied (method "top"), ``entropy+div`` lets ``strategies.batch`` choose the batch (TypiClust while labels
are few, Hacohen et al. 2022; uncertainty-weighted k-means after, Zhdanov 2019), ``entropy+wkm`` is the product's
default (uncertainty-weighted k-means with the exclusions, labelled embeddings included). The pretraining and
first-batch ablations are protocol fields (``pretrain_steps``, ``first_batch``): they change the shared initial model.
``default`` is the product as it ships (issue 17, ``default_arm``): strategy, batch diversity, cold start
(pretraining, coverage-ordered first batch), training recipe and semi-supervised switch from ``Settings``, the sizes
scaled by the preset. A ``+semi`` suffix on any arm (``random+semi``, ``default+semi``, ``entropy+stack+semi``)
trains with the product's semi-supervised term on the pool's unlabelled tiles (``training.semi``). An arm whose
protocol differs from the run's (``default``, ``+semi``) trains its own initial model (``initial/<arm tag>/``): the
cold start is part of what it measures.

Fairness and reproducibility: for every seed, the pool, the initial labelled set and the initial model are shared by
all strategies (the initial model is trained once per seed and cached); round r of every strategy trains with the
same training seed. Each (strategy, seed) run is saved as a JSON file when it finishes, so an interrupted benchmark
resumes where it stopped. Runs execute in worker processes with one torch thread each (deterministic on a machine).
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.active_learning import (
    Evaluation,
    LabelledSet,
    LabelledTile,
    RoundOutcome,
    RoundPlan,
    ScoredPool,
    TopK,
)
from ml_backend.active_learning.audit import Confusion, compare, summarise
from ml_backend.active_learning.candidates import CandidateSampler, best_candidates
from ml_backend.active_learning.effort import edit_effort
from ml_backend.active_learning.loop import ActiveLoop, RoundHooks, SeedSchedule
from ml_backend.active_learning.selection import StackAware
from ml_backend.benchmarks.data import Dataset, dataset_for
from ml_backend.benchmarks.protocol import SCORING_ONLY_FIELDS, Protocol, train_config
from ml_backend.benchmarks.report import write_json
from ml_backend.config import Settings, torch_device
from ml_backend.inference.scoring import ScoringConfig, embed_images, score_images
from ml_backend.inference.tiling import predict_tiled
from ml_backend.model import build_model, load_checkpoint, save_checkpoint
from ml_backend.strategies import available_strategies
from ml_backend.strategies.base import strategy_params_model
from ml_backend.strategies.batch import BatchConfig, Neighbourhood, coverage_order, thumbnail
from ml_backend.strategies.resolve import resolve_strategy
from ml_backend.training.metrics import boundary_length, confusion_counts, dice_from_counts, iou_from_counts
from ml_backend.training.pretrain import PretrainConfig, pretrain
from ml_backend.training.recipe import EnsembleSpec, ModelState, TrainedModel, first_steps, train_model

log = logging.getLogger("al_benchmark")

POOL_BATCH = 16  # pool tiles per forward pass (the MC-dropout seeds depend on it: part of the protocol's numbers)
EMBED_BATCH = 32


# ------------------------------------------------------------------------------------------------ the plug-ins


@dataclass
class OracleLabels:
    """The label source of the benchmark: ground truth for the tiles selected so far, in selection order (``masks``:
    the annotations of tiles labelled otherwise, e.g. only inside a suggested region; the rest: the ground truth)."""

    ds: Dataset
    labelled_ids: list[int]
    masks: dict[int, np.ndarray] = field(default_factory=dict)

    def labelled(self) -> LabelledSet:
        tiles = [
            LabelledTile(i, None, self.ds.pool_images[i], self.masks[i] if i in self.masks else self.ds.pool_masks[i])
            for i in self.labelled_ids
        ]
        return LabelledSet(tiles)

    def unlabelled(self) -> list[int]:
        return sorted(set(range(len(self.ds.pool_images))) - set(self.labelled_ids))

    def annotate(self, ids: list[int], outcome: RoundOutcome | None = None) -> None:
        """The oracle labels the picked tiles (their whole ground truth)."""
        self.labelled_ids = self.labelled_ids + list(ids)


@dataclass
class LocalScorer:
    """Scores pool tiles in this process with the product's scoring pipeline (no masks needed); ``embed``: also the
    bottleneck embeddings (``summary["embedding"]``) that stack-aware diversity reads, when the strategy has none."""

    images: np.ndarray
    cfg: ScoringConfig
    embed: bool = False

    def score(self, trained: TrainedModel, version: str, strategy: Any, ids: list[int], seed: int) -> ScoredPool:
        imgs = [self.images[i] for i in ids]
        scores = score_images(trained.model, imgs, strategy, self.cfg, ensemble=trained.ensemble or None, seed=seed)
        if self.embed and "embedding" not in scores.summary:
            dev = torch_device(self.cfg.device)
            scores.summary["embedding"] = embed_images(trained.model, imgs, dev, batch_size=EMBED_BATCH)
        if self.embed and "thumbnail" not in scores.summary:
            scores.summary["thumbnail"] = np.stack([thumbnail(im) for im in imgs])
        return ScoredPool(list(ids), scores)


# ------------------------------------------------------------------------------------------------ helpers


def _log_progress(tag: str):
    """fine_tune progress callback: one log line per 100 steps (long CPU runs must show they are alive)."""

    def cb(d: dict) -> None:
        if d["step"] % 100 == 0 and d["step"] < d["steps"]:
            val = d.get("val_iou")
            log.info("%s: step %d/%d loss %.3f val IoU %s", tag, d["step"], d["steps"], d["loss"] or 0.0, val)

    return cb


def calibration(ds: Dataset, p: Protocol) -> list[np.ndarray] | None:
    """The unlabelled images BatchNorm statistics are re-estimated on after each training (the product does the
    same with a sample of the project's tasks)."""
    if p.bn_calibration == "pool":
        n = len(ds.pool_images)
        if 0 < p.bn_calibration_tiles < n:  # the product's rule: a seeded sample of BN_CALIBRATION_TILES tiles
            return [
                ds.pool_images[i]
                for i in sorted(np.random.default_rng([0, 7]).permutation(n)[: p.bn_calibration_tiles])
            ]
        return list(ds.pool_images)
    if p.bn_calibration == "none":
        return None
    raise ValueError(f"bn_calibration must be 'pool' or 'none', got {p.bn_calibration!r}")


def evaluate_test(model, ds: Dataset, p: Protocol) -> dict[str, float]:
    """IoU / Dice over all pixels of the test slices (tiled inference, counts summed over slices)."""
    tp = fp = fn = pixels = 0
    dev = torch_device(p.device)
    for img, msk in zip(ds.test_images, ds.test_masks, strict=True):
        probs = predict_tiled(model, img, tile=p.infer_tile, overlap=p.infer_overlap, device=dev)
        a, b, c = confusion_counts(probs.argmax(axis=0), msk, ignore=None)
        tp, fp, fn, pixels = tp + a, fp + b, fn + c, pixels + msk.size
    # Precision, recall and the predicted foreground fraction (against the true one) tell a model that over-segments
    # after a foreground-heavy batch (a class-prior shift) from one that misses objects (issue 11's diagnosis).
    return {
        "iou": iou_from_counts(tp, fp, fn),
        "dice": dice_from_counts(tp, fp, fn),
        "precision": tp / max(1, tp + fp),
        "recall": tp / max(1, tp + fn),
        "predicted_foreground": (tp + fp) / max(1, pixels),
        "true_foreground": (tp + fn) / max(1, pixels),
    }


def _fresh_model(p: Protocol, seed: int):
    import torch

    torch.manual_seed(seed)
    offsets = [int(o) for o in (p.context_offsets or [0])]
    context = {} if offsets == [0] else {"in_channels": len(offsets), "context_offsets": offsets}  # 2.5D context
    return build_model("unet", width=p.width, depth=p.depth, dropout=p.dropout, norm=p.norm, **context)


def initial_labelled(ds: Dataset, p: Protocol, seed: int, embeddings: np.ndarray | None = None) -> list[int]:
    """The m initial tiles: random (the papers' protocol), or ordered for coverage on ``embeddings`` (issue 11)."""
    if p.first_batch == "random":
        rng = np.random.default_rng([seed, 2])
        return sorted(rng.permutation(len(ds.pool_images))[: p.m].tolist())

    if embeddings is None:
        raise ValueError(f"first_batch {p.first_batch!r} needs the initial network's embeddings")
    method = {"coverage": "typiclust", "kcenter": "kcenter", "spread": "random"}.get(p.first_batch)
    if method is None:
        raise ValueError(f"first_batch must be random, coverage, kcenter or spread, got {p.first_batch!r}")
    thumbs = None
    if p.z_radius == "auto":  # measured on the pool's thumbnails, as the product's cold start does
        thumbs = np.stack([thumbnail(im) for im in ds.pool_images])
    order = coverage_order(
        embeddings, stack_positions(ds, p), p.m, config=batch_config(p, "top"), seed=seed, method=method,
        z_features=thumbs,
    )  # fmt: skip
    return sorted(order[: p.m].tolist())


def stack_positions(ds: Dataset, p: Protocol, idx: Any = None) -> np.ndarray:
    """(n, 5) [stack, z, y, x, size] of pool tiles ``idx`` (all when None): one stack, square tiles."""
    pos = ds.pool_positions if idx is None else ds.pool_positions[np.asarray(idx, dtype=np.int64)]
    pos = np.asarray(pos, dtype=np.int64).reshape(-1, 3)
    return np.column_stack([np.zeros(len(pos), np.int64), pos, np.full(len(pos), p.tile, np.int64)])


def batch_config(p: Protocol, method: str):
    return BatchConfig(
        neighbourhood=Neighbourhood(z_radius=p.z_radius),
        method=method,
        feature_radius=p.feature_radius,
        random_share=p.random_share,
        uncertainty_from_labels=p.uncertainty_from_labels,
    )


# "<strategy>+<suffix>": StackAware with this batch method and z radius (None: the protocol's ``z_radius``).
# "wkm" is the product's former default (DIVERSITY_METHOD weighted_kmeans) and, like the product, also feeds the
# labelled tiles' embeddings. "astack" / "softrank": the z radius measured on the pool (strategies.batch
# .estimate_z_radius); "softrank" draws the batch (Kirsch et al. 2023) instead of taking the ranking's top.
ARM_SELECTORS: dict[str, tuple[str, int | str | None]] = {
    "stack": ("top", None),
    "div": ("auto", None),
    "wkm": ("weighted_kmeans", None),
    "astack": ("top", "auto"),
    "softrank": ("stochastic", "auto"),
}


def parse_arm(arm: str) -> tuple[str, str | None]:
    """ "entropy+stack" -> ("entropy", "top"); "entropy" -> ("entropy", None) (plain TopK); "+semi" is not a selector
    ("entropy+stack+semi" -> ("entropy", "top")); "default" -> ("default", None): see ``resolve_arm``."""
    base, *mods = arm.split("+")
    selectors = [m for m in mods if m != "semi"]
    if len(selectors) > 1 or len(mods) != len(set(mods)):
        raise ValueError(f"arm {arm!r}: at most one selector suffix and one '+semi'")
    if not selectors:
        return base, None
    if selectors[0] not in ARM_SELECTORS:
        raise ValueError(
            f"unknown selector suffix {selectors[0]!r} in {arm!r}; expected one of {sorted(ARM_SELECTORS)} or 'semi'"
        )
    return base, ARM_SELECTORS[selectors[0]][0]


def _selector_suffix(arm: str) -> str:
    return next(m for m in arm.split("+")[1:] if m != "semi")


@dataclass(frozen=True)
class Arm:
    """What one arm runs: the strategy, its selector, and the protocol fields it changes (``overrides``; an arm with
    overrides trains its own initial model). Resolved once in the main process and handed to the workers, so
    ``default`` means the Settings of the command that started the benchmark (stored in ``arms.json``)."""

    name: str
    strategy: str
    strategy_params: dict = field(default_factory=dict)
    selector: str | None = None  # batch method of selection.StackAware; None: the strategy's plain top-k
    z_radius: int | str | None = None  # the selector's z radius; None: the protocol's
    labelled_embeddings: bool = False  # the selector's feature rule also runs against the labelled tiles
    overrides: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> Arm:
        return cls(**d)


DEFAULT_ARM = "default"

# Issue 17's candidate defaults: "default@<lever>" is the product's Settings with these values (absolute, so an arm
# keeps its meaning when the defaults change). The rule that chooses among them, written before the runs that judge
# them: benchmarks/label_efficiency/RULE.md.
LEVERS: dict[str, dict[str, Any]] = {
    # Budget switch + hedge: random (spread) batches until 60 labels, then half of each batch random.
    "safe": {"uncertainty_from_labels": 60, "selection_random_share": 0.5},
    # The same with the cold start's pretraining off (random initialisation; the first batch random).
    "safe-scratch": {"uncertainty_from_labels": 60, "selection_random_share": 0.5, "pretrain": False},
    # Added after the first verdict (RULE.md, amendment 2): safe-scratch whose first training from random weights
    # has the length of the benchmark's initial model (CPU preset: 900 steps = 2.25 x TRAIN_STEPS' 400).
    "safe-scratch-long": {
        "uncertainty_from_labels": 60, "selection_random_share": 0.5, "pretrain": False, "initial_train_factor": 2.25,
    },
    # The default shipped before issue 17's decision (pretraining cold start, coverage-ordered first batch, entropy
    # with stack-aware batches, no hedge): the runs saved as "default" before it changed carry this name.
    "cold-start": {
        "uncertainty_from_labels": 0, "selection_random_share": 0.0, "pretrain": True, "initial_train_factor": 1.0,
    },
    "hedged": {"selection_random_share": 0.5},
    "switch": {"uncertainty_from_labels": 60},
    "scratch": {"pretrain": False},
}


def lever_settings(settings: Any, lever: str) -> Any:
    """``settings`` with lever ``lever``'s values (ValueError for an unknown lever)."""
    if lever not in LEVERS:
        raise ValueError(f"unknown lever {lever!r}; expected one of {sorted(LEVERS)}")
    return settings.model_copy(update=LEVERS[lever])


def default_arm(p: Protocol, settings: Any = None, name: str = DEFAULT_ARM) -> Arm:
    """The product as it ships, from ``settings`` (None: ``Settings()``, i.e. the environment).

    Every choice comes from Settings: STRATEGY + SCORE_AGGREGATION (the product's resolver), BATCH_DIVERSITY,
    DIVERSITY_METHOD / _Z_RADIUS / _FEATURE_RADIUS (``active_learning.plan.batch_config``), the cold start (PRETRAIN:
    PRETRAIN_STEPS on a sample of PRETRAIN_TILES pool tiles, PRETRAIN_CROP, then the first m tiles in the product's
    coverage order, ``coverage_order(method="random")`` = first batch "spread"; PRETRAIN off: random), the recipe
    (the product's TrainConfig, TRAIN_STEPS for every training including the first, LEARNING_RATE /
    INITIAL_LEARNING_RATE, VAL_FRACTION, BN_CALIBRATION_TILES, MODEL_NORM, MODEL_DROPOUT, CONTEXT_OFFSETS) and
    SEMI_*. Sizes stay the preset's: tile and crop, pool, m and k, U-Net width and depth, MC passes, ensemble, and
    the steps and rates scaled by ``product_steps_scale`` / ``product_lr_scale``. Not expressed: the audit split
    (the product trains on 9 of every 10 served tiles), TRAIN_TIME_BUDGET_S / PRETRAIN_TIME_BUDGET_S (the benchmark is
    bounded by steps) and the queue's audit interleaving.
    """
    s = settings if settings is not None else Settings()
    takes_aggregation = "aggregation" in strategy_params_model(s.strategy).model_fields
    steps = max(1, round(s.train_steps * p.product_steps_scale))
    first = max(1, round(first_steps(s) * p.product_steps_scale))
    pretrain = s.pretrain
    overrides = {
        "pretrain_steps": round(s.pretrain_steps * p.product_steps_scale) if pretrain else 0,
        "pretrain_tiles": s.pretrain_tiles,
        "pretrain_crop": s.pretrain_crop,
        "first_batch": "spread" if pretrain else "random",
        "z_radius": s.diversity_z_radius,
        "feature_radius": s.diversity_feature_radius,
        "recipe": "product",
        "init_steps": first,
        "steps": steps,
        "init_lr": s.initial_learning_rate * p.product_lr_scale,
        "lr": s.learning_rate * p.product_lr_scale,
        "val_fraction": s.val_fraction,
        "bn_calibration": "pool" if s.bn_calibration_tiles > 0 else "none",
        "bn_calibration_tiles": s.bn_calibration_tiles,
        "norm": s.model_norm,
        "dropout": s.model_dropout,
        "context_offsets": list(s.context_offset_list),
        "random_share": s.selection_random_share,
        "uncertainty_from_labels": s.uncertainty_from_labels,
        **semi_overrides(s, s.semi_supervised),
    }
    return Arm(
        name=name,
        strategy=s.strategy,
        strategy_params={"aggregation": s.aggregation} if takes_aggregation else {},
        selector=s.diversity_method if s.batch_diversity else None,
        z_radius=s.diversity_z_radius if s.batch_diversity else None,
        labelled_embeddings=bool(s.batch_diversity),  # as active_learning.plan.product_selector
        overrides=overrides,
    )


def semi_overrides(settings: Any, enabled: bool = True) -> dict[str, Any]:
    """The protocol fields of the product's semi-supervised term (SEMI_THRESHOLD, _WEIGHT, _UNLABELLED_BATCH)."""
    return {
        "semi_supervised": bool(enabled),
        "semi_threshold": settings.semi_threshold,
        "semi_weight": settings.semi_weight,
        "semi_unlabelled_batch": settings.semi_unlabelled_batch,
    }


def resolve_arm(p: Protocol, arm: str, settings: Any = None) -> Arm:
    """An arm name -> ``Arm``: "<strategy>[+<selector>][+semi]", "default[+semi]" (``default_arm``) or
    "default@<lever>[+semi]" (``LEVERS``).

    ValueError for an unknown strategy or suffix, or a selector on ``default`` (it takes its selector from
    Settings)."""
    base, method = parse_arm(arm)
    semi = "semi" in arm.split("+")[1:]
    s = settings if settings is not None else Settings()
    if base == DEFAULT_ARM or base.startswith(DEFAULT_ARM + "@"):
        if method is not None:
            raise ValueError(f"arm {arm!r}: 'default' takes its selector from Settings (BATCH_DIVERSITY, ...)")
        if base != DEFAULT_ARM:  # "default@<lever>": a candidate default
            s = lever_settings(s, base.split("@", 1)[1])
        out = default_arm(p, s, name=arm)
        return replace(out, overrides={**out.overrides, **semi_overrides(s)}) if semi else out
    if base not in available_strategies():
        raise ValueError(f"unknown strategy {base!r} in arm {arm!r}")
    z_radius = ARM_SELECTORS[_selector_suffix(arm)][1] if method is not None else None
    if method is not None and z_radius is None:
        z_radius = p.z_radius
    return Arm(
        name=arm,
        strategy=base,
        selector=method,
        z_radius=z_radius,
        labelled_embeddings=method == "weighted_kmeans",
        overrides=semi_overrides(s) if semi else {},
    )


def arm_protocol(p: Protocol, arm: Arm) -> Protocol:
    """The protocol ``arm`` runs with: ``p`` with the arm's overrides."""
    unknown = set(arm.overrides) - set(Protocol.__dataclass_fields__)
    if unknown:
        raise ValueError(f"arm {arm.name!r} overrides unknown protocol fields {sorted(unknown)}")
    return replace(p, **arm.overrides)


def initial_tag(p: Protocol, ap: Protocol) -> str:
    """Where an arm's initial model is cached under ``initial/``: "" (shared by every arm) when the arm runs the
    run's protocol, else a tag of its protocol (``default``, ``+semi``: their cold start differs)."""
    if ap == p:
        return ""
    import hashlib

    fields = {k: v for k, v in asdict(ap).items() if k not in SCORING_ONLY_FIELDS}  # the same tags as before them
    return "arm-" + hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def arm_batch_config(p: Protocol, arm: str | Arm):
    """The BatchConfig of an arm's selector (its method, and its z radius or the protocol's)."""
    if isinstance(arm, str):
        method, z_radius = ARM_SELECTORS[_selector_suffix(arm)]
    else:
        method, z_radius = arm.selector, arm.z_radius
    cfg = batch_config(p, method)
    return cfg if z_radius is None else replace(cfg, neighbourhood=Neighbourhood(z_radius=z_radius))


def arm_strategy(arm: Arm) -> Any:
    """The arm's strategy object, through the product's resolver (the default aggregation included)."""
    return resolve_strategy(arm.strategy, arm.strategy_params or None)


def scoring_config(p: Protocol) -> ScoringConfig:
    return ScoringConfig(
        tile_size=p.infer_tile,
        tile_overlap=p.infer_overlap,
        batch_size=POOL_BATCH,
        mc_passes=p.mc_passes,
        device=p.device,
        embed_batch=EMBED_BATCH,
    )


def ensemble_spec(p: Protocol, seed: int, rnd: int) -> EnsembleSpec:
    """The bootstrap members that score the pool for round ``rnd``'s pick (bounded by ``ensemble_steps`` each)."""
    seeds = SeedSchedule(seed)
    base = train_config(
        p, steps=p.ensemble_steps, lr=p.lr, seed=seeds.pick(rnd), split_seed=seeds.split, select="last", val=0.0
    )
    return EnsembleSpec(p.ensemble, p.ensemble_steps, seeds.pick(rnd), seeds.members(rnd, p.ensemble), base=base)


# ------------------------------------------------------------------------------------------------ runs


def ensure_initial(out: Path, p: Protocol, seed: int, tag: str = "") -> Path:
    """Train (once) and cache the initial model of a seed: m random tiles, from scratch, lr ``init_lr``; ``tag``: the
    folder of an arm with its own protocol (``initial_tag``)."""
    ckpt = out / "initial" / tag / f"seed{seed}.pt"
    if ckpt.exists():
        return ckpt
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    # One trainer per seed: a worker that needs a seed's model while another trains it waits for it (file lock).
    with open(ckpt.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ckpt.exists():
            return ckpt
        return _train_initial(ckpt, p, seed)


def _train_initial(ckpt: Path, p: Protocol, seed: int) -> Path:
    ds = dataset_for(p, seed)
    t0 = time.monotonic()
    model = _fresh_model(p, seed)
    pre_info = None
    if p.pretrain_steps > 0:  # issue 11: SSL pretraining on the unlabelled pool, the product's pretrain()
        crop = min(p.pretrain_crop or p.tile, p.tile)
        pcfg = PretrainConfig(steps=p.pretrain_steps, time_budget_s=1e9, seed=seed, crop=crop, device=p.device)
        n = len(ds.pool_images)
        # The product pretrains on a seeded sample of PRETRAIN_TILES tasks (jobs.pretrain._sample).
        sample = (
            range(n)
            if not 0 < p.pretrain_tiles < n
            else sorted(np.random.default_rng([seed, 0x9E7]).permutation(n)[: p.pretrain_tiles])
        )
        tiles = [ds.pool_images[i] for i in sample]
        pre = pretrain(model, tiles, pcfg, checkpoint_path=ckpt.parent / f"pretrain_seed{seed}.pt")
        model.load_state_dict(pre.state_dict)
        pre_info = {"steps": pre.steps, "seconds": pre.seconds, "loss_last20": float(np.mean(pre.losses[-20:]))}
    embeddings = None
    if p.first_batch != "random":
        embeddings = embed_images(model, list(ds.pool_images), torch_device(p.device), batch_size=EMBED_BATCH)
    lab = initial_labelled(ds, p, seed, embeddings)
    trained = train_model(
        ModelState(model),
        list(ds.pool_images[lab]),
        list(ds.pool_masks[lab]),
        train_config(p, steps=p.init_steps, lr=p.init_lr, seed=SeedSchedule(seed).train(0), split_seed=seed),
        progress=_log_progress(f"initial seed {seed}"),
        calibration=lambda: calibration(ds, p),
        unlabelled=lambda: unlabelled_pool(ds, lab),
    )
    test = evaluate_test(trained.model, ds, p)
    log.info(
        "seed %d: initial model on %d tiles, test IoU %.3f (%.0fs)", seed, len(lab), test["iou"], time.monotonic() - t0
    )
    res = trained.result
    extra = {"labelled": lab, "test": test, "train": res.metrics, "seconds": res.seconds, "pretrain": pre_info}
    save_checkpoint(trained.model, ckpt, extra=extra)
    return ckpt


def unlabelled_pool(ds: Dataset, labelled: list[int]) -> list[np.ndarray]:
    """The pool's unlabelled tiles: what the semi-supervised term learns from (only asked for when it is on)."""
    done = set(labelled)
    return [img for i, img in enumerate(ds.pool_images) if i not in done]


def _record(ds: Dataset, lab: list[int], rnd: int, test: dict, train: dict | None, seconds: dict) -> dict:
    masks = ds.pool_masks[lab]
    # Diagnostics (issue 11: why can an uncertainty batch lower test IoU?): the labelled set's foreground fraction
    # and boundary per tile; the batch's own figures follow from the previous round's (cumulative) ones.
    return {
        "round": rnd,
        "labelled": len(lab),
        "pixels": int(masks.size),
        "foreground_pixels": int(np.count_nonzero(masks)),
        "boundary": float(sum(boundary_length(m) for m in masks)),
        "foreground_fraction": float(np.count_nonzero(masks) / max(1, masks.size)),
        "boundary_per_tile": float(sum(boundary_length(m) for m in masks) / max(1, len(lab))),
        "iou": test["iou"],
        "dice": test["dice"],
        **{k: test[k] for k in ("precision", "recall", "predicted_foreground") if k in test},
        "val_iou": None if train is None else train.get("val_iou"),
        "best_step": None if train is None else train.get("best_step"),
        "seconds": seconds,
    }


def served_effort(model: Any, ds: Dataset, picked: list[int], p: Protocol) -> dict:
    """Issue 17.6, measured as the product measures it: the oracle's masks of the tiles this round's model picked,
    against that model's predictions of them (the pre-annotations it would serve), with ``active_learning.effort``.
    Means per tile; ``effort_saved`` = 1 - outline edited / outline from scratch (sums over the tiles)."""
    dev = torch_device(p.device)
    efforts = [
        edit_effort(
            predict_tiled(model, ds.pool_images[i], tile=p.infer_tile, overlap=p.infer_overlap, device=dev).argmax(0),
            ds.pool_masks[i],
        )
        for i in picked
    ]
    if not efforts:
        return {}
    edited, scratch = sum(e.boundary_edited for e in efforts), sum(e.boundary_scratch for e in efforts)
    return {
        "effort_tiles": len(efforts),
        "effort_changed_fraction": float(np.mean([e.changed_fraction for e in efforts])),
        "effort_boundary_edited": edited / len(efforts),
        "effort_boundary_scratch": scratch / len(efforts),
        "effort_saved": 1.0 - edited / scratch if scratch > 0 else None,
    }


# Issue 17.5: the product's promotion gate emulated on every round (records only: the curve is the same).
GATE_AUDIT_FRACTION = 0.1  # AUDIT_FRACTION as it ships
GATE_MIN_TILES = 4  # AUDIT_MIN_TILES
GATE_TOLERANCE = 0.02  # PROMOTION_TOLERANCE


def audit_order(ds: Dataset, seed: int) -> list[int]:
    """The seed's audit tasks in the order they are served: a seeded uniform AUDIT_FRACTION of the pool."""
    n = len(ds.pool_images)
    return np.random.default_rng([seed, 23]).permutation(n)[: max(1, round(GATE_AUDIT_FRACTION * n))].tolist()


def emulated_gate(previous: Any, new: Any, ds: Dataset, p: Protocol, audit: list[int], labelled: list[int]) -> dict:
    """What the product's gate (``active_learning.audit.compare``) decides for ``new`` against ``previous`` on the
    audit tiles annotated by now: the queue serves one audit task per ``1 / AUDIT_FRACTION`` places, so about
    len(labelled) / 9 of them, never ones selection picked (the product keeps them out of training)."""
    done = set(labelled)
    tiles = [i for i in audit if i not in done][: len(labelled) // round(1 / GATE_AUDIT_FRACTION - 1)]
    if len(tiles) < GATE_MIN_TILES:
        return {"gate": "not enough audit tiles", "audit_tiles": len(tiles)}
    dev = torch_device(p.device)

    def counts(model: Any) -> list[Confusion]:
        return [
            Confusion.of(
                predict_tiled(model, ds.pool_images[i], tile=p.infer_tile, overlap=p.infer_overlap, device=dev).argmax(
                    0
                ),
                ds.pool_masks[i],
            )
            for i in tiles
        ]

    c_new, c_prev = counts(new), counts(previous)
    verdict = compare(c_new, c_prev, GATE_TOLERANCE)
    return {
        "gate": verdict.decision,
        "audit_tiles": len(tiles),
        "audit_iou": summarise(c_new)["iou"],
        "audit_iou_previous": summarise(c_prev)["iou"],
        "gate_informative": len(verdict.informative),
    }


@dataclass
class _BenchmarkRounds(RoundHooks):
    """What the benchmark does around each round of ``run_strategy``: the round's record (test IoU, timings), the
    emulated gate, the candidate sample carried over and the effort of the tiles it picked."""

    ds: Dataset
    p: Protocol
    oracle: OracleLabels
    strategy: Any
    tag: str  # "<arm> seed <seed>" in the log
    seed: int
    rounds: list[dict]  # the records, round 0's first
    # The state carried between rounds: the gate's audit tiles (in the order they are served), the live version the
    # gate compares with (a copy of the model the round starts from), the round's test time, the times of the
    # scoring that picked its tiles, and the previous round's best candidates (candidate_pool > 0).
    audit: list[int] = field(init=False)
    previous: Any = field(init=False, default=None)
    test_seconds: float = field(init=False, default=0.0)
    picking: dict[str, float] = field(init=False, default_factory=dict)
    best: list[int] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.audit = audit_order(self.ds, self.seed)

    def before(self, rnd: int, plan: RoundPlan) -> RoundPlan:
        p = self.p
        self.previous = copy.deepcopy(plan.model.model) if rnd > 0 else None
        return replace(
            plan,
            progress=_log_progress(f"{self.tag} round {rnd}"),
            candidates=CandidateSampler(p.candidate_pool, p.candidate_keep, self.seed, tuple(self.best))
            if p.candidate_pool > 0
            else None,  # issue 20.2: a bounded candidate sample per round (0: the whole pool)
        )

    def evaluate(self, rnd: int, trained: TrainedModel) -> Evaluation:
        t0 = time.monotonic()
        metrics = evaluate_test(trained.model.to(torch_device(self.p.device)), self.ds, self.p)
        self.test_seconds = time.monotonic() - t0
        return Evaluation(metrics)

    def after(self, rnd: int, outcome: RoundOutcome, picked: list[int]) -> None:
        ds, p, lab, trained = self.ds, self.p, self.oracle.labelled_ids, outcome.trained
        if rnd > 0:
            t_train = outcome.timings["train"] - self.test_seconds - trained.ensemble_seconds
            times = {**self.picking, "train": t_train, "test": self.test_seconds}
            test = outcome.evaluation.metrics
            self.rounds.append(_record(ds, lab, rnd, test, trained.result.metrics, times))
            self.rounds[-1].update(emulated_gate(self.previous, trained.model, ds, p, self.audit, lab))
            val = trained.result.metrics["val_iou"]
            log.info(
                "%s round %d/%d: %d tiles, test IoU %.3f (val %s) [ens %.0fs score %.0fs train %.0fs test %.0fs]",
                self.tag, rnd, p.rounds, len(lab), test["iou"], "-" if val is None else f"{val:.3f}",
                times["ensemble"], times["score"], t_train, times["test"],
            )  # fmt: skip
        self.picking = {"ensemble": trained.ensemble_seconds, "score": outcome.timings.get("score", 0.0)}
        if not picked:
            return
        if p.candidate_pool > 0:  # what this round scored (its sample) and the best it carries to the next one
            self.rounds[-1].update(pool=outcome.pool_size, candidates=len(outcome.scored.ids))
            self.best = best_candidates(outcome, self.strategy, p.candidate_keep + p.k)
        self.rounds[-1].update(served_effort(trained.model, ds, picked, p))  # this round's model pre-annotates them


def run_strategy(out: Path, p: Protocol, strategy_name: str, seed: int, arm: Arm | dict | None = None) -> dict:
    """One (arm, seed) learning curve: round 0 = the cached initial model, then ``run_round`` per round
    (``ActiveLoop``). ``arm``: the resolved arm (None: ``resolve_arm`` with this process's Settings)."""
    path = out / "runs" / f"{strategy_name}__seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    t_run = time.monotonic()
    arm = resolve_arm(p, strategy_name) if arm is None else arm if isinstance(arm, Arm) else Arm.from_dict(arm)
    base_p, p = p, arm_protocol(p, arm)  # from here on: the arm's protocol
    ds = dataset_for(p, seed)
    model, extra = load_checkpoint(ensure_initial(out, p, seed, initial_tag(base_p, p)))
    model.to(torch_device(p.device))
    batch_method = arm.selector
    strategy = arm_strategy(arm)
    oracle = OracleLabels(ds, list(extra["labelled"]))
    rounds = [_record(ds, oracle.labelled_ids, 0, extra["test"], extra["train"], {"train": extra["seconds"]})]
    scoring = scoring_config(p)
    select: Any = TopK(p.k)
    if batch_method is not None:
        select = StackAware(
            TopK(p.k),
            lambda ids: stack_positions(ds, p, ids),
            k=p.k,
            config=arm_batch_config(p, arm),
            labelled_positions=lambda: stack_positions(ds, p, oracle.labelled_ids),  # the current labelled set
            wants_labelled_embeddings=arm.labelled_embeddings,
        )
    hooks = _BenchmarkRounds(ds, p, oracle, strategy, tag=f"{strategy_name} seed {seed}", seed=seed, rounds=rounds)
    loop = ActiveLoop(
        oracle,
        train=lambda train_seed: train_config(p, steps=p.steps, lr=p.lr, seed=train_seed, split_seed=seed),
        scorer=LocalScorer(ds.pool_images, scoring, embed=batch_method is not None),
        select=select,
        ensemble=lambda rnd: ensemble_spec(p, seed, rnd),
        hooks=hooks,
    )
    start = RoundPlan(
        strategy,
        ModelState(model, how="kept"),
        calibration=lambda: calibration(ds, p),
        unlabelled=lambda: unlabelled_pool(ds, oracle.labelled_ids),  # this round's labelled set
        scoring=scoring,
    )
    loop.run(start, p.rounds, SeedSchedule(seed))
    record = {
        "strategy": strategy_name,
        "seed": seed,
        "params": {**strategy.params(), "selector": batch_method or "topk"},
        "arm": asdict(arm),
        "rounds": rounds,
        "labelled_order": oracle.labelled_ids,
        "seconds": time.monotonic() - t_run,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return record


def run_full(out: Path, p: Protocol, seed: int) -> dict:
    """Full supervision: every pool tile labelled, trained from scratch (the upper reference)."""
    path = out / "runs" / f"full__seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.monotonic()
    ds = dataset_for(p, seed)
    tcfg = train_config(
        p, steps=p.full_steps, lr=p.init_lr, seed=SeedSchedule(seed).train(0), split_seed=seed,
        batch_size=p.full_batch_size,
    )  # fmt: skip
    trained = train_model(
        ModelState(_fresh_model(p, seed)),
        list(ds.pool_images),
        list(ds.pool_masks),
        tcfg,
        progress=_log_progress(f"full supervision seed {seed}"),
        calibration=lambda: calibration(ds, p),
    )
    test = evaluate_test(trained.model, ds, p)
    lab = list(range(len(ds.pool_images)))
    res = trained.result
    record = {
        "strategy": "full",
        "seed": seed,
        "rounds": [_record(ds, lab, 0, test, res.metrics, {"train": res.seconds})],
        "seconds": time.monotonic() - t0,
    }
    log.info(
        "seed %d: full supervision on %d tiles, test IoU %.3f (%.0fs)", seed, len(lab), test["iou"], record["seconds"]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return record


# ------------------------------------------------------------------------------------------------ orchestration


def _worker_init(threads: int, level: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(asctime)s %(processName)s %(message)s")


def _job(args: tuple) -> tuple[str, int, float]:
    kind, out, pdict, strategy, seed, *rest = args
    p = Protocol(**pdict)
    arm = Arm.from_dict(rest[0]) if rest and rest[0] is not None else None
    t0 = time.monotonic()
    if kind == "initial":
        ap = p if arm is None else arm_protocol(p, arm)
        ensure_initial(Path(out), ap, seed, initial_tag(p, ap))
    elif kind == "full":
        run_full(Path(out), p, seed)
    else:
        run_strategy(Path(out), p, strategy, seed, arm)
    return f"{kind}:{strategy}", seed, time.monotonic() - t0


PRIORITY = ("random", DEFAULT_ARM, "entropy", "entropy+stack", "effort_aware")


def run_all(
    out: Path,
    p: Protocol,
    strategies: list[str],
    seeds: list[int],
    workers: int,
    max_runs: int | None,
    arms: dict[str, Arm] | None = None,
) -> int:
    """Initial models first (one per seed and arm protocol), then full supervision and (arm, seed) runs. Returns runs
    done now. ``arms``: the resolved arms (None: ``resolve_arm`` with this process's Settings)."""
    from tqdm.auto import tqdm

    arms = {st: (arms or {}).get(st) or resolve_arm(p, st) for st in strategies}

    # Order: the strategies the published claims are about first, then the reference, then the rest, so that an
    # interrupted benchmark has complete seeds for the comparisons that matter most.
    # The arms of the claims and the candidate defaults ("default@<lever>") in the order the command names them.
    first = [st for st in strategies if st in PRIORITY or st.startswith(DEFAULT_ARM + "@")]
    rest = [st for st in strategies if st not in first]
    # Seed-major: an interrupted benchmark holds complete paired comparisons (every arm of a seed) first.
    runs = [("run", str(out), asdict(p), st, s, asdict(arms[st])) for s in seeds for st in first]
    runs += [("full", str(out), asdict(p), "full", s, None) for s in p.full_seeds if s in seeds]
    runs += [("run", str(out), asdict(p), st, s, asdict(arms[st])) for st in rest for s in seeds]
    runs = [r for r in runs if not (out / "runs" / f"{r[3]}__seed{r[4]}.json").exists()]
    if max_runs is not None:
        runs = runs[:max_runs]
    # Initial models only for (seed, arm protocol) pairs with runs to do; arms sharing a protocol share one.
    todo_init, seen = [], set()
    for r in runs:
        if r[0] != "run":
            continue
        ap = arm_protocol(p, arms[r[3]])
        tag = initial_tag(p, ap)
        if (tag, r[4]) in seen or (out / "initial" / tag / f"seed{r[4]}.pt").exists():
            continue
        seen.add((tag, r[4]))
        todo_init.append(("initial", str(out), asdict(p), "", r[4], asdict(arms[r[3]]) if tag else None))
    todo_init.sort(key=lambda job: (job[4], job[5] is not None))  # seed-major, the shared model first
    log.info("%d initial models and %d runs to do (%d workers)", len(todo_init), len(runs), workers)
    level = log.getEffectiveLevel()
    if workers <= 1:  # in order: each run trains (once) the initial model it needs, so seeds complete one by one
        _worker_init(torch_threads(), level)
        for job in tqdm(runs, desc="benchmark"):
            _job(job)
        return len(runs)
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(torch_threads(), level)) as pool:
        # One queue: a run whose seed's initial model is still training waits on its lock, no worker idles early.
        jobs = todo_init + runs
        for name, seed, secs in tqdm(pool.imap_unordered(_job, jobs), total=len(jobs), desc="benchmark"):
            log.info("done %s seed %d in %.0fs", name, seed, secs)
    return len(runs)


def torch_threads() -> int:
    return int(os.environ.get("AL_TORCH_THREADS", "1"))
