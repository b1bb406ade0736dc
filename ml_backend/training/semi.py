"""Semi-supervised fine-tuning on the unlabelled pool: confidence-thresholded pseudo-labels (FixMatch) from a mean
teacher.

Why: a project holds thousands of unlabelled tiles and a round trains on tens of labelled ones; on an unseen
isotropic FIB-SEM stack the supervised model of 20 tiles was worse than random selection at every round (issue 17).
The unlabelled tiles of the same stack are free and show what the model will have to segment.

Method: FixMatch (Sohn et al. 2020, "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
Confidence", NeurIPS) applied per pixel, as in its segmentation adaptations (e.g. French et al. 2020): every step
draws ``unlabelled_batch`` crops of unlabelled tiles; a *weak* view (the geometric augmentation only: flips,
90-degree rotations) goes through the teacher without gradient; the teacher's arg-max is the pseudo-label of every
pixel whose max probability is >= ``threshold``; a *strong* view of the same crop (the same geometry, then strong
intensity jitter, noise and a cutout square) goes through the student, which is trained with cross-entropy on the
confident pixels, averaged over all unlabelled pixels (FixMatch's normalisation: a batch with few confident pixels
contributes little), weighted by ``weight`` x a sigmoid ramp-up over the first ``rampup_fraction`` of the steps
(Laine & Aila 2017; Tarvainen & Valpola 2017). Pixels under the cutout keep no pseudo-label (what lies under a grey
square cannot be predicted pixel-wise). The teacher is the trainer's exponential moving average of the student
("Mean teacher", Tarvainen & Valpola 2017: averaged weights give steadier targets than the student's own), in eval
mode; without EMA (``ema_decay`` 0) it is the student itself in eval mode, under ``no_grad`` (plain FixMatch).
Gradients reach the student only.

The labelled and the strong unlabelled crops go through the student in one batch, so BatchNorm sees both (as in
FixMatch). With ``enabled`` False the trainer's supervised path runs unchanged (same random draws, same weights).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ml_backend.training.augment import AugmentConfig, augment_batch, sample_crops
from ml_backend.training.metrics import IGNORE

__all__ = ["SemiConfig", "consistency_loss", "pseudo_labels", "rampup", "strong_view", "unlabelled_views"]


@dataclass
class SemiConfig:
    """Semi-supervised term of one fine-tuning (Settings: SEMI_SUPERVISED, SEMI_THRESHOLD, SEMI_WEIGHT,
    SEMI_UNLABELLED_BATCH; the strengths below are FixMatch-like and not settings)."""

    enabled: bool = False
    threshold: float = 0.95  # FixMatch's tau; 1.0: no pixel is confident (the term is off)
    weight: float = 1.0  # lambda_u
    unlabelled_batch: int = 8  # unlabelled crops per step (FixMatch: mu x the labelled batch; CPU: 1x)
    rampup_fraction: float = 0.2  # of the steps, sigmoid ramp-up of lambda_u from 0
    contrast: float = 0.4  # strong view: multiplicative jitter in [1 - c, 1 + c]
    brightness: float = 0.2  # additive jitter in [-b, b]
    noise: float = 0.08  # max std of additive Gaussian noise
    cutout: float = 0.5  # max side of the cutout square as a fraction of the crop (0: no cutout)

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"semi threshold must be in (0, 1], got {self.threshold}")
        if self.weight < 0 or self.unlabelled_batch < 1 or not 0.0 <= self.rampup_fraction <= 1.0:
            raise ValueError(f"invalid SemiConfig: {self}")
        if not 0.0 <= self.cutout < 1.0:
            raise ValueError(f"cutout must be in [0, 1), got {self.cutout}")

    @property
    def active(self) -> bool:
        return bool(self.enabled) and self.weight > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rampup(step: int, steps: int, fraction: float) -> float:
    """exp(-5 (1 - t)^2) for t = step / (fraction x steps) < 1, then 1 (Laine & Aila 2017's sigmoid ramp-up)."""
    length = fraction * steps
    if length <= 0 or step >= length:
        return 1.0
    t = max(0.0, step / length)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def pseudo_labels(teacher_logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (N, H, W) int64, confident (N, H, W) bool): the arg-max where the max probability >= ``threshold``.

    Threshold 1.0 marks no pixel confident: float32 softmax rounds to exactly 1 for saturated logits, and 1.0 is the
    documented "off" value."""
    probs = teacher_logits.detach().float().softmax(dim=1)
    conf, labels = probs.max(dim=1)
    confident = conf >= threshold if threshold < 1.0 else torch.zeros_like(conf, dtype=torch.bool)
    return labels, confident


def consistency_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    threshold: float,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """(loss, confident fraction): cross-entropy of the student on the teacher's confident pixels, summed and divided
    by all pixels (FixMatch's mean over the unlabelled batch); ``keep`` False pixels (the cutout) never count.
    The teacher's logits are detached: no gradient reaches the teacher."""
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 4:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ")
    labels, confident = pseudo_labels(teacher_logits, threshold)
    if keep is not None:
        confident = confident & keep
    target = torch.where(confident, labels, torch.full_like(labels, IGNORE))
    per_pixel = F.cross_entropy(student_logits.float(), target, ignore_index=IGNORE, reduction="none")
    loss = per_pixel.sum() / max(1, per_pixel.numel())
    return loss, float(confident.float().mean())


def strong_view(weak: torch.Tensor, generator: torch.Generator, cfg: SemiConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(strong images (N, C, H, W), keep (N, H, W) bool): strong intensity jitter, noise and one cutout square per
    sample (filled with the sample's mean; ``keep`` False under it). No geometry: the view stays pixel-aligned with
    the weak one, so the teacher's pseudo-labels apply pixel by pixel."""
    n, _, h, w = weak.shape
    dev = weak.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator).to(dev)

    mean = weak.mean(dim=(1, 2, 3), keepdim=True)
    c = 1.0 + (rand(n, 1, 1, 1) * 2 - 1) * cfg.contrast
    b = (rand(n, 1, 1, 1) * 2 - 1) * cfg.brightness
    x = (weak - mean) * c + mean + b
    if cfg.noise > 0:
        x = x + torch.randn(x.shape, generator=generator).to(dev) * (rand(n, 1, 1, 1) * cfg.noise)
    keep = torch.ones((n, h, w), dtype=torch.bool, device=dev)
    if cfg.cutout > 0:
        side = (rand(n) * cfg.cutout * min(h, w)).long().clamp(min=1)
        y0 = (rand(n) * (h - side + 1).float()).long()
        x0 = (rand(n) * (w - side + 1).float()).long()
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        box = (
            (ys >= y0.view(n, 1, 1))
            & (ys < (y0 + side).view(n, 1, 1))
            & (xs >= x0.view(n, 1, 1))
            & (xs < (x0 + side).view(n, 1, 1))
        )
        x = torch.where(box.unsqueeze(1), mean.expand_as(x), x)
        keep = ~box
    return x.contiguous(), keep


class _ZeroMasks:
    """All-background masks of the images' sizes, built on demand without memory (``sample_crops`` needs masks: the
    padding it adds beyond a small tile comes back as IGNORE, which excludes it from the pseudo-labels)."""

    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = images

    def __getitem__(self, i: int) -> np.ndarray:
        return np.broadcast_to(np.zeros((1, 1), np.int64), np.shape(self.images[i])[-2:])


def unlabelled_views(
    images: list[np.ndarray],
    rng: np.random.Generator,
    generator: torch.Generator,
    crop: int,
    cfg: SemiConfig,
    augment: AugmentConfig,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weak, strong, keep) for ``cfg.unlabelled_batch`` random crops of random unlabelled ``images``.

    Weak: the labelled recipe's geometric augmentation (flips, rotations; the elastic warp when on) and no
    intensity change. Strong: ``strong_view`` of the weak view."""
    idx = rng.integers(0, len(images), size=cfg.unlabelled_batch)
    x, m = sample_crops(images, _ZeroMasks(images), idx, crop, rng)  # type: ignore[arg-type]
    geometric = AugmentConfig(
        flip=augment.flip, rot90=augment.rot90, contrast=0.0, brightness=0.0, noise=0.0,
        elastic_prob=augment.elastic_prob, elastic_alpha=augment.elastic_alpha, elastic_grid=augment.elastic_grid,
    )  # fmt: skip
    weak, m = augment_batch(x.to(device), m.to(device), generator, geometric)
    strong, keep = strong_view(weak, generator, cfg)
    return weak, strong, keep & (m != IGNORE)  # crops padded beyond a small tile hold no pseudo-label either
