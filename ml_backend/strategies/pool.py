"""Pool scoring: run the model over unlabelled tiles chunk by chunk and reduce each chunk with ``summarize``.

Forward passes per tile (``forward_passes`` returns the same numbers):

* every strategy: encoder once + decoder once (deterministic eval-mode pass -> ``PoolBatch.probs``); the embedding
  (``model.embed`` = channel-wise spatial mean of the bottleneck) is taken from that same encoder output;
* ``bald`` (and ``hybrid`` with ``uncertainty="bald"``): + T decoder passes with dropout on
  (``model.decode(feats, mc_dropout=True)``), reusing the encoder features, so T passes cost T decoders, not T U-Nets;
* ``suggestive``: + E full forward passes, one per bootstrap ensemble member (``ensemble``; the members are trained
  by the caller on ``bootstrap_indices`` resamples with ``ml_backend.training.fine_tune``).

Only one chunk of pixel maps (batch_size x C x H x W, times T or E) is held at a time; the summaries are small.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ml_backend.config import torch_device

from .base import PoolBatch, Strategy, get_strategy


def forward_passes(strategy: Strategy | str, mc_passes: int = 8, ensemble_size: int = 0) -> dict[str, int]:
    """Network passes per tile that ``score_pool`` runs for ``strategy``: encoder, decoder, full ensemble forwards."""
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
    mc = mc_passes if "mc_probs" in strategy.needs else 0
    ens = ensemble_size if "ensemble_probs" in strategy.needs else 0
    return {"encoder": 1, "decoder": 1 + mc, "ensemble_forward": ens}


def _pad_multiple(model: Any) -> int:
    hparams = getattr(model, "hparams", None) or {}
    depth = hparams.get("depth", getattr(model, "depth", 4))
    return 2 ** int(depth)


def _pad(x, multiple: int):
    """Pad (N, 1, H, W) at the bottom/right to a multiple of ``multiple`` (encode needs it).

    Same rule as ``UNet.forward``/``embed`` (reflect, or replicate for inputs smaller than the pad), so the
    probabilities and embeddings here equal what ``forward`` and ``embed`` give.
    """
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not (ph or pw):
        return x, h, w
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), h, w


@dataclass(frozen=True)
class PassConfig:
    """How ``score_pool`` runs the network: on ``device`` (None: "auto"), ``batch_size`` tiles per forward pass,
    ``mc_passes`` dropout passes for the strategies that need MC samples."""

    device: Any = None
    batch_size: int = 16
    mc_passes: int = 8


def score_pool(
    model: Any,
    images: np.ndarray,
    strategy: Strategy | str,
    *,
    passes: PassConfig = PassConfig(),
    ensemble: Sequence[Any] | None = None,
    progress: bool = False,
    seed: int = 0,
    on_batch: Callable[[int, PoolBatch], None] | None = None,
) -> dict[str, np.ndarray]:
    """Score a pool of tiles (N, H, W) or (N, C, H, W) (2.5D context) float32 (normalised) for ``strategy``;
    returns the concatenated summary.

    ``seed`` seeds the dropout masks of the MC passes (per chunk, without touching the global torch RNG), so the
    result is deterministic. ``on_batch(start_index, batch)`` lets a caller reuse the chunk's probabilities (e.g.
    for pre-annotation masks) without a second forward pass. The model's train/eval mode is restored afterwards.
    ``passes``: device, batch size and MC passes (``PassConfig``).
    """
    device, batch_size, mc_passes = passes.device, passes.batch_size, passes.mc_passes
    import torch

    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
    x_all = np.asarray(images, dtype=np.float32)
    if x_all.ndim == 3:  # (N, H, W): one channel
        x_all = x_all[:, None]
    if x_all.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W) or (N, C, H, W) (2.5D context), got {x_all.shape}")
    if x_all.shape[0] == 0:
        raise ValueError("empty pool: no images to score")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    needs = strategy.needs
    if "mc_probs" in needs and mc_passes < 1:
        raise ValueError(f"strategy {strategy.name!r} needs mc_passes >= 1, got {mc_passes}")
    members = list(ensemble or [])
    if "ensemble_probs" in needs and len(members) < 2:
        raise ValueError(
            f"strategy {strategy.name!r} needs an ensemble of >= 2 models (bootstrap_indices + fine_tune), "
            f"got {len(members)}"
        )
    dev = device if isinstance(device, torch.device) else torch_device(device or "auto")
    multiple = _pad_multiple(model)
    nets = [model, *members] if "ensemble_probs" in needs else [model]
    modes = [net.training for net in nets]
    for net in nets:
        net.to(dev).eval()

    summaries: list[dict[str, np.ndarray]] = []
    starts = range(0, x_all.shape[0], batch_size)
    try:
        with torch.inference_mode():
            for chunk_idx, start in enumerate(tqdm(starts, desc=f"score {strategy.name}", disable=not progress)):
                x = torch.from_numpy(x_all[start : start + batch_size]).to(dev)
                xp, h, w = _pad(x, multiple)
                feats = model.encode(xp)
                probs = torch.softmax(model.decode(feats)[..., :h, :w].float(), dim=1)
                embeddings = feats[-1].float().mean(dim=(2, 3))
                mc_probs = None
                if "mc_probs" in needs:
                    devices = [dev] if dev.type == "cuda" else []
                    with torch.random.fork_rng(devices=devices):
                        torch.manual_seed(seed * 1_000_003 + chunk_idx)
                        mc_probs = (
                            torch.stack(
                                [
                                    torch.softmax(model.decode(feats, mc_dropout=True)[..., :h, :w].float(), dim=1)
                                    for _ in range(mc_passes)
                                ]
                            )
                            .cpu()
                            .numpy()
                        )
                ens_probs = None
                if "ensemble_probs" in needs:
                    ens_probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in members]).cpu().numpy()
                batch = PoolBatch(
                    probs=probs.cpu().numpy(),
                    mc_probs=mc_probs,
                    embeddings=embeddings.cpu().numpy(),
                    ensemble_probs=ens_probs,
                )
                if on_batch is not None:
                    on_batch(start, batch)
                summaries.append(strategy.summarize(batch))
    finally:
        for net, mode in zip(nets, modes, strict=True):
            net.train(mode)
    return {key: np.concatenate([s[key] for s in summaries], axis=0) for key in summaries[0]}
