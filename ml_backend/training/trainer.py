"""Fine-tuning loop shared by the product (RQ training job) and the active-learning benchmark.

The recipe is built for what active learning gives us: tens of small tiles, ~5% foreground, and a model fine-tuned
again after every batch of labels. Each round must improve reliably, or the learning curves are noise:

* partial cross-entropy + soft Dice (``losses``), IGNORE pixels excluded (sparse configs);
* AdamW with linear warm-up then cosine decay, gradient clipping;
* an exponential moving average (EMA) of the weights, which smooths the step-to-step jitter of small batches;
* a held-out validation split of the labelled tiles, evaluated every ``eval_every`` steps (and before training);
  the EMA weights with the lowest validation loss are kept (early stopping without stopping). The split is a stable
  function of each tile's pixels and the seed, so a model fine-tuned from the previous version never validates on
  tiles it was trained on when the labelled set grows;
* seeds for torch and numpy, a wall-clock budget, CUDA when available.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ml_backend.config import torch_device
from ml_backend.inference.tiling import predict_tiled
from ml_backend.training.augment import AugmentConfig, augment_batch, sample_crops
from ml_backend.training.losses import segmentation_loss
from ml_backend.training.metrics import IGNORE, dice_from_counts, iou_from_counts
from ml_backend.training.semi import SemiConfig, consistency_loss, rampup, unlabelled_views

log = logging.getLogger(__name__)

_DIRECT_FORWARD_MAX_PIXELS = 512 * 512  # larger validation images go through tiled inference (bounded memory)


@dataclass
class TrainConfig:
    """Hyper-parameters of one fine-tuning run. Defaults are the recipe tuned on VNC (benchmarks/active_learning.md)."""

    steps: int = 400
    lr: float = 5e-4  # the papers' fine-tuning rate; 1e-3 for training from scratch
    batch_size: int = 8
    crop: int = 128
    val_fraction: float = 0.2
    time_budget_s: float = 900.0
    # The schedule's progress is the larger of steps done / steps and seconds spent / time_budget_s: a run the clock
    # stops still ends with its learning rate annealed (the product's first version on a CPU, issue 18).
    anneal_by_time: bool = False
    seed: int = 0
    split_seed: int | None = None  # seed of the stable train/val split (None: ``seed``); keep it fixed across rounds
    device: str = "auto"
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05  # of the steps, linear warm-up from 0
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    dice_weight: float = 1.0
    ema_decay: float = 0.99  # 0 disables weight averaging
    eval_every: int = 50  # validation period in steps (0: only before and after training)
    select: str = "best"  # "best": EMA weights with the lowest validation loss; "last": final EMA weights
    keep_initial: bool = False  # let "best" keep the starting weights (off: a noisy val set can freeze the model)
    log_every: int = 10
    amp: bool = True  # mixed precision on CUDA only (CPU always trains in fp32)
    # CUDA autocast dtype: "auto"/"bf16" = bfloat16, "fp16" = float16 with a GradScaler (older GPUs without bf16).
    precision: str = "auto"
    # CUDA only: channels-last weights and batches, cudnn.benchmark, pinned-memory non-blocking batch transfers.
    cuda_tuning: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Semi-supervised term on unlabelled tiles (``training.semi``: FixMatch pseudo-labels from the EMA teacher);
    # off by default, and off it leaves the supervised path exactly as it was.
    semi: SemiConfig = field(default_factory=SemiConfig)

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):  # rebuilt from JSON (RQ job arguments, registry metadata)
            self.augment = AugmentConfig(**self.augment)
        if isinstance(self.semi, dict):
            self.semi = SemiConfig(**self.semi)
        if self.steps < 0 or self.batch_size < 1 or self.crop < 8 or self.lr <= 0:
            raise ValueError(f"invalid TrainConfig: steps={self.steps} batch_size={self.batch_size} crop={self.crop}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.precision not in {"auto", "bf16", "fp16", "fp32"}:
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        if self.select not in {"best", "last"}:
            raise ValueError(f"select must be 'best' or 'last', got {self.select!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    metrics: dict[str, Any]  # val_iou, val_dice (None without validation tiles), train_loss, best_step, ...
    steps: int
    seconds: float
    n_train: int
    n_val: int
    device: str


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy's legacy global generator."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def tile_hash_fraction(image: np.ndarray, seed: int) -> float:
    """A uniform number in [0, 1) that depends only on the tile's pixels and the seed (stable hold-out split)."""
    h = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8, key=str(seed).encode()[:64])
    h.update(str(image.shape).encode())
    return int.from_bytes(h.digest(), "little") / 2**64


def split_train_val(images: list[np.ndarray], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val). A tile is held out iff its hash fraction < val_fraction, so growing the labelled set
    never moves a training tile into validation; at least one tile each side when there are >= 2 tiles."""
    n = len(images)
    if n < 2 or val_fraction <= 0:
        return list(range(n)), []
    u = np.array([tile_hash_fraction(img, seed) for img in images])
    val = u < val_fraction
    if not val.any():
        val[int(np.argmin(u))] = True
    if val.all():
        val[int(np.argmax(u))] = False
    return [i for i in range(n) if not val[i]], [i for i in range(n) if val[i]]


def _check_inputs(images: list[np.ndarray], masks: list[np.ndarray], what: str) -> tuple[list, list]:
    if len(images) != len(masks):
        raise ValueError(f"{what}: {len(images)} images but {len(masks)} masks")
    out_i, out_m = [], []
    for k, (img, msk) in enumerate(zip(images, masks, strict=True)):
        img = np.asarray(img, dtype=np.float32)
        msk = np.asarray(msk)
        # (H, W), or (C, H, W) with 2.5D context (ml_backend.data.context); the mask is always (H, W).
        if img.ndim not in (2, 3) or img.shape[-2:] != msk.shape or msk.ndim != 2 or img.size == 0:
            raise ValueError(
                f"{what}[{k}]: image {img.shape} ((H, W) or (C, H, W)) and mask {msk.shape} ((H, W)) must have "
                "equal non-empty spatial shapes"
            )
        if not np.isfinite(img).all():
            raise ValueError(f"{what}[{k}]: image contains NaN or inf")
        msk = msk.astype(np.int64)
        if msk.size and msk.min() < IGNORE:
            raise ValueError(f"{what}[{k}]: mask values must be class indices >= 0 or IGNORE ({IGNORE})")
        out_i.append(img)
        out_m.append(msk)
    return out_i, out_m


def _eta(step: int, steps: int, seconds: float, budget_s: float) -> float:
    """Seconds left: the steps to go at the rate so far, or the time budget's rest when the clock stops first."""
    by_steps = seconds / max(1, step) * max(0, steps - step)
    return round(max(0.0, min(by_steps, budget_s - seconds)), 1)


def _lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def predict_probs(model: nn.Module, image: np.ndarray, device: torch.device) -> np.ndarray:
    """(classes, H, W) softmax of one normalised (H, W) or (C, H, W) image; tiled inference for large images to
    bound memory."""
    h, w = image.shape[-2:]
    if h * w > _DIRECT_FORWARD_MAX_PIXELS:
        return predict_tiled(model, image, device=device)
    arr = np.ascontiguousarray(image, dtype=np.float32)
    x = torch.from_numpy(arr)[None, None] if arr.ndim == 2 else torch.from_numpy(arr)[None]
    x = x.to(device)
    return model(x).float().softmax(dim=1)[0].cpu().numpy()


@torch.no_grad()
def evaluate(
    model: nn.Module, images: list[np.ndarray], masks: list[np.ndarray], device: torch.device
) -> dict[str, float]:
    """Global (pixel counts summed over all tiles) foreground IoU/Dice, mean NLL and soft Dice over known pixels."""
    was_training = model.training
    model.eval()
    tp = fp = fn = 0
    nll_sum, n_known = 0.0, 0
    soft_inter = soft_pred = soft_true = 0.0
    try:
        for img, msk in zip(images, masks, strict=True):
            probs = predict_probs(model, img, device)
            known = msk != IGNORE
            pred = probs.argmax(axis=0)
            p = (pred > 0) & known
            t = (msk > 0) & known
            tp_i = int(np.count_nonzero(p & t))
            tp += tp_i
            fp += int(np.count_nonzero(p)) - tp_i
            fn += int(np.count_nonzero(t)) - tp_i
            if known.any():
                idx = np.clip(msk, 0, probs.shape[0] - 1)
                pk = np.take_along_axis(probs, idx[None], axis=0)[0][known]
                nll_sum += float(-np.log(np.clip(pk, 1e-7, 1.0)).sum())
                n_known += int(known.sum())
                p_fg = (1.0 - probs[0])[known]
                soft_inter += float((p_fg * t[known]).sum())
                soft_pred += float(p_fg.sum())
                soft_true += float(t[known].sum())
    finally:
        model.train(was_training)
    return {
        "iou": iou_from_counts(tp, fp, fn),
        "dice": dice_from_counts(tp, fp, fn),
        "nll": nll_sum / max(1, n_known),
        "soft_dice": (2 * soft_inter + 1.0) / (soft_pred + soft_true + 1.0),
    }


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers (empty for GroupNorm models: nothing to re-estimate)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, images: list[np.ndarray], device: torch.device, batch_size: int = 16
) -> int:
    """Re-estimate BatchNorm running statistics on ``images`` (no labels needed); returns the number of images used.

    Active learning labels the tiles a strategy finds informative (for entropy: tiles full of mitochondria
    outlines), so statistics estimated while training on them describe that biased sample, not the sections the
    model will segment. Unlabelled pool tiles are free and representative: after training, the statistics are
    recomputed on them (a cumulative average over one pass, as in AdaBN / ``torch.optim.swa_utils.update_bn``), with
    dropout off. A model without BatchNorm is left untouched (returns 0).
    """
    bns = batchnorm_layers(model)
    if not bns or not images:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in bns]
    model.eval()  # decoder dropout off
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    try:
        by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
        for img in images:
            by_shape.setdefault(np.shape(img), []).append(np.asarray(img, dtype=np.float32))
        for group in by_shape.values():
            for i in range(0, len(group), batch_size):
                x = torch.from_numpy(np.stack(group[i : i + batch_size]))
                x = (x[:, None] if x.ndim == 3 else x).to(device)  # (N, H, W) or (N, C, H, W) context tiles
                model(x)
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.train(was_training)
    return len(images)


def _unlabelled(images: list[np.ndarray] | None, channels: int, like: list[np.ndarray]) -> list[np.ndarray]:
    """The usable unlabelled tiles: float32, finite, with the labelled tiles' channel layout (others are dropped)."""
    layout = {1 if img.ndim == 2 else int(img.shape[0]) for img in like}
    out = []
    for img in images or []:
        arr = np.asarray(img, dtype=np.float32)
        c = 1 if arr.ndim == 2 else int(arr.shape[0]) if arr.ndim == 3 else -1
        if arr.size and c in layout and (not channels or c == channels) and np.isfinite(arr).all():
            out.append(arr)
    if images and len(out) < len(images):
        log.warning("fine_tune: %d of %d unlabelled tiles dropped (shape or non-finite values)", len(images) - len(out),
                    len(images))  # fmt: skip
    return out


def _num_classes(model: nn.Module) -> int | None:
    hp = getattr(model, "hparams", None)
    return int(hp["num_classes"]) if isinstance(hp, dict) and "num_classes" in hp else None


@dataclass(frozen=True)
class ValidationTiles:
    """``fine_tune``'s validation tiles, given instead of a held-out share: ``images`` as its training images,
    ``masks`` their (H, W) class indices or IGNORE."""

    images: Sequence[np.ndarray]
    masks: Sequence[np.ndarray]


def fine_tune(
    model: nn.Module,
    images: list[np.ndarray],
    masks: list[np.ndarray],
    config: TrainConfig | None = None,
    *,
    progress: Callable[[dict], None] | None = None,
    validation: ValidationTiles | None = None,
    calibration_images: list[np.ndarray] | None = None,
    unlabelled_images: list[np.ndarray] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place on (image, mask) tiles and load the selected (best/averaged) weights into it.

    images: normalised float32 (H, W) tiles, or (C, H, W) with 2.5D context (one channel per slice offset, as the
    model's ``in_channels``); masks: int64 (H, W) class indices or IGNORE. Without ``validation`` (given
    ``ValidationTiles``: the tiles the best step is chosen on) a stable ``val_fraction`` of the tiles is held out (at
    least one when there are >= 2). ``calibration_images`` (unlabelled tiles representative of the data, e.g. the pool)
    re-estimate BatchNorm statistics of the selected weights (``recalibrate_batchnorm``). ``unlabelled_images`` (same
    layout as ``images``, no masks) feed the semi-supervised term when ``config.semi`` is enabled (``training.semi``);
    ignored otherwise. The model is returned to the device it came from, in eval mode.
    """
    cfg = config or TrainConfig()
    t0 = time.monotonic()
    images, masks = _check_inputs(list(images), list(masks), "images")
    if not images:
        raise ValueError("fine_tune needs at least one labelled tile")
    if validation is not None:
        v_img, v_msk = _check_inputs(list(validation.images), list(validation.masks), "val_images")
        tr_img, tr_msk = images, masks
    else:
        split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
        tr_idx, va_idx = split_train_val(images, cfg.val_fraction, split_seed)
        tr_img, tr_msk = [images[i] for i in tr_idx], [masks[i] for i in tr_idx]
        v_img, v_msk = [images[i] for i in va_idx], [masks[i] for i in va_idx]
    keep = [i for i, m in enumerate(tr_msk) if (m != IGNORE).any()]
    if not keep:
        raise ValueError("no labelled pixel in the training tiles (every mask pixel is IGNORE)")
    tr_img, tr_msk = [tr_img[i] for i in keep], [tr_msk[i] for i in keep]
    want = int((getattr(model, "hparams", None) or {}).get("in_channels", 0))
    got = {1 if img.ndim == 2 else int(img.shape[0]) for img in tr_img + v_img}
    if want and got != {want}:
        raise ValueError(
            f"the model reads {want} input channel(s) (2.5D context offsets) but the tiles have {sorted(got)}: "
            "build the tiles with the model's offsets (ml_backend.data.context.model_offsets)"
        )
    n_cls = _num_classes(model)
    top = max(int(m.max()) for m in tr_msk + v_msk)
    if n_cls is not None and top >= n_cls:
        raise ValueError(f"mask holds class {top} but the model predicts {n_cls} classes")

    semi = cfg.semi
    u_img = _unlabelled(unlabelled_images, want, tr_img) if semi.active else []
    if semi.active and not u_img:
        log.warning("fine_tune: semi-supervised training asked for but no unlabelled tile given: supervised only")

    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch_device(cfg.device)
    try:
        home = next(model.parameters()).device
    except StopIteration as exc:
        raise ValueError("model has no parameters") from exc
    model.to(device)
    cuda = device.type == "cuda"
    use_amp = cfg.amp and cuda and cfg.precision != "fp32"
    amp_dtype = torch.float16 if cfg.precision == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    tuned = cuda and cfg.cuda_tuning
    if tuned:  # fixed crop shapes: cuDNN picks its fastest algorithms once; NHWC runs the tensor cores best
        torch.backends.cudnn.benchmark = True
        model.to(memory_format=torch.channels_last)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(round(cfg.warmup_fraction * cfg.steps))

    def lr_factor(s: int) -> float:
        if not cfg.steps:
            return 1.0
        if cfg.anneal_by_time:  # by the clock when it runs ahead of the steps (warm-up and cosine alike)
            s = max(s, int(cfg.steps * (time.monotonic() - t0) / cfg.time_budget_s))
        return _lr_factor(s, cfg.steps, warmup, cfg.min_lr_ratio)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    ema = copy.deepcopy(model).eval() if cfg.ema_decay > 0 else None
    for p in ema.parameters() if ema is not None else []:
        p.requires_grad_(False)

    def averaged() -> nn.Module:
        return ema if ema is not None else model

    best: dict[str, Any] = {"key": None, "state": None, "step": 0, "val": None}

    def validate(step: int) -> dict[str, float] | None:
        if not v_img:
            return None
        res = evaluate(averaged(), v_img, v_msk, device)
        res["loss"] = res["nll"] + cfg.dice_weight * (1.0 - res["soft_dice"])
        if step == 0 and not cfg.keep_initial and cfg.steps > 0:
            return res
        # Select on the validation loss (the training objective: NLL + soft Dice over all val pixels), not IoU:
        # a few held-out tiles often hold no foreground at all, where IoU is degenerate (0 or 1) but the loss is not.
        key = (-round(res["loss"], 6),)
        if best["key"] is None or key >= best["key"]:  # ties go to the later (more trained) weights
            best.update(key=key, state=copy.deepcopy(averaged().state_dict()), step=step, val=res)
        return res

    initial = validate(0)
    model.train()
    order: list[int] = []
    losses: list[float] = []
    recent: list[float] = []
    stopped = "steps"
    step = 0
    last_val = initial
    semi_losses: list[float] = []
    semi_confident: list[float] = []
    for step in range(1, cfg.steps + 1):
        if time.monotonic() - t0 > cfg.time_budget_s:
            stopped = "time_budget"
            step -= 1
            break
        if len(order) < cfg.batch_size:  # epoch-style cycling: every tile is seen equally often
            order.extend(rng.permutation(len(tr_img)).tolist())
        idx, order = np.array(order[: cfg.batch_size]), order[cfg.batch_size :]
        x, y = sample_crops(tr_img, tr_msk, idx, cfg.crop, rng)
        if tuned:
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        x, y = augment_batch(x.to(device), y.to(device), gen, cfg.augment)
        if tuned:
            x = x.contiguous(memory_format=torch.channels_last)
        if u_img:  # semi-supervised: one student batch of labelled + strong unlabelled crops (training.semi)
            weak, strong, keep = unlabelled_views(u_img, rng, gen, cfg.crop, semi, cfg.augment, device)
            teacher = averaged()
            with torch.no_grad(), torch.autocast(device_type="cuda", dtype=amp_dtype, enabled=use_amp):
                if teacher is model:  # no EMA: the student itself, in eval mode (FixMatch)
                    model.eval()
                    t_logits = model(weak)
                    model.train()
                else:
                    t_logits = teacher(weak)
            with torch.autocast(device_type="cuda", dtype=amp_dtype, enabled=use_amp):
                both = model(torch.cat([x, strong]))
            logits, s_logits = both[: x.shape[0]], both[x.shape[0] :]
            loss_u, confident = consistency_loss(s_logits, t_logits, semi.threshold, keep)
            loss = segmentation_loss(logits, y, dice_weight=cfg.dice_weight)
            loss = loss + semi.weight * rampup(step - 1, cfg.steps, semi.rampup_fraction) * loss_u
            semi_losses.append(float(loss_u.detach()))
            semi_confident.append(confident)
        else:
            with torch.autocast(device_type="cuda", dtype=amp_dtype, enabled=use_amp):
                logits = model(x)
            loss = segmentation_loss(logits, y, dice_weight=cfg.dice_weight)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # fp16: scaled against underflow; otherwise the scaler is a no-op
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        if ema is not None:
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # short runs: average over what exists
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                    pe.lerp_(pm.detach(), 1 - decay)
                for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
                    # BatchNorm statistics are copied, not averaged: averaging them too (timm's ModelEmaV2 style)
                    # made 2 of 3 initial VNC models collapse to background (test IoU 0.09, 0.00, 0.27 against
                    # 0.32, 0.17, -) in benchmarks/active_learning.md's comparison.
                    be.copy_(bm)
        lv = float(loss.detach())
        losses.append(lv)
        recent.append(lv)
        is_eval = cfg.eval_every > 0 and step % cfg.eval_every == 0 and step < cfg.steps
        if is_eval:
            last_val = validate(step)
            model.train()
        if progress is not None and (step % max(1, cfg.log_every) == 0 or is_eval):
            progress(
                {
                    "step": step,
                    "steps": cfg.steps,
                    "loss": float(np.mean(recent)),
                    "val_iou": None if last_val is None else last_val["iou"],
                    "lr": opt.param_groups[0]["lr"],
                    "seconds": time.monotonic() - t0,
                    "eta_s": _eta(step, cfg.steps, time.monotonic() - t0, cfg.time_budget_s),
                }
            )
            recent = []
    steps_done = step if cfg.steps else 0
    final = validate(steps_done) if steps_done > 0 or best["state"] is None else last_val
    if cfg.select == "best" and best["state"] is not None:
        model.load_state_dict(best["state"])
        chosen_step, val = best["step"], best["val"]
    else:
        model.load_state_dict(averaged().state_dict())
        chosen_step, val = steps_done, final
    calibrated = 0
    if calibration_images:
        cal = [np.asarray(img, dtype=np.float32) for img in calibration_images]
        if any(img.ndim not in (2, 3) or img.size == 0 or not np.isfinite(img).all() for img in cal):
            raise ValueError("calibration_images must be finite non-empty (H, W) or (C, H, W) images")
        calibrated = recalibrate_batchnorm(model.to(device), cal, device)
    model.to(home).eval()
    if tuned:  # back to the default layout: checkpoints and CPU consumers see the usual strides
        model.to(memory_format=torch.contiguous_format)
    seconds = time.monotonic() - t0
    tail = losses[-max(1, len(losses) // 5) :] if losses else []
    metrics = {
        "val_iou": None if val is None else val["iou"],
        "val_dice": None if val is None else val["dice"],
        "val_nll": None if val is None else val["nll"],
        "val_loss": None if val is None else val["loss"],
        "initial_val_iou": None if initial is None else initial["iou"],
        "train_loss": float(np.mean(tail)) if tail else None,
        "best_step": chosen_step,
        "bn_calibration_images": calibrated,
        "stopped": stopped,
        "tiles_per_s": steps_done * cfg.batch_size / seconds if seconds > 0 else 0.0,
    }
    if u_img:
        semi_tail = slice(-max(1, len(semi_losses) // 5), None)
        metrics["semi"] = {
            "unlabelled_tiles": len(u_img),
            "loss_u": float(np.mean(semi_losses[semi_tail])) if semi_losses else None,
            "confident_fraction": float(np.mean(semi_confident[semi_tail])) if semi_confident else None,
        }
    if progress is not None:
        progress({"step": steps_done, "steps": cfg.steps, "loss": metrics["train_loss"], "val_iou": metrics["val_iou"],
                  "eta_s": 0.0})
    log.info(
        "fine_tune: %d steps in %.1fs on %s, %d train / %d val tiles, val IoU %s (step %d), stopped by %s",
        steps_done, seconds, device, len(tr_img), len(v_img), metrics["val_iou"], chosen_step, stopped,
    )  # fmt: skip
    return TrainResult(metrics, steps_done, seconds, len(tr_img), len(v_img), str(device))
