"""The benchmark's protocol: every number that determines a run (stored with the runs; resuming requires equality).

Presets scale the papers' protocol (Roels & Saeys 2019) to the machine. ``Protocol.train_config`` turns a protocol
into the ``TrainConfig`` of one training; the training itself is the product's (``ml_backend.training.recipe``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ml_backend.training import TrainConfig
from ml_backend.training.semi import SemiConfig


@dataclass
class Protocol:
    """Everything that determines the numbers of a run (stored in the output dir; resuming requires equality)."""

    data: str = "vnc"  # "vnc" | "folder" | "synthetic" | "volume" (ml_backend.data.volume, generated 3-D)
    images: str = ""
    masks: str = ""
    synthetic_n: int = 8
    synthetic_size: int = 256
    # data "volume": the generated 3-D EM-like volume (issue 11), its setting, size and difficulty (volume.HARD).
    volume_setting: str = "isotropic"
    volume_n: int = 32
    volume_size: int = 384
    volume_seed: int = 2024
    volume_contrast: float = 0.5
    volume_look_alikes: float = 3.0
    volume_noise: float = 2.0
    downsample: int = 1  # bin the volume by this factor first (CPU: 2 keeps each tile's physical area at tile 64)
    tile: int = 128
    pool_size: int = 2000
    m: int = 20
    k: int = 20
    rounds: int = 25
    test_every: int = 1  # use every n-th slice of the test region
    width: int = 16
    depth: int = 4
    dropout: float = 0.2
    norm: str = "batch"  # the U-Net's normalisation (ml_backend.model.NORMS)
    bn_calibration: str = "pool"  # "pool": BatchNorm statistics re-estimated on the (unlabelled) pool after training
    init_steps: int = 1500
    init_lr: float = 1e-3
    steps: int = 600
    lr: float = 5e-4
    batch_size: int = 8
    val_fraction: float = 0.2
    ema_decay: float = 0.99
    select: str = "best"
    eval_every: int = 0  # 0: automatic (steps // 5)
    full_steps: int = 6000
    full_batch_size: int = 32  # the reference sees every pool tile many times: larger batches, fewer steps
    full_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ensemble: int = 3
    ensemble_steps: int = 200
    mc_passes: int = 8
    infer_tile: int = 256
    infer_overlap: int = 32
    device: str = "auto"
    # Issue 11 ablations (the defaults reproduce the published protocol). The cold start: SSL pretraining steps of
    # the U-Net on the pool before the initial training (0: random initialisation; ml_backend.training.pretrain),
    # and how the m initial tiles are chosen: "random" | "coverage" (TypiClust + k-center, strategies.batch
    # .coverage_order) | "kcenter" | "spread" (random order with the stack/feature exclusions), on the embeddings
    # of the (pretrained) initial network. Stack-aware diversity ("<strategy>+stack", "<strategy>+div" arms): the
    # neighbourhood in slices and the feature radius of strategies.batch (selection.StackAware).
    pretrain_steps: int = 0
    pretrain_tiles: int = 0  # pretrain on a seeded sample of this many pool tiles (0: the whole pool)
    pretrain_crop: int = 0  # pretraining crop (0: the tile)
    first_batch: str = "random"
    z_radius: int | str = 3  # or "auto" (measured on the pool, strategies.batch.estimate_z_radius)
    feature_radius: float = 0.05
    # BatchNorm re-estimation on a seeded sample of this many pool tiles (0: every pool tile; the product samples
    # BN_CALIBRATION_TILES).
    bn_calibration_tiles: int = 0
    # The fine-tuning recipe: "protocol" builds TrainConfig from the fields above (ema_decay, select, eval_every,
    # batch_size: the published protocol); "product" takes the product's TrainConfig (training.recipe.train_config:
    # its EMA, selection, validation period, augmentation) and only the sizes from here (the ``default`` arm).
    recipe: str = "protocol"
    # Issue 17: semi-supervised fine-tuning on the pool's unlabelled tiles (training.semi; "+semi" arms).
    semi_supervised: bool = False
    semi_threshold: float = 0.95
    semi_weight: float = 1.0
    semi_unlabelled_batch: int = 8
    # How the preset scales the product's recipe for the ``default`` arm (run.default_arm): its steps (TRAIN_STEPS,
    # PRETRAIN_STEPS) x product_steps_scale, its learning rates (LEARNING_RATE, INITIAL_LEARNING_RATE) x
    # product_lr_scale. 1.0 / 1.0 on a GPU: the product as it ships.
    product_steps_scale: float = 1.0
    product_lr_scale: float = 1.0
    # 2.5D context (issue 11): the slices z + offset each tile and test slice is read from, as the U-Net's input
    # channels (ml_backend.data.context: edges clamped into the stack). [0]: plain 2-D, today's protocol.
    context_offsets: list[int] = field(default_factory=lambda: [0])
    # Issue 20.2: each round scores a candidate sample of this many unlabelled pool tiles (the product's
    # CANDIDATE_POOL, active_learning.candidates: a fresh draw per round plus up to candidate_keep of the previous
    # round's best) and selects among them; 0 = the whole pool (the published protocol).
    candidate_pool: int = 0
    candidate_keep: int = 200
    # Issue 17's hedges of a stack-aware arm (strategies.batch.hedged_share; the product's SELECTION_RANDOM_SHARE and
    # UNCERTAINTY_FROM_LABELS): part of every batch, or every batch while labels are few, drawn at random.
    random_share: float = 0.0
    uncertainty_from_labels: int = 0


# Fields that change what a round scores, not the initial model: left out of an arm's initial-model tag.
SCORING_ONLY_FIELDS = ("candidate_pool", "candidate_keep", "random_share", "uncertainty_from_labels")


# Fields that change only the ``default`` arm's numbers (its recipe scaling): an output dir written before they
# existed takes the current values, so its runs resume with a default arm added (arms.json guards that arm).
DEFAULT_ARM_ONLY_FIELDS = ("product_steps_scale", "product_lr_scale")

PRESETS: dict[str, dict[str, Any]] = {
    # The papers' protocol (Roels & Saeys: 128x128 tiles, pool 2000, m = k = 20, T = 25, lr 1e-3 then 5e-4).
    "full": {},
    # 2-core CPU: same shape, scaled down (smaller pool, fewer rounds, narrower net, fewer steps, every 4th test slice).
    "cpu": {
        "downsample": 2,
        "tile": 64,
        "pool_size": 400,
        "m": 20,
        "k": 20,
        "rounds": 5,
        "test_every": 4,
        "width": 8,
        "depth": 4,
        "init_steps": 900,
        "init_lr": 4e-3,  # ~10x fewer steps than the papers: a higher rate leaves the all-background plateau sooner
        "steps": 400,  # per round, from the previous round's weights (120 gave jumpy curves: active_learning.md)
        "lr": 2e-3,
        "full_steps": 2000,  # x 32 tiles per batch (BatchNorm U-Net, seed 0: test IoU 0.73; see active_learning.md)
        "full_seeds": [0, 1, 2],
        "ensemble": 3,
        "ensemble_steps": 100,  # a quarter of a round's steps, as the product's train_ensemble
        "mc_passes": 4,
        # The default arm: TRAIN_STEPS (400) as they ship; rates x4 like this preset's (2e-3 / 4e-3 against the
        # papers' 5e-4 / 1e-3: 64 px tiles and fewer steps leave the all-background plateau sooner).
        "product_steps_scale": 1.0,
        "product_lr_scale": 4.0,
    },
    # Smoke run: minutes on CPU.
    "quick": {
        "downsample": 2,
        "tile": 64,
        "pool_size": 120,
        "m": 10,
        "k": 10,
        "rounds": 3,
        "test_every": 10,
        "width": 8,
        "depth": 4,
        "init_steps": 300,
        "init_lr": 4e-3,
        "steps": 60,
        "lr": 2e-3,
        "full_steps": 400,
        "full_seeds": [0],
        "ensemble": 2,
        "ensemble_steps": 10,
        "mc_passes": 2,
        "product_steps_scale": 0.15,  # 60 of TRAIN_STEPS' 400, 90 of PRETRAIN_STEPS' 600
        "product_lr_scale": 4.0,
    },
}


def train_config(
    p: Protocol,
    *,
    steps: int,
    lr: float,
    seed: int,
    split_seed: int,
    select: str | None = None,
    val: float | None = None,
    batch_size: int | None = None,
):
    semi = SemiConfig(
        enabled=p.semi_supervised,
        threshold=p.semi_threshold,
        weight=p.semi_weight,
        unlabelled_batch=p.semi_unlabelled_batch,
    )
    if p.recipe == "product":  # the product's TrainConfig (training.recipe.train_config) with the protocol's sizes
        return TrainConfig(
            steps=steps,
            lr=lr,
            crop=p.tile,
            val_fraction=p.val_fraction if val is None else val,
            time_budget_s=1e9,
            seed=seed,
            split_seed=split_seed,
            device=p.device,
            semi=semi,
            **({"select": select} if select else {}),
            **({"batch_size": batch_size} if batch_size else {}),
        )
    if p.recipe != "protocol":
        raise ValueError(f"recipe must be 'protocol' or 'product', got {p.recipe!r}")
    return TrainConfig(
        steps=steps,
        lr=lr,
        batch_size=batch_size or p.batch_size,
        crop=p.tile,
        val_fraction=p.val_fraction if val is None else val,
        ema_decay=p.ema_decay,
        select=select or p.select,
        eval_every=p.eval_every or max(10, steps // 5),
        time_budget_s=1e9,  # the benchmark is bounded by steps, not by wall time (deterministic)
        seed=seed,
        split_seed=split_seed,  # the same held-out tiles in every round of a seed: no train/val leakage
        device=p.device,
        semi=semi,
    )
