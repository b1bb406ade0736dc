"""Scoring throughput (tiles/s) of every acquisition strategy on the same pool, in one run.

Two phases, both on the same inputs for every strategy:

1. summarize + select on synthetic probability maps (smooth random fields through a sigmoid, like a segmentation
   network's output; MC-dropout passes and ensemble members are perturbations of the same field; clustered
   embeddings). This is the numpy part that must not be dominated by Python loops. Map generation is not timed;
   a few distinct chunks of maps are generated and reused cyclically (embeddings are fresh per chunk). Also times
   the queue scores of the whole pool (``pool_queue_scores``).
2. score_pool with a real (untrained) U-Net on fewer tiles: model forward passes + summarize + select, i.e. what
   the rescoring job pays per tile (bald: encoder once + decoder 1 + T; suggestive: + E ensemble forwards).

Writes a Markdown report (command, machine, figures) to --output.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from ml_backend.benchmarks.machine import describe_text
from ml_backend.config import torch_device
from ml_backend.model import build_model
from ml_backend.strategies import (
    PassConfig,
    PoolBatch,
    available_strategies,
    forward_passes,
    get_strategy,
    pool_queue_scores,
    score_pool,
)

log = logging.getLogger("bench_strategies")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pool", type=int, default=2000, help="tiles in the synthetic pool (phase 1)")
    p.add_argument("--size", type=int, default=256, help="tile size in pixels (square)")
    p.add_argument("--chunk", type=int, default=50, help="tiles per summarize call (bounded memory, as score_pool)")
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--distinct-chunks", type=int, default=4, help="distinct generated map chunks, reused cyclically")
    p.add_argument("--mc-passes", type=int, default=8, help="T for bald")
    p.add_argument("--ensemble", type=int, default=4, help="E for suggestive (Yang et al. use 4)")
    p.add_argument("--embed-dim", type=int, default=256, help="embedding D (width 16 x 2**4 for the default U-Net)")
    p.add_argument("--k", type=int, default=20, help="tiles selected per round (Roels & Saeys: 20)")
    p.add_argument("--model-tiles", type=int, default=16, help="tiles for phase 2 (real U-Net); 0 skips it")
    p.add_argument("--repeats", type=int, default=2, help="phase 2 runs per strategy; the fastest counts")
    p.add_argument("--model-batch", type=int, default=8)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--strategies", default="all", help="comma-separated names, or 'all'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", type=Path, default=Path("benchmarks/strategies.md"))
    return p.parse_args(argv)


def block_field(rng: np.random.Generator, n: int, size: int, cells: int) -> np.ndarray:
    """(n, size, size) float32 piecewise-constant random field (cheap perturbations for MC/ensemble members)."""
    low = rng.normal(size=(n, cells, cells)).astype(np.float32)
    rep = size // cells
    return np.repeat(np.repeat(low, rep, axis=1), rep, axis=2)


def smooth_field(rng: np.random.Generator, n: int, size: int, cells: int = 16) -> np.ndarray:
    """(n, size, size) float32 smooth random field: low-res noise upsampled by repetition then box-blurred."""
    rep = size // cells
    field = block_field(rng, n, size, cells)
    # separable running mean over `rep` pixels smooths the blocks (cumsum: O(pixels), no per-pixel Python)
    for axis in (1, 2):
        c = np.cumsum(field, axis=axis, dtype=np.float32)
        shifted = np.roll(c, rep, axis=axis)
        idx = [slice(None)] * 3
        idx[axis] = slice(0, rep)
        shifted[tuple(idx)] = 0.0
        field = (c - shifted) / rep
    return field


def make_chunk(rng, n, size, classes, t, e, centres):
    """A PoolBatch of synthetic segmentation-like outputs with every field filled."""
    def probs_from(logit_fg: np.ndarray) -> np.ndarray:
        if classes == 2:
            p = 1.0 / (1.0 + np.exp(-logit_fg))
            return np.stack([1.0 - p, p], axis=-3).astype(np.float32)
        logits = np.stack([logit_fg * (c - (classes - 1) / 2) for c in range(classes)], axis=-3)
        z = np.exp(logits - logits.max(axis=-3, keepdims=True))
        return (z / z.sum(axis=-3, keepdims=True)).astype(np.float32)

    # sharpness varies per tile, so tiles differ in uncertainty (some confident, some not)
    sharp = rng.uniform(1.0, 12.0, size=(n, 1, 1)).astype(np.float32)
    base = smooth_field(rng, n, size) * sharp - 2.0  # mostly background, ~5-20% foreground
    mc = np.stack([base + 1.5 * block_field(rng, n, size, cells=32) for _ in range(t)])
    ens = np.stack([base + 2.0 * block_field(rng, n, size, cells=8) for _ in range(e)])
    labels = rng.integers(0, centres.shape[0], size=n)
    emb = np.maximum(centres[labels] + 0.3 * rng.normal(size=(n, centres.shape[1])), 0.0).astype(np.float32)
    return PoolBatch(probs=probs_from(base), mc_probs=probs_from(mc), embeddings=emb, ensemble_probs=probs_from(ens))


def phase_numpy(args, names) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(args.seed)
    centres = np.abs(rng.normal(size=(20, args.embed_dim))) * 2.0
    strategies = {name: get_strategy(name) for name in names}
    t_sum = dict.fromkeys(names, 0.0)
    summaries: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in names}
    t_gen = 0.0
    cache: list = []
    for chunk_idx, start in enumerate(range(0, args.pool, args.chunk)):
        n = min(args.chunk, args.pool - start)
        t0 = time.perf_counter()
        if chunk_idx < args.distinct_chunks:
            cache.append(make_chunk(rng, args.chunk, args.size, args.classes, args.mc_passes, args.ensemble, centres))
        maps = cache[chunk_idx % len(cache)]
        # pixel maps are reused cyclically (timing does not depend on content); embeddings are fresh per chunk
        labels = rng.integers(0, centres.shape[0], size=n)
        emb = np.maximum(centres[labels] + 0.3 * rng.normal(size=(n, centres.shape[1])), 0.0).astype(np.float32)
        batch = PoolBatch(
            probs=maps.probs[:n],
            mc_probs=maps.mc_probs[:, :n],
            embeddings=emb,
            ensemble_probs=maps.ensemble_probs[:, :n],
        )
        t_gen += time.perf_counter() - t0
        for name, strategy in strategies.items():
            t0 = time.perf_counter()
            summaries[name].append(strategy.summarize(batch))
            t_sum[name] += time.perf_counter() - t0
        log.info("phase 1: %d/%d tiles summarised", start + n, args.pool)
    log.info("phase 1: generating the synthetic maps took %.1f s (not counted)", t_gen)
    labelled = np.maximum(centres[:5] + 0.3 * rng.normal(size=(5, args.embed_dim)), 0.0)
    results = {}
    for name, strategy in strategies.items():
        summary = {key: np.concatenate([s[key] for s in summaries[name]]) for key in summaries[name][0]}
        t0 = time.perf_counter()
        strategy.select(summary, args.k, labelled_embeddings=labelled, seed=args.seed)
        t_sel = time.perf_counter() - t0
        t0 = time.perf_counter()
        pool_queue_scores(
            strategy,
            summary,
            num_classes=args.classes,
            num_pixels=args.size**2,
            labelled_embeddings=labelled,
            seed=args.seed,
        )
        t_rank = time.perf_counter() - t0
        results[name] = {
            "summarize_s": t_sum[name],
            "select_s": t_sel,
            "rank_all_s": t_rank,
            "tiles_per_s": args.pool / (t_sum[name] + t_sel),
        }
        log.info("phase 1: %s done", name)
    return results


def phase_model(args, names) -> dict[str, dict[str, float]]:
    import torch

    device = torch_device(args.device)
    torch.manual_seed(args.seed)
    model = build_model("unet", width=args.width, depth=args.depth).to(device).eval()
    ensemble = []
    for member in range(args.ensemble):
        torch.manual_seed(args.seed + 1 + member)
        ensemble.append(build_model("unet", width=args.width, depth=args.depth).to(device).eval())
    rng = np.random.default_rng(args.seed)
    tiles = rng.random((args.model_tiles, args.size, args.size)).astype(np.float32)
    score_pool(model, tiles[: args.model_batch], "entropy", passes=PassConfig(device, args.model_batch))  # warm-up
    results = {}
    for name in names:
        strategy = get_strategy(name)
        seconds = float("inf")
        for _ in range(max(1, args.repeats)):  # the fastest run is the least disturbed by other jobs
            t0 = time.perf_counter()
            summary = score_pool(
                model,
                tiles,
                strategy,
                passes=PassConfig(device=device, batch_size=args.model_batch, mc_passes=args.mc_passes),
                ensemble=ensemble,
                seed=args.seed,
            )
            strategy.select(summary, min(args.k, args.model_tiles), seed=args.seed)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = min(seconds, time.perf_counter() - t0)
        passes = forward_passes(strategy, args.mc_passes, args.ensemble)
        results[name] = {"seconds": seconds, "tiles_per_s": args.model_tiles / seconds, **passes}
        log.info("phase 2: %s %.1f s", name, seconds)
    return results


def machine_description(device: str) -> str:
    return describe_text() + ("" if device != "cpu" else " (run on the CPU)")


def render(args, names, numpy_res, model_res, machine: str, command: str, load: str) -> str:
    lines = [
        "# Acquisition-strategy scoring throughput",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine}. Shared with other jobs while it ran (1-min load average {load}), so the figures "
        "are indicative: compare strategies within one run, not across runs.",
        "",
        f"## Phase 1: summarize + select on {args.pool} synthetic {args.size}x{args.size} probability maps",
        "",
        f"C={args.classes}, chunks of {args.chunk} tiles, T={args.mc_passes} MC passes (bald), E={args.ensemble} "
        f"ensemble members (suggestive), D={args.embed_dim} embeddings, k={args.k}. Tiles/s = pool / (summarize + "
        "select). 'Queue scores' = pool_queue_scores for the whole pool (absolute mapping; batch strategies: "
        "select the first 100, the rest by secondary value), what the rescoring job pays after scoring.",
        "",
        "| strategy | summarize (s) | select k (s) | tiles/s | queue scores N (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names:
        r = numpy_res[name]
        lines.append(
            f"| {name} | {r['summarize_s']:.2f} | {r['select_s']:.3f} | {r['tiles_per_s']:.0f} | "
            f"{r['rank_all_s']:.2f} |"
        )
    if model_res:
        lines += [
            "",
            f"## Phase 2: score_pool with a U-Net (width {args.width}, depth {args.depth}, untrained) on "
            f"{args.model_tiles} tiles of {args.size}x{args.size}",
            "",
            f"Batch {args.model_batch}; includes the model forward passes, summarize and select (k="
            f"{min(args.k, args.model_tiles)}); fastest of {max(1, args.repeats)} runs. Passes per tile: "
            "encoder / decoder / full ensemble forwards (suggestive's members are untrained copies here: training "
            "them on bootstrap resamples is the caller's cost, not scoring).",
            "",
            "| strategy | seconds | tiles/s | encoder | decoder | ensemble |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name in names:
            r = model_res[name]
            lines.append(
                f"| {name} | {r['seconds']:.1f} | {r['tiles_per_s']:.2f} | {r['encoder']} | {r['decoder']} | "
                f"{r['ensemble_forward']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    names = available_strategies() if args.strategies == "all" else [s.strip() for s in args.strategies.split(",")]
    unknown = sorted(set(names) - set(available_strategies()))
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; available: {available_strategies()}")
    if args.pool < 1 or args.chunk < 1 or args.k < 1 or args.size % 16:
        raise SystemExit("--pool, --chunk and --k must be >= 1 and --size a multiple of 16")
    load_before = os.getloadavg()[0]
    numpy_res = phase_numpy(args, names)
    model_res = phase_model(args, names) if args.model_tiles > 0 else {}
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    load = f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end, on {os.cpu_count()} CPUs"
    report = render(args, names, numpy_res, model_res, machine_description(args.device), command, load)
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    log.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
