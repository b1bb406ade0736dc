"""Training: partial-label loss, augmentation, metrics and the fine-tuning loop (product and benchmark share it)."""

from ml_backend.training.augment import AugmentConfig, augment_batch, sample_crops
from ml_backend.training.losses import segmentation_loss, soft_dice_loss
from ml_backend.training.metrics import IGNORE, boundary_length, dice, iou
from ml_backend.training.trainer import TrainConfig, TrainResult, evaluate, fine_tune, split_train_val

__all__ = [
    "IGNORE",
    "AugmentConfig",
    "TrainConfig",
    "TrainResult",
    "augment_batch",
    "boundary_length",
    "dice",
    "evaluate",
    "fine_tune",
    "iou",
    "sample_crops",
    "segmentation_loss",
    "soft_dice_loss",
    "split_train_val",
]
