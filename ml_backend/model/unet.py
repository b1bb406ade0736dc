"""2D U-Net for EM segmentation.

Design choices (and why):
- Normalisation is a choice (``norm``). GroupNorm (the class default) does not depend on the batch, but it
  normalises every tile on its own and so discards how dark a tile is relative to its section, which is what
  separates mitochondria from other dark structures: on VNC a width-8 U-Net with GroupNorm underfits (full
  supervision 0.59 test IoU, 0.77 on its training tiles) where BatchNorm reaches 0.74 (0.84) at equal steps.
  The product therefore builds BatchNorm U-Nets (``MODEL_NORM=batch``) and re-estimates their statistics on
  unlabelled tiles after training (``training.recalibrate_batchnorm``); benchmarks/active_learning.md has the figures.
- Dropout only in the decoder, applied functionally so that ``decode(feats, mc_dropout=True)`` keeps it on in eval
  mode: Monte-Carlo dropout runs the (expensive) encoder once and the decoder T times.
- ``encode``/``decode``/``embed`` are public so acquisition strategies can reuse bottleneck features (k-means,
  core-set, suggestive annotation) without a second forward pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("group", "batch", "instance", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        # Largest group count <= 8 that divides the channels: 8 groups is the usual default, narrow models need fewer.
        groups = next(g for g in range(min(8, channels), 0, -1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")


class ConvBlock(nn.Sequential):
    """Two 3x3 conv + norm + ReLU: the standard U-Net stage."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        bias = norm == "none"  # a bias right before a normalisation layer is redundant
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net with ``depth`` down-sampling steps; channels ``width * 2**level``.

    ``encode`` returns ``depth`` skip tensors (full resolution first) followed by the bottleneck
    (``width * 2**depth`` channels at 1/2**depth resolution).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        width: int = 16,
        depth: int = 4,
        dropout: float = 0.2,
        norm: str = "group",
        context_offsets: list[int] | tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2 or width < 1 or depth < 1:
            raise ValueError(
                f"invalid UNet hyper-parameters: in_channels={in_channels} (>=1), num_classes={num_classes} (>=2), "
                f"width={width} (>=1), depth={depth} (>=1)"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        self.hparams: dict[str, Any] = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "width": width,
            "depth": depth,
            "dropout": float(dropout),
            "norm": norm,
        }
        if context_offsets is not None:  # 2.5D context: which slices the input channels are (kept in checkpoints)
            offsets = [int(o) for o in context_offsets]
            if len(offsets) != in_channels or 0 not in offsets or len(set(offsets)) != len(offsets):
                raise ValueError(
                    f"context_offsets {offsets} must be {in_channels} distinct slice offsets including 0 (one per "
                    "input channel)"
                )
            self.hparams["context_offsets"] = offsets
        self.depth = depth
        self.dropout = float(dropout)
        chans = [width * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList()
        prev = in_channels
        for c in chans[:-1]:
            self.encoders.append(ConvBlock(prev, c, norm))
            prev = c
        self.bottleneck = ConvBlock(chans[-2], chans[-1], norm)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            self.upsamplers.append(nn.ConvTranspose2d(chans[level + 1], chans[level], 2, stride=2))
            self.decoders.append(ConvBlock(2 * chans[level], chans[level], norm))
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    @property
    def embedding_dim(self) -> int:
        """Length D of ``embed``'s vectors."""
        return self.hparams["width"] * 2**self.depth

    @property
    def multiple(self) -> int:
        """Spatial sizes ``encode`` accepts are multiples of this."""
        return 2**self.depth

    def encode(self, x: Tensor) -> list[Tensor]:
        """[skip_0, ..., skip_{depth-1}, bottleneck]; H and W must be multiples of ``2**depth``."""
        if x.ndim != 4:
            raise ValueError(f"expected input of shape (N, C, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ValueError(f"encode needs H, W multiples of {self.multiple} (got {h}x{w}); forward() takes any size")
        feats: list[Tensor] = []
        for block in self.encoders:
            x = block(x)
            feats.append(x)
            x = F.max_pool2d(x, 2)
        feats.append(self.bottleneck(x))
        return feats

    def decode(self, feats: list[Tensor], mc_dropout: bool = False) -> Tensor:
        """Logits from ``encode``'s features. ``mc_dropout=True`` keeps decoder dropout on even in eval mode."""
        if len(feats) != self.depth + 1:
            raise ValueError(f"decode expects {self.depth + 1} feature maps, got {len(feats)}")
        active = self.training or mc_dropout
        x = feats[-1]
        for up, block, skip in zip(self.upsamplers, self.decoders, reversed(feats[:-1]), strict=True):
            x = torch.cat([up(x), skip], dim=1)
            if self.dropout > 0:
                x = F.dropout2d(x, self.dropout, training=active)
            x = block(x)
        return self.head(x)

    def _pad(self, x: Tensor) -> tuple[Tensor, int, int]:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            # Reflection keeps image statistics at the border; it needs pad < size, so tiny inputs replicate.
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        return x, h, w

    def forward(self, x: Tensor, mc_dropout: bool = False) -> Tensor:
        """Logits (N, num_classes, H, W) for any H, W (padded to a multiple of ``2**depth``, cropped back)."""
        if x.ndim != 4:
            raise ValueError(f"expected input of shape (N, C, H, W), got {tuple(x.shape)}")
        x, h, w = self._pad(x)
        return self.decode(self.encode(x), mc_dropout=mc_dropout)[..., :h, :w]

    def embed(self, x: Tensor) -> Tensor:
        """(N, D) channel-wise spatial mean of the bottleneck, for embedding-based acquisition strategies."""
        x, _, _ = self._pad(x)
        return self.encode(x)[-1].mean(dim=(2, 3))
