#!/usr/bin/env python
"""Simulated active learning on a labelled EM volume: learning curves of every acquisition strategy.

Protocol (Roels & Saeys 2019): split the labelled volume halfway along y into a training half and a test region;
cut a pool of tiles from the training half; train an initial model on m random tiles; then for T rounds let the
strategy pick k tiles from the unlabelled pool, "annotate" them with the ground truth (the oracle), fine-tune the
model from the previous round's weights and measure IoU/Dice on the whole test region (tiled inference). Full
supervision (all pool tiles labelled) is the upper reference. The model (ml_backend.model), the training
(ml_backend.training.fine_tune) and the strategies (ml_backend.strategies) are the product's own code.

Fairness and reproducibility: for every seed, the pool, the initial labelled set and the initial model are shared by
all strategies (the initial model is trained once per seed and cached); round r of every strategy trains with the
same training seed. Each (strategy, seed) run is saved as a JSON file when it finishes, so an interrupted benchmark
resumes where it stopped. Runs execute in worker processes with one torch thread each (deterministic on a machine).

    python scripts/al_benchmark.py --quick                      # <= 5 min smoke run (VNC if present, else synthetic)
    python scripts/al_benchmark.py --workers 2 --seeds 0,1,2    # CPU comparison of all strategies (background!)
    python scripts/al_benchmark.py --preset full                # the papers' full-size protocol (GPU)
    python scripts/al_benchmark.py --report-only --out DIR      # re-aggregate saved runs into tables and plots
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import logging
import multiprocessing as mp
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable without the editable install
    sys.path.insert(0, str(REPO))

log = logging.getLogger("al_benchmark")

# --------------------------------------------------------------------------------------------------- configuration


@dataclass
class Protocol:
    """Everything that determines the numbers of a run (stored in the output dir; resuming requires equality)."""

    data: str = "vnc"  # "vnc" | "folder" | "synthetic"
    images: str = ""
    masks: str = ""
    synthetic_n: int = 8
    synthetic_size: int = 256
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
    },
}

# ------------------------------------------------------------------------------------------------------------ data


@dataclass
class Dataset:
    pool_images: np.ndarray  # (N, tile, tile) float32 normalised
    pool_masks: np.ndarray  # (N, tile, tile) int64 {0, 1}
    pool_positions: np.ndarray  # (N, 3) z, y, x in the training half
    test_images: list[np.ndarray]  # (h, W) float32 slices of the test region
    test_masks: list[np.ndarray]  # (h, W) uint8


def default_vnc_dir() -> Path:
    return Path(os.environ.get("VNC_DATA_DIR", REPO.parent / "shared" / "data" / "vnc"))


def load_volume(p: Protocol) -> tuple[np.ndarray, np.ndarray]:
    """(Z, H, W) normalised float32 raw and (Z, H, W) uint8 {0, 1} masks."""
    from ml_backend.imaging import normalize

    if p.data == "synthetic":
        from ml_backend.data.synthetic import generate_em_like

        raw, masks = generate_em_like(p.synthetic_n, size=p.synthetic_size, seed=12345)
    else:
        from ml_backend.data.stacks import read_labelled_stack

        raw, masks = read_labelled_stack(p.images, p.masks)
    masks = (np.asarray(masks) > 0).astype(np.uint8)
    if p.downsample > 1:  # block means: image binning, and a pixel is foreground when most of its block is
        from skimage.transform import downscale_local_mean

        f = (1, p.downsample, p.downsample)
        raw = downscale_local_mean(np.asarray(raw, dtype=np.float32), f)
        masks = (downscale_local_mean(masks.astype(np.float32), f) >= 0.5).astype(np.uint8)
    raw = np.stack([normalize(np.asarray(s)) for s in raw]).astype(np.float32)
    if raw.shape != masks.shape or raw.ndim != 3:
        raise ValueError(f"raw {raw.shape} and masks {masks.shape} must be equal (Z, H, W) volumes")
    return raw, masks


def pool_positions(shape: tuple[int, int, int], tile: int, pool_size: int, seed: int) -> np.ndarray:
    """Tile corners in the training half (y < H/2): a random subset of the non-overlapping grid when it is large
    enough, else random (overlapping) positions as in the papers' pool of 2000 samples."""
    z, h, w = shape
    half = h // 2
    if half < tile or w < tile:
        raise ValueError(f"volume {shape}: the training half {half}x{w} is smaller than one {tile}x{tile} tile")
    rng = np.random.default_rng([seed, 1])
    grid = np.array(
        [(k, y, x) for k in range(z) for y in range(0, half - tile + 1, tile) for x in range(0, w - tile + 1, tile)]
    )
    if pool_size <= len(grid):
        return grid[np.sort(rng.permutation(len(grid))[:pool_size])]
    ks = rng.integers(0, z, pool_size)
    ys = rng.integers(0, half - tile + 1, pool_size)
    xs = rng.integers(0, w - tile + 1, pool_size)
    return np.stack([ks, ys, xs], axis=1)


def build_dataset(raw: np.ndarray, masks: np.ndarray, p: Protocol, seed: int) -> Dataset:
    pos = pool_positions(raw.shape, p.tile, p.pool_size, seed)
    t = p.tile
    imgs = np.stack([raw[k, y : y + t, x : x + t] for k, y, x in pos])
    msks = np.stack([masks[k, y : y + t, x : x + t] for k, y, x in pos]).astype(np.int64)
    half = raw.shape[1] // 2
    zs = range(0, raw.shape[0], max(1, p.test_every))
    return Dataset(imgs, msks, pos, [raw[k, half:] for k in zs], [masks[k, half:] for k in zs])


_VOLUME: tuple[np.ndarray, np.ndarray] | None = None


def dataset_for(p: Protocol, seed: int) -> Dataset:
    global _VOLUME
    if _VOLUME is None:
        _VOLUME = load_volume(p)
    return build_dataset(*_VOLUME, p, seed)


# ----------------------------------------------------------------------------------------------------- the loop


def _log_progress(tag: str):
    """fine_tune progress callback: one log line per 100 steps (long CPU runs must show they are alive)."""

    def cb(d: dict) -> None:
        if d["step"] % 100 == 0 and d["step"] < d["steps"]:
            val = d.get("val_iou")
            log.info("%s: step %d/%d loss %.3f val IoU %s", tag, d["step"], d["steps"], d["loss"] or 0.0, val)

    return cb


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
    from ml_backend.training import TrainConfig

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
    )


def calibration(ds: Dataset, p: Protocol) -> list[np.ndarray] | None:
    """The unlabelled images BatchNorm statistics are re-estimated on after each training (the product does the
    same with a sample of the project's tasks)."""
    if p.bn_calibration == "pool":
        return list(ds.pool_images)
    if p.bn_calibration == "none":
        return None
    raise ValueError(f"bn_calibration must be 'pool' or 'none', got {p.bn_calibration!r}")


def evaluate_test(model, ds: Dataset, p: Protocol) -> dict[str, float]:
    """IoU / Dice over all pixels of the test slices (tiled inference, counts summed over slices)."""
    from ml_backend.config import torch_device
    from ml_backend.inference.tiling import predict_tiled
    from ml_backend.training.metrics import confusion_counts, dice_from_counts, iou_from_counts

    tp = fp = fn = 0
    dev = torch_device(p.device)
    for img, msk in zip(ds.test_images, ds.test_masks, strict=True):
        probs = predict_tiled(model, img, tile=p.infer_tile, overlap=p.infer_overlap, device=dev)
        a, b, c = confusion_counts(probs.argmax(axis=0), msk, ignore=None)
        tp, fp, fn = tp + a, fp + b, fn + c
    return {"iou": iou_from_counts(tp, fp, fn), "dice": dice_from_counts(tp, fp, fn)}


def _fresh_model(p: Protocol, seed: int):
    import torch

    from ml_backend.model import build_model

    torch.manual_seed(seed)
    return build_model("unet", width=p.width, depth=p.depth, dropout=p.dropout, norm=p.norm)


def initial_labelled(ds: Dataset, p: Protocol, seed: int) -> list[int]:
    rng = np.random.default_rng([seed, 2])
    return sorted(rng.permutation(len(ds.pool_images))[: p.m].tolist())


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def ensure_initial(out: Path, p: Protocol, seed: int) -> Path:
    """Train (once) and cache the initial model of a seed: m random tiles, from scratch, lr ``init_lr``."""
    ckpt = out / "initial" / f"seed{seed}.pt"
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
    from ml_backend.model import save_checkpoint
    from ml_backend.training import fine_tune

    ds = dataset_for(p, seed)
    lab = initial_labelled(ds, p, seed)
    model = _fresh_model(p, seed)
    t0 = time.monotonic()
    res = fine_tune(
        model,
        list(ds.pool_images[lab]),
        list(ds.pool_masks[lab]),
        train_config(p, steps=p.init_steps, lr=p.init_lr, seed=seed * 1000, split_seed=seed),
        progress=_log_progress(f"initial seed {seed}"),
        calibration_images=calibration(ds, p),
    )
    test = evaluate_test(model, ds, p)
    log.info(
        "seed %d: initial model on %d tiles, test IoU %.3f (%.0fs)", seed, len(lab), test["iou"], time.monotonic() - t0
    )
    save_checkpoint(model, ckpt, extra={"labelled": lab, "test": test, "train": res.metrics, "seconds": res.seconds})
    return ckpt


def _record(ds: Dataset, lab: list[int], rnd: int, test: dict, train: dict | None, seconds: dict) -> dict:
    from ml_backend.training.metrics import boundary_length

    masks = ds.pool_masks[lab]
    return {
        "round": rnd,
        "labelled": len(lab),
        "pixels": int(masks.size),
        "foreground_pixels": int(np.count_nonzero(masks)),
        "boundary": float(sum(boundary_length(m) for m in masks)),
        "iou": test["iou"],
        "dice": test["dice"],
        "val_iou": None if train is None else train.get("val_iou"),
        "best_step": None if train is None else train.get("best_step"),
        "seconds": seconds,
    }


def _embed(model, images: np.ndarray, device, batch: int = 32) -> np.ndarray:
    import torch

    out = []
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[s : s + batch]))[:, None].to(device)
            out.append(model.embed(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def run_strategy(out: Path, p: Protocol, strategy_name: str, seed: int) -> dict:
    """One (strategy, seed) learning curve; returns (and saves) its record."""
    import copy

    from ml_backend.config import torch_device
    from ml_backend.model import load_checkpoint
    from ml_backend.strategies import bootstrap_indices, get_strategy, score_pool
    from ml_backend.training import fine_tune

    path = out / "runs" / f"{strategy_name}__seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    t_run = time.monotonic()
    ds = dataset_for(p, seed)
    model, extra = load_checkpoint(ensure_initial(out, p, seed))
    dev = torch_device(p.device)
    model.to(dev)
    strategy = get_strategy(strategy_name)
    lab = list(extra["labelled"])
    rounds = [_record(ds, lab, 0, extra["test"], extra["train"], {"train": extra["seconds"]})]
    n_pool = len(ds.pool_images)
    for rnd in range(1, p.rounds + 1):
        unl = np.array(sorted(set(range(n_pool)) - set(lab)), dtype=np.int64)
        if len(unl) == 0:
            break
        t0 = time.monotonic()
        ensemble = None
        if "ensemble_probs" in strategy.needs:  # suggestive: bootstrap ensemble, bounded by ensemble_steps each
            ensemble = []
            for e, idx in enumerate(bootstrap_indices(len(lab), p.ensemble, seed=seed * 1000 + rnd)):
                member = copy.deepcopy(model)
                sel = [lab[i] for i in idx]
                cfg = train_config(
                    p,
                    steps=p.ensemble_steps,
                    lr=p.lr,
                    seed=seed * 1000 + rnd * 10 + e,
                    split_seed=seed,
                    select="last",
                    val=0.0,
                )
                fine_tune(
                    member,
                    list(ds.pool_images[sel]),
                    list(ds.pool_masks[sel]),
                    cfg,
                    calibration_images=calibration(ds, p),
                )
                ensemble.append(member.to(dev).eval())
        t_ens = time.monotonic() - t0
        summary = score_pool(
            model,
            ds.pool_images[unl],
            strategy,
            device=dev,
            mc_passes=p.mc_passes,
            ensemble=ensemble,
            seed=seed * 1000 + rnd,
        )
        labelled_emb = _embed(model, ds.pool_images[lab], dev) if "embedding" in summary else None
        selection = strategy.select(
            summary, min(p.k, len(unl)), labelled_embeddings=labelled_emb, seed=seed * 1000 + rnd
        )
        picked = unl[selection.order].tolist()
        lab = lab + picked
        t_score = time.monotonic() - t0 - t_ens
        t1 = time.monotonic()
        res = fine_tune(
            model,
            list(ds.pool_images[lab]),
            list(ds.pool_masks[lab]),
            train_config(p, steps=p.steps, lr=p.lr, seed=seed * 1000 + rnd, split_seed=seed),
            progress=_log_progress(f"{strategy_name} seed {seed} round {rnd}"),
            calibration_images=calibration(ds, p),
        )
        t_train = time.monotonic() - t1
        t2 = time.monotonic()
        test = evaluate_test(model.to(dev), ds, p)
        times = {"ensemble": t_ens, "score": t_score, "train": t_train, "test": time.monotonic() - t2}
        rounds.append(_record(ds, lab, rnd, test, res.metrics, times))
        val = res.metrics["val_iou"]
        log.info(
            "%s seed %d round %d/%d: %d tiles, test IoU %.3f (val %s) [ens %.0fs score %.0fs train %.0fs test %.0fs]",
            strategy_name, seed, rnd, p.rounds, len(lab), test["iou"], "-" if val is None else f"{val:.3f}",
            t_ens, t_score, t_train, times["test"],
        )  # fmt: skip
    record = {
        "strategy": strategy_name,
        "seed": seed,
        "params": strategy.params(),
        "rounds": rounds,
        "labelled_order": lab,
        "seconds": time.monotonic() - t_run,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_json(path, record)
    return record


def run_full(out: Path, p: Protocol, seed: int) -> dict:
    """Full supervision: every pool tile labelled, trained from scratch (the upper reference)."""
    from ml_backend.training import fine_tune

    path = out / "runs" / f"full__seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.monotonic()
    ds = dataset_for(p, seed)
    model = _fresh_model(p, seed)
    res = fine_tune(
        model,
        list(ds.pool_images),
        list(ds.pool_masks),
        train_config(
            p, steps=p.full_steps, lr=p.init_lr, seed=seed * 1000, split_seed=seed, batch_size=p.full_batch_size
        ),
        progress=_log_progress(f"full supervision seed {seed}"),
        calibration_images=calibration(ds, p),
    )
    test = evaluate_test(model, ds, p)
    lab = list(range(len(ds.pool_images)))
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
    _atomic_json(path, record)
    return record


# ------------------------------------------------------------------------------------------------- orchestration


def _worker_init(threads: int, level: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(asctime)s %(processName)s %(message)s")


def _job(args: tuple[str, str, dict, str, int]) -> tuple[str, int, float]:
    kind, out, pdict, strategy, seed = args
    p = Protocol(**pdict)
    t0 = time.monotonic()
    if kind == "initial":
        ensure_initial(Path(out), p, seed)
    elif kind == "full":
        run_full(Path(out), p, seed)
    else:
        run_strategy(Path(out), p, strategy, seed)
    return f"{kind}:{strategy}", seed, time.monotonic() - t0


PRIORITY = ("random", "entropy", "effort_aware")


def run_all(out: Path, p: Protocol, strategies: list[str], seeds: list[int], workers: int, max_runs: int | None) -> int:
    """Initial models first (one per seed), then full supervision and (strategy, seed) runs. Returns runs done now."""
    from tqdm.auto import tqdm

    # Order: the strategies the published claims are about first (all seeds), then the reference, then the rest, so
    # that an interrupted benchmark has complete seeds for the comparisons that matter most.
    first = [st for st in PRIORITY if st in strategies]
    rest = [st for st in strategies if st not in first]
    runs = [("run", str(out), asdict(p), st, s) for st in first for s in seeds]
    runs += [("full", str(out), asdict(p), "full", s) for s in p.full_seeds if s in seeds]
    runs += [("run", str(out), asdict(p), st, s) for st in rest for s in seeds]
    runs = [r for r in runs if not (out / "runs" / f"{r[3]}__seed{r[4]}.json").exists()]
    if max_runs is not None:
        runs = runs[:max_runs]
    need = sorted({r[4] for r in runs if r[0] == "run"})  # initial models only for seeds with strategy runs to do
    todo_init = [
        ("initial", str(out), asdict(p), "", s) for s in need if not (out / "initial" / f"seed{s}.pt").exists()
    ]
    log.info("%d initial models and %d runs to do (%d workers)", len(todo_init), len(runs), workers)
    level = log.getEffectiveLevel()
    if workers <= 1:
        _worker_init(torch_threads(), level)
        for job in tqdm(todo_init + runs, desc="benchmark"):
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


# ------------------------------------------------------------------------------------------------------ reporting


def load_runs(out: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*.json"))]


def _curves(runs: list[dict]) -> dict[str, dict[int, dict]]:
    """strategy -> seed -> arrays over rounds."""
    cur: dict[str, dict[int, dict]] = {}
    for r in runs:
        rs = r["rounds"]
        cur.setdefault(r["strategy"], {})[r["seed"]] = {
            key: np.array([x[key] for x in rs], dtype=float)
            for key in ("labelled", "pixels", "boundary", "iou", "dice")
        }
    return cur


def _first_reach(x: np.ndarray, y: np.ndarray, target: float) -> float | None:
    """Smallest x (linear interpolation) where the curve y first reaches target; None if it never does."""
    for i in range(len(y)):
        if y[i] >= target:
            if i == 0:
                return float(x[0])
            f = (target - y[i - 1]) / (y[i] - y[i - 1])
            return float(x[i - 1] + f * (x[i] - x[i - 1]))
    return None


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Per-round table and per-strategy summary (mean over seeds; spreads reported beside)."""
    cur = _curves(runs)
    full = cur.pop("full", {})
    table: list[dict] = []
    mean_curve: dict[str, dict[str, np.ndarray]] = {}
    for st, seeds in cur.items():
        n_r = min(len(v["iou"]) for v in seeds.values())
        stack = {
            key: np.stack([v[key][:n_r] for v in seeds.values()])
            for key in ("labelled", "pixels", "boundary", "iou", "dice")
        }
        mean_curve[st] = {key: a.mean(axis=0) for key, a in stack.items()} | {"iou_std": stack["iou"].std(axis=0)}
        for i in range(n_r):
            table.append(
                {
                    "strategy": st,
                    "round": i,
                    "seeds": len(seeds),
                    "labelled": float(stack["labelled"][:, i].mean()),
                    "pixels": float(stack["pixels"][:, i].mean()),
                    "boundary_mean": float(stack["boundary"][:, i].mean()),
                    "boundary_std": float(stack["boundary"][:, i].std()),
                    "iou_mean": float(stack["iou"][:, i].mean()),
                    "iou_std": float(stack["iou"][:, i].std()),
                    "iou_min": float(stack["iou"][:, i].min()),
                    "iou_max": float(stack["iou"][:, i].max()),
                    "dice_mean": float(stack["dice"][:, i].mean()),
                    "dice_std": float(stack["dice"][:, i].std()),
                }
            )
    full_iou = [float(v["iou"][0]) for v in full.values()]
    summary: dict[str, dict] = {}
    rnd = mean_curve.get("random")
    for st, mc in mean_curve.items():
        seeds = cur[st]
        x, y = mc["labelled"], mc["iou"]
        span = x[-1] - x[0]
        aulc = float(np.trapezoid(y, x) / span) if span > 0 else float(y[0])
        # Spreads: round-to-round movement of each seed's curve, seed-to-seed std per round.
        steps = np.concatenate([np.diff(v["iou"]) for v in seeds.values()])
        entry: dict[str, Any] = {
            "seeds": sorted(seeds),
            "final_labelled": float(x[-1]),
            "final_iou": float(y[-1]),
            "final_iou_std": float(mc["iou_std"][-1]),
            "aulc": aulc,
            "round_to_round_abs_change": float(np.abs(steps).mean()) if len(steps) else 0.0,
            "round_to_round_drops": int((steps < -0.01).sum()),
            "round_to_round_steps": int(len(steps)),
            "seed_std_mean": float(mc["iou_std"].mean()),
            "final_boundary": float(mc["boundary"][-1]),
        }
        if rnd is not None and len(rnd["iou"]) >= 2:
            n = min(len(y), len(rnd["iou"]))
            entry["gain_final_pct"] = float(100 * (y[n - 1] / rnd["iou"][n - 1] - 1)) if rnd["iou"][n - 1] > 0 else None
            gains = [100 * (y[i] / rnd["iou"][i] - 1) for i in range(1, n) if rnd["iou"][i] > 0]
            entry["gain_after_first_pct"] = float(np.mean(gains)) if gains else None
            reach = _first_reach(x, y, float(rnd["iou"][n - 1]))
            entry["labels_to_random_final"] = reach
            entry["label_fraction_of_random"] = None if reach is None else reach / float(rnd["labelled"][n - 1])
        summary[st] = entry
    # Equal boundary-length effort: IoU interpolated on a common effort grid (per seed, then averaged).
    effort: dict[str, Any] = {}
    if cur:
        lo = max(min(v["boundary"][0] for v in s.values()) for s in cur.values())
        hi = min(min(v["boundary"][-1] for v in s.values()) for s in cur.values())
        if hi > lo:
            grid = np.linspace(lo, hi, 25)
            for st, seeds in cur.items():
                ys = np.stack([np.interp(grid, v["boundary"], v["iou"]) for v in seeds.values()])
                effort[st] = {
                    "auc": float(np.trapezoid(ys.mean(axis=0), grid) / (hi - lo)),
                    "iou_at_max": float(ys.mean(axis=0)[-1]),
                }
            effort["grid"] = [float(lo), float(hi)]
    # Paired comparisons (same seed = same pool, initial set and model): per-seed differences, then mean +- std.
    for st, seeds in cur.items():
        for ref in ("random", "entropy"):
            if ref not in cur or ref == st:
                continue
            d_auc, d_eff = [], []
            for sd, v in seeds.items():
                w = cur[ref].get(sd)
                if w is None:
                    continue
                n = min(len(v["iou"]), len(w["iou"]))
                span = v["labelled"][n - 1] - v["labelled"][0]
                if span > 0:
                    a = np.trapezoid(v["iou"][:n], v["labelled"][:n]) - np.trapezoid(w["iou"][:n], w["labelled"][:n])
                    d_auc.append(a / span)
                e_lo, e_hi = max(v["boundary"][0], w["boundary"][0]), min(v["boundary"][-1], w["boundary"][-1])
                if e_hi > e_lo:  # mean IoU difference at equal boundary-length effort, on the pair's common range
                    g = np.linspace(e_lo, e_hi, 50)
                    diff = np.interp(g, v["boundary"], v["iou"]) - np.interp(g, w["boundary"], w["iou"])
                    d_eff.append(float(np.mean(diff)))
            entry = summary[st]
            if d_auc:
                entry[f"paired_aulc_gain_vs_{ref}"] = [float(np.mean(d_auc)), float(np.std(d_auc)), len(d_auc)]
            if d_eff:
                entry[f"equal_effort_iou_gain_vs_{ref}"] = [float(np.mean(d_eff)), float(np.std(d_eff)), len(d_eff)]
    return {
        "table": table,
        "summary": summary,
        "effort": effort,
        "full_supervision": {"iou": full_iou, "mean": float(np.mean(full_iou)) if full_iou else None},
    }


CURVE_COLUMNS = [
    "strategy", "round", "seeds", "labelled", "pixels", "boundary_mean", "boundary_std",
    "iou_mean", "iou_std", "iou_min", "iou_max", "dice_mean", "dice_std",
]  # fmt: skip


def write_outputs(out: Path, runs: list[dict], protocol: Protocol | None = None) -> dict[str, Any]:
    """curves.csv, summary.csv, results.json, iou_vs_tiles.png, iou_vs_effort.png under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = summarize(runs)
    if not runs:
        raise SystemExit(f"no finished runs under {out / 'runs'}")
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CURVE_COLUMNS)
        w.writeheader()
        w.writerows(rep["table"])
    cols = [
        "strategy", "seeds", "final_labelled", "final_iou", "final_iou_std", "aulc", "gain_final_pct",
        "gain_after_first_pct", "labels_to_random_final", "label_fraction_of_random", "effort_auc",
        "round_to_round_abs_change", "round_to_round_drops", "seed_std_mean",
    ]  # fmt: skip
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for st, e in rep["summary"].items():
            w.writerow(
                {"strategy": st, **e, "seeds": len(e["seeds"]), "effort_auc": rep["effort"].get(st, {}).get("auc")}
            )
    meta = {"protocol": asdict(protocol) if protocol else None, "machine": machine_info()}
    _atomic_json(out / "results.json", {**meta, **rep, "runs": runs})
    (out / "summary.md").write_text(markdown_report(rep, runs))
    by = {}
    for row in rep["table"]:
        by.setdefault(row["strategy"], []).append(row)
    for xkey, fname, xlabel in (
        ("labelled", "iou_vs_tiles.png", "labelled tiles"),
        ("boundary_mean", "iou_vs_effort.png", "annotated boundary length (pixels, effort)"),
    ):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for st, rows in sorted(by.items()):
            x = np.array([r[xkey] for r in rows])
            y = np.array([r["iou_mean"] for r in rows])
            s = np.array([r["iou_std"] for r in rows])
            style = {"lw": 2.5, "color": "black"} if st == "random" else {"lw": 1.5}
            ax.plot(x, y, marker="o", ms=3, label=f"{st} (n={rows[0]['seeds']})", **style)
            ax.fill_between(x, y - s, y + s, alpha=0.12, color=ax.lines[-1].get_color())
        if rep["full_supervision"]["mean"] is not None:
            ax.axhline(rep["full_supervision"]["mean"], ls="--", color="grey", label="full supervision")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test IoU (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
    return rep


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def markdown_report(rep: dict[str, Any], runs: list[dict]) -> str:
    """Markdown tables for benchmarks/active_learning.md: summary per strategy and every seed's curve."""
    lines = [
        f"Full supervision IoU: {', '.join(_fmt(v) for v in rep['full_supervision']['iou']) or '-'}",
        "",
        "| strategy | seeds | final tiles | final IoU (mean ± std) | AULC | gain vs random, final | gain vs random, "
        "rounds > 0 | tiles to random's final IoU | IoU-vs-effort AUC | mean abs. round-to-round change | drops "
        "> 0.01 | seed std (mean over rounds) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for st, e in sorted(rep["summary"].items(), key=lambda kv: -kv[1]["aulc"]):
        lines.append(
            f"| {st} | {len(e['seeds'])} | {e['final_labelled']:.0f} | {e['final_iou']:.3f} ± {e['final_iou_std']:.3f} "
            f"| {e['aulc']:.3f} | {_fmt(e.get('gain_final_pct'), '+.1f')}% "
            f"| {_fmt(e.get('gain_after_first_pct'), '+.1f')}% "
            f"| {_fmt(e.get('labels_to_random_final'), '.0f')} | {_fmt(rep['effort'].get(st, {}).get('auc'))} "
            f"| {e['round_to_round_abs_change']:.3f} | {e['round_to_round_drops']}/{e['round_to_round_steps']} "
            f"| {e['seed_std_mean']:.3f} |"
        )
    lines += [
        "",
        "Paired per-seed differences (mean ± std over seeds, IoU points): AULC vs random; IoU at equal boundary effort",
        "(on each pair's common effort range) vs random and vs entropy.",
        "",
        "| strategy | AULC gain vs random | equal-effort gain vs random | equal-effort gain vs entropy |",
        "|---|---|---|---|",
    ]

    def pm(v: list | None) -> str:
        return "-" if not v else f"{v[0]:+.3f} ± {v[1]:.3f} (n={v[2]})"

    for st, e in sorted(rep["summary"].items(), key=lambda kv: -kv[1]["aulc"]):
        lines.append(
            f"| {st} | {pm(e.get('paired_aulc_gain_vs_random'))} | {pm(e.get('equal_effort_iou_gain_vs_random'))} "
            f"| {pm(e.get('equal_effort_iou_gain_vs_entropy'))} |"
        )
    lines += [
        "",
        "Test IoU per round (each seed):",
        "",
        "| strategy | seed | IoU by round | boundary effort by round |",
    ]
    lines.append("|---|---|---|---|")
    for r in sorted(runs, key=lambda r: (r["strategy"], r["seed"])):
        ious = " ".join(f"{x['iou']:.3f}" for x in r["rounds"])
        eff = " ".join(f"{x['boundary']:.0f}" for x in r["rounds"])
        lines.append(f"| {r['strategy']} | {r['seed']} | {ious} | {eff} |")
    return "\n".join(lines) + "\n"


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def print_summary(rep: dict[str, Any]) -> None:
    print(f"full supervision IoU: {rep['full_supervision']}")
    head = ("strategy", "final IoU", "AULC", "gain%", "gain>1%", "labels->rnd", "effortAUC", "r2r")
    print("{:18s} {:>14s} {:>6s} {:>7s} {:>8s} {:>11s} {:>9s} {:>6s}".format(*head))
    for st, e in sorted(rep["summary"].items(), key=lambda kv: -kv[1]["aulc"]):
        g = e.get("gain_final_pct")
        g1 = e.get("gain_after_first_pct")
        lab = e.get("labels_to_random_final")
        eff = rep["effort"].get(st, {}).get("auc", float("nan"))
        print(
            f"{st:18s} {e['final_iou']:.3f}±{e['final_iou_std']:.3f}  {e['aulc']:.3f} "
            f"{'' if g is None else f'{g:+7.1f}':>7s} {'' if g1 is None else f'{g1:+8.1f}':>8s} "
            f"{'never' if lab is None else f'{lab:.0f}':>11s} {eff:9.3f} "
            f"{e['round_to_round_abs_change']:6.3f}"
        )


# ------------------------------------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", help="folder of image slices or multi-page TIFF (default: VNC stack1/raw if present)")
    ap.add_argument("--masks", help="matching masks (default: VNC stack1/mitochondria)")
    ap.add_argument("--synthetic", action="store_true", help="use generated EM-like data instead of files")
    ap.add_argument("--synthetic-n", type=int, help="generated slices")
    ap.add_argument("--synthetic-size", type=int, help="generated slice size")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="protocol size (default: full on GPU, cpu otherwise)")
    ap.add_argument("--quick", action="store_true", help="same as --preset quick, strategies random,entropy, 1 seed")
    ap.add_argument("--strategies", help="comma-separated (default: all registered)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick: 0)")
    ap.add_argument("--out", type=Path, help="output dir (default benchmarks/active_learning/<preset>)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (1 torch thread each by default)")
    ap.add_argument("--max-runs", type=int, help="stop after this many new runs (the rest resumes later)")
    ap.add_argument("--report-only", action="store_true", help="only aggregate the saved runs")
    ap.add_argument("--force", action="store_true", help="allow a different protocol in an existing output dir")
    ap.add_argument("-v", "--verbose", action="store_true")
    for f in Protocol.__dataclass_fields__.values():  # every protocol field can be overridden
        if f.name in {"data", "images", "masks", "synthetic_n", "synthetic_size"}:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "full_seeds":
            ap.add_argument(flag, help="comma-separated seeds that get a full-supervision reference run")
        else:
            ap.add_argument(flag, type=type(f.default) if f.default is not None else str, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def build_protocol(a: argparse.Namespace) -> tuple[Protocol, str]:
    import torch

    preset = "quick" if a.quick else a.preset or ("full" if torch.cuda.is_available() else "cpu")
    p = replace(Protocol(), **PRESETS[preset])
    if a.synthetic:
        p = replace(p, data="synthetic")
        if a.synthetic_n:
            p.synthetic_n = a.synthetic_n
        if a.synthetic_size:
            p.synthetic_size = a.synthetic_size
    elif a.images or a.masks:
        if not (a.images and a.masks):
            raise SystemExit("--images and --masks go together")
        p = replace(p, data="folder", images=str(Path(a.images).resolve()), masks=str(Path(a.masks).resolve()))
    else:
        vnc = default_vnc_dir() / "stack1"
        if (vnc / "raw").is_dir() and (vnc / "mitochondria").is_dir():
            p = replace(p, data="vnc", images=str((vnc / "raw").resolve()), masks=str((vnc / "mitochondria").resolve()))
        elif a.quick or a.report_only:  # report-only reads the saved protocol; it needs no data
            if a.quick:
                log.warning("VNC data not found at %s: quick mode uses generated data", vnc)
            p = replace(p, data="synthetic")
        else:
            raise SystemExit(
                f"VNC data not found at {vnc} (set VNC_DATA_DIR, or give --images/--masks, or --synthetic)"
            )
    for name in Protocol.__dataclass_fields__:
        v = getattr(a, name, None)
        if v is None or name in {"data", "images", "masks", "synthetic_n", "synthetic_size"}:
            continue
        if name == "full_seeds":
            v = [int(s) for s in str(v).split(",") if s.strip() != ""]
        setattr(p, name, v)
    if p.m < 1 or p.k < 1 or p.rounds < 0 or p.pool_size < p.m:
        raise SystemExit(f"invalid protocol: m={p.m} k={p.k} rounds={p.rounds} pool_size={p.pool_size}")
    return p, preset


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO, format="%(asctime)s %(processName)s %(message)s"
    )
    p, preset = build_protocol(a)
    out: Path = a.out or REPO / "benchmarks" / "active_learning" / (
        preset + ("-synthetic" if p.data == "synthetic" else "")
    )
    out.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        saved = out / "protocol.json"
        rep = write_outputs(out, load_runs(out), Protocol(**json.loads(saved.read_text())) if saved.exists() else None)
        print_summary(rep)
        return 0
    from ml_backend.strategies import available_strategies

    names = available_strategies()
    if a.strategies is not None:  # "" = none (e.g. only the full-supervision reference)
        strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    else:
        strategies = ["random", "entropy"] if a.quick else names
    unknown = [s for s in strategies if s not in names]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; available: {', '.join(names)}")
    seeds = [int(s) for s in (a.seeds or ("0" if a.quick else "0,1,2")).split(",")]
    saved = out / "protocol.json"
    if saved.exists() and not a.force:
        old = json.loads(saved.read_text())
        if old != json.loads(json.dumps(asdict(p))):
            diff = {k: (old.get(k), v) for k, v in asdict(p).items() if old.get(k) != v}
            raise SystemExit(f"{out} holds runs of a different protocol {diff}; use another --out or --force")
    _atomic_json(saved, asdict(p))
    log.info("protocol (%s): %s", preset, asdict(p))
    log.info("strategies %s, seeds %s, output %s", strategies, seeds, out)
    t0 = time.monotonic()
    done = run_all(out, p, strategies, seeds, a.workers, a.max_runs)
    log.info("%d runs finished in %.0fs", done, time.monotonic() - t0)
    rep = write_outputs(
        out, [r for r in load_runs(out) if r["strategy"] in strategies + ["full"] and r["seed"] in seeds], p
    )
    print_summary(rep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
