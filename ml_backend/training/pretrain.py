"""Self-supervised pretraining of the U-Net on a project's unlabelled tiles: masked-image + denoising reconstruction.

Why: the first fine-tuning of a project sees ~20 labelled tiles and starts from random weights, so its bottleneck
features are random too (issue 11: test IoU 0.26 on VNC with 20 tiles), and so are the embeddings that diversity
and coverage selection use. Unlabelled tiles of the same stack are free and plentiful.

Method: masked image modelling through the whole encoder-decoder. A random ``mask_ratio`` of ``patch`` x ``patch``
patches of each crop is replaced by the crop's mean, Gaussian noise is added everywhere, and the U-Net (with a 1x1
reconstruction head on its last decoder features, in place of the segmentation head) restores the clean crop;
L1 loss, ``visible_weight`` on the unmasked pixels. This is SimMIM (Xie et al. 2022: random patch masking, a
light prediction head, L1 on masked pixels) adapted to a CNN with skip connections as in Models Genesis (Zhou et
al. 2019: image restoration through a full U-Net for medical images, which pretrains the decoder as well, and
beat contrastive and ImageNet initialisations on small labelled sets). Restoration suits U-Nets better than
contrastive learning: it needs no large batches or negative pairs (CPU, tens of steps per minute) and it trains the
decoder and skips that segmentation fine-tunes. Masked patches must be inpainted from context (the skips carry
no information there), which forces features of the structures (membranes, mitochondria, vesicles); the denoising
term keeps the visible-pixel path non-trivial. Patch size: a few pixels below the object scale (8 px on 64 px
crops after 2x binning; mitochondria are 10-25 px there).

Bounded (``steps``, ``time_budget_s``) and resumable: every ``checkpoint_every`` steps (and when stopping) the
model, head and optimiser states are written atomically to ``checkpoint_path``; a call with the same path continues
from the saved step. Each step's randomness (crops, flips, masks, noise, dropout) is a function of
(``seed``, step), so an interrupted and resumed run equals an uninterrupted one (on the same device and threads).
The returned state dict (encoder, decoder and BatchNorm statistics of the data; the segmentation head untouched)
loads into ``build_model`` of the same configuration for the first fine-tuning.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ml_backend.config import torch_device

log = logging.getLogger(__name__)

__all__ = ["PretrainConfig", "PretrainResult", "pretrain", "reconstruction_loss"]


@dataclass
class PretrainConfig:
    """Hyper-parameters of a pretraining run (defaults: the CPU preset's 64 px tiles, width-8 U-Net)."""

    steps: int = 600
    time_budget_s: float = 180.0  # the quick start must stay ready in minutes
    batch_size: int = 16
    crop: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    patch: int = 8
    mask_ratio: float = 0.5
    noise: float = 0.05  # std of the added Gaussian noise (tiles are normalised to ~[0, 1])
    visible_weight: float = 0.25
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.crop < 8 or self.lr <= 0 or self.patch < 1:
            raise ValueError(f"invalid PretrainConfig: {self}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PretrainResult:
    """``state_dict``: weights for ``build_model(**hparams)``; ``losses``: per-step loss of the whole run (resumed
    runs include the steps before the restart); ``stopped``: "steps" | "time_budget" | "requested"."""

    state_dict: dict[str, torch.Tensor]
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    stopped: str = "steps"
    resumed_from: int = 0


def _lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _as_tiles(tiles: np.ndarray | list[np.ndarray], in_channels: int) -> list[np.ndarray]:
    """Tiles as float32 (C, H, W) arrays; (H, W) tiles are single-channel."""
    out = []
    for i, t in enumerate(tiles):
        a = np.asarray(t, dtype=np.float32)
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3 or a.shape[0] != in_channels or min(a.shape[1:]) < 1:
            raise ValueError(f"tile {i}: expected (H, W) or ({in_channels}, H, W), got {np.shape(t)}")
        if not np.isfinite(a).all():
            raise ValueError(f"tile {i} holds NaN or inf")
        out.append(a)
    if not out:
        raise ValueError("pretraining needs at least one unlabelled tile")
    return out


def make_batch(
    tiles: list[np.ndarray], cfg: PretrainConfig, step: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(corrupted input, clean target, mask (N, 1, crop, crop) float, 1 = masked) for ``step``; a pure function of
    (tiles, cfg.seed, step), which is what makes resumed runs equal uninterrupted ones."""
    rng = np.random.default_rng([cfg.seed, step])
    c = tiles[0].shape[0]
    crop = cfg.crop
    clean = np.zeros((cfg.batch_size, c, crop, crop), dtype=np.float32)
    for j, i in enumerate(rng.integers(0, len(tiles), cfg.batch_size)):
        t = tiles[i]
        h, w = t.shape[1:]
        y0 = int(rng.integers(0, h - crop + 1)) if h > crop else 0
        x0 = int(rng.integers(0, w - crop + 1)) if w > crop else 0
        win = t[:, y0 : y0 + crop, x0 : x0 + crop]
        if win.shape[1:] != (crop, crop):  # small tiles: reflect-pad up to the crop
            win = np.pad(win, ((0, 0), (0, crop - win.shape[1]), (0, crop - win.shape[2])), mode="reflect")
        win = np.rot90(win, int(rng.integers(4)), axes=(1, 2))
        if rng.random() < 0.5:
            win = win[:, :, ::-1]
        clean[j] = win
    g = -(-crop // cfg.patch)
    mask = (rng.random((cfg.batch_size, 1, g, g)) < cfg.mask_ratio).astype(np.float32)
    mask = np.repeat(np.repeat(mask, cfg.patch, axis=2), cfg.patch, axis=3)[:, :, :crop, :crop]
    fill = clean.mean(axis=(2, 3), keepdims=True)
    noisy = clean + cfg.noise * rng.standard_normal(clean.shape).astype(np.float32)
    corrupted = np.where(mask > 0, fill, noisy).astype(np.float32)
    return torch.from_numpy(corrupted), torch.from_numpy(clean), torch.from_numpy(mask)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, visible_weight: float):
    """L1 on masked pixels (SimMIM) + ``visible_weight`` x L1 on the visible (noisy) pixels (denoising)."""
    err = (pred - target).abs().mean(dim=1, keepdim=True)
    masked = (err * mask).sum() / mask.sum().clamp_min(1.0)
    visible = (err * (1 - mask)).sum() / (1 - mask).sum().clamp_min(1.0)
    return masked + visible_weight * visible


class _Reconstructor(nn.Module):
    """The U-Net up to its last decoder features (captured at the segmentation head's input) + a 1x1 conv head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Conv2d):
            raise TypeError("pretraining needs a U-Net with a Conv2d segmentation ``head`` (ml_backend.model.UNet)")
        self.model = model
        self.recon = nn.Conv2d(head.in_channels, int(model.hparams["in_channels"]), 1)
        self._feats: torch.Tensor | None = None
        self._hook = head.register_forward_pre_hook(self._capture)

    def _capture(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._feats = args[0]

    def detach_hook(self) -> None:
        """Leave the U-Net as it was (no hook left behind for fine-tuning)."""
        self._hook.remove()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.model(x)
        feats, self._feats = self._feats, None
        assert feats is not None
        return self.recon(feats)


def _save(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pretrain(
    model: nn.Module,
    tiles: np.ndarray | list[np.ndarray],
    config: PretrainConfig | None = None,
    *,
    checkpoint_path: str | Path | None = None,
    progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[float], bool] | None = None,
) -> PretrainResult:
    """Pretrain ``model`` in place on unlabelled normalised tiles ((H, W) or (C, H, W)); returns its state dict.

    ``should_stop(elapsed_s)``, asked every ``log_every`` steps, ends the run early (``stopped="requested"``,
    checkpointed like any other end): the cold start yields to a training that waits for it.

    With ``checkpoint_path`` an existing checkpoint of the same model configuration is resumed from its step (a
    finished run returns at once); progress receives {"step", "steps", "loss", "eta_s", "seconds"} (``eta_s``: to
    the last step or the end of the time budget, whichever comes first).
    """
    cfg = config or PretrainConfig()
    t0 = time.monotonic()
    hp = dict(getattr(model, "hparams", {}))
    data = _as_tiles(tiles, int(hp.get("in_channels", 1)))
    device = torch_device(cfg.device)
    home = next(model.parameters()).device
    net = _Reconstructor(model)
    torch.manual_seed(cfg.seed)  # the reconstruction head's initial weights
    net.recon.reset_parameters()
    net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, losses = 0, []
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    if path is not None and path.exists():
        state = torch.load(path, map_location=device, weights_only=True)
        if state.get("hparams") != hp or state.get("config") != _resumable(cfg):
            raise ValueError(f"checkpoint {path} was written for another model or pretraining configuration")
        net.model.load_state_dict(state["model"])
        net.recon.load_state_dict(state["recon"])
        opt.load_state_dict(state["optimizer"])
        start, losses = int(state["step"]), [float(v) for v in state["losses"]]
        log.info("pretrain: resuming %s at step %d/%d", path, start, cfg.steps)

    def checkpoint(step: int) -> None:
        if path is None:
            return
        _save(
            path,
            {
                "step": step,
                "hparams": hp,
                "config": _resumable(cfg),
                "model": {k: v.detach().cpu() for k, v in net.model.state_dict().items()},
                "recon": {k: v.detach().cpu() for k, v in net.recon.state_dict().items()},
                "optimizer": opt.state_dict(),
                "losses": losses,
            },
        )

    warmup = int(round(cfg.warmup_fraction * cfg.steps))
    try:
        net.train()
        stopped, step = "steps", start
        recent: list[float] = []
        for step in range(start + 1, cfg.steps + 1):
            if time.monotonic() - t0 > cfg.time_budget_s:
                stopped, step = "time_budget", step - 1
                break
            asked = should_stop is not None and step > start + 1 and (step - 1) % max(1, cfg.log_every) == 0
            if asked and should_stop(time.monotonic() - t0):
                stopped, step = "requested", step - 1
                break
            for grp in opt.param_groups:
                grp["lr"] = cfg.lr * _lr_factor(step - 1, cfg.steps, warmup, cfg.min_lr_ratio)
            x, y, m = (t.to(device) for t in make_batch(data, cfg, step))
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout masks: a function of the step too
            loss = reconstruction_loss(net(x), y, m, cfg.visible_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            lv = float(loss.detach())
            losses.append(lv)
            recent.append(lv)
            if step % cfg.checkpoint_every == 0:
                checkpoint(step)
            if progress is not None and (step % max(1, cfg.log_every) == 0 or step == cfg.steps):
                done = step - start
                elapsed = time.monotonic() - t0
                # the run ends at its steps or at its budget, whichever comes first: so does the ETA
                eta = min(elapsed / max(1, done) * (cfg.steps - step), max(0.0, cfg.time_budget_s - elapsed))
                progress(
                    {
                        "step": step,
                        "steps": cfg.steps,
                        "loss": float(np.mean(recent)),
                        "eta_s": eta,
                        "seconds": elapsed,
                    }
                )
                recent = []
        if step > start or (path is not None and not path.exists()):
            checkpoint(step)
    finally:
        net.detach_hook()
    model.to(home).eval()
    seconds = time.monotonic() - t0
    log.info("pretrain: steps %d-%d in %.1fs, stopped by %s", start, step, seconds, stopped)
    state_dict = {k: v.detach().cpu().clone() for k, v in copy.deepcopy(model.state_dict()).items()}
    return PretrainResult(state_dict, step, seconds, losses, stopped, start)


def _resumable(cfg: PretrainConfig) -> dict[str, Any]:
    """The configuration a checkpoint must match to be resumed (the budget and logging may change)."""
    d = cfg.to_dict()
    for key in ("time_budget_s", "log_every", "checkpoint_every", "device"):
        d.pop(key)
    return d
