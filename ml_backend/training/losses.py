"""Training loss for EM segmentation with few, partially painted labels.

Cross-entropy with ``ignore_index=IGNORE`` is the "mixed"/partial cross-entropy of the literature: unpainted pixels
(sparse label config) contribute neither to the loss nor to its gradient. Mitochondria cover only ~5% of the
pixels, so plain cross-entropy is dominated by easy background and under-segments; a soft Dice term on the
foreground classes (computed over the whole batch and over known pixels only) counteracts that imbalance without
hand-tuned class weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ml_backend.training.metrics import IGNORE


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore: int = IGNORE, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of the foreground classes (mean over classes 1..C-1), over known pixels of the whole batch.

    Batch-level sums (not per image) keep the term defined and stable for crops that contain no foreground.
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    known = (target != ignore).unsqueeze(1).to(probs.dtype)  # (N,1,H,W)
    safe_target = target.clamp(min=0)
    onehot = F.one_hot(safe_target, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    probs = probs[:, 1:] * known
    onehot = onehot[:, 1:] * known
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2.0 * inter + eps) / (denom + eps)).mean()


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    dice_weight: float = 1.0,
    class_weights: torch.Tensor | None = None,
    ignore: int = IGNORE,
) -> torch.Tensor:
    """Partial cross-entropy + ``dice_weight`` * soft foreground Dice; IGNORE pixels excluded from both.

    logits: (N, C, H, W); target: (N, H, W) int64 with values in 0..C-1 or ``ignore``. Returns 0 (with a graph) when
    no pixel is known, so a batch of unlabelled crops is harmless.
    """
    if (
        logits.ndim != 4
        or target.ndim != 3
        or logits.shape[0] != target.shape[0]
        or logits.shape[2:] != target.shape[1:]
    ):
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    target = target.long()
    if not bool((target != ignore).any()):
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits.float(), target, weight=class_weights, ignore_index=ignore)
    if dice_weight <= 0:
        return ce
    return ce + dice_weight * soft_dice_loss(logits, target, ignore=ignore)
