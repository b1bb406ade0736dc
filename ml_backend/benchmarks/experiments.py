"""Issue 11 evidence: the cold start with 20 initial tiles, with and without SSL pretraining and coverage ordering.

Protocol: the AL benchmark's CPU preset (Roels & Saeys 2019, scaled down): VNC stack1 binned 2x, a pool of 400
non-overlapping 64 px tiles from the training half (y < H/2), test IoU on every 4th slice of the other half (tiled
inference), width-8 BatchNorm U-Net, 900 steps at lr 4e-3 (batch 8) on the 20 initial tiles, BatchNorm statistics
re-estimated on the pool. The same on a generated isotropic volume (``ml_backend.data.volume``, no binning).
Conditions per seed (the pool, the random initial set and the model initialisation are shared):

    random        20 random tiles, random initialisation            (today's cold start)
    random+ssl    the same 20 tiles, SSL-pretrained initialisation  (``ml_backend.training.pretrain``)
    coverage+ssl  the first 20 of ``coverage_order`` on the pretrained embeddings, pretrained initialisation
    coverage      the same coverage tiles, random initialisation    (ablation: selection without pretraining)
    kcenter+ssl   farthest-first (k-center) first 20 instead of TypiClust's typical tiles (opt-in ablation)
    spread+ssl    random order with the stack/feature exclusions only (opt-in ablation)

    python scripts/experiments_issue11.py --data vnc --seeds 0,1,2 --workers 2 --out /tmp/issue11
    python scripts/experiments_issue11.py --data isotropic --seeds 0,1,2 --out /tmp/issue11

VNC is read from --vnc or $VNC_DATA_DIR (default ../shared/data/vnc); it is never copied. Results: one JSON per
(data, seed) under --out/runs and --out/summary.json. Each run resumes from its cached pretraining checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.active_learning.loop import SeedSchedule
from ml_backend.data.stacks import read_labelled_stack
from ml_backend.data.volume import generate_volume
from ml_backend.imaging import normalize
from ml_backend.inference.tiling import predict_tiled
from ml_backend.model import build_model
from ml_backend.strategies.batch import BatchConfig, Neighbourhood, StackPositions, coverage_order
from ml_backend.training import TrainConfig, fine_tune
from ml_backend.training.metrics import confusion_counts, iou_from_counts
from ml_backend.training.pretrain import PretrainConfig, make_batch, pretrain, reconstruction_loss

REPO = Path(__file__).resolve().parents[2]

log = logging.getLogger("issue11")

TILE, POOL, M, TEST_EVERY = 64, 400, 20, 4
WIDTH, DEPTH, DROPOUT, NORM = 8, 4, 0.2, "batch"
INIT_STEPS, INIT_LR = 900, 4e-3
CONDITIONS = ("random", "random+ssl", "coverage+ssl", "coverage", "kcenter+ssl", "spread+ssl")


def vnc_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("VNC_DATA_DIR", REPO.parent / "shared" / "data" / "vnc"))


def load(data: str, vnc: Path) -> tuple[np.ndarray, np.ndarray]:
    """(Z, H, W) normalised float32 raw and uint8 {0, 1} masks."""
    from skimage.transform import downscale_local_mean

    if data == "vnc":
        if not (vnc / "stack1" / "raw").is_dir():
            raise SystemExit(f"VNC data not found at {vnc} (set --vnc or VNC_DATA_DIR)")
        raw, masks = read_labelled_stack(vnc / "stack1" / "raw", vnc / "stack1" / "mitochondria")
        f = (1, 2, 2)
        raw = downscale_local_mean(np.asarray(raw, dtype=np.float32), f)
        masks = (downscale_local_mean(masks.astype(np.float32), f) >= 0.5).astype(np.uint8)
    else:
        vol = generate_volume((32, 384, 384), setting=data, seed=2024)
        raw, masks = vol.image.astype(np.float32), vol.mask
    raw = np.stack([normalize(s) for s in raw]).astype(np.float32)
    return raw, masks


def pool_positions(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """(POOL, 3) z, y, x: a seeded subset of the non-overlapping tile grid of the training half (as al_benchmark)."""
    z, h, w = shape
    half = h // 2
    grid = np.array(
        [(k, y, x) for k in range(z) for y in range(0, half - TILE + 1, TILE) for x in range(0, w - TILE + 1, TILE)]
    )
    rng = np.random.default_rng([seed, 1])
    return grid[np.sort(rng.permutation(len(grid))[: min(POOL, len(grid))])]


def held_out_iou(model, raw: np.ndarray, masks: np.ndarray) -> float:
    import torch

    half = raw.shape[1] // 2
    tp = fp = fn = 0
    for k in range(0, raw.shape[0], TEST_EVERY):
        probs = predict_tiled(model, raw[k, half:], tile=256, overlap=32, device=torch.device("cpu"))
        a, b, c = confusion_counts(probs.argmax(axis=0), masks[k, half:], ignore=None)
        tp, fp, fn = tp + a, fp + b, fn + c
    return iou_from_counts(tp, fp, fn)


def embed(model, tiles: np.ndarray) -> np.ndarray:
    import torch

    model.eval()
    with torch.inference_mode():
        return np.concatenate(
            [model.embed(torch.from_numpy(tiles[i : i + 64])[:, None]).numpy() for i in range(0, len(tiles), 64)]
        )


def fresh(seed: int):
    import torch

    torch.manual_seed(seed)
    return build_model("unet", width=WIDTH, depth=DEPTH, dropout=DROPOUT, norm=NORM)


def run_one(args: tuple[str, int, str, str, int, int, float, str, str]) -> dict[str, Any]:
    data, seed, out_s, vnc_s, pre_steps, init_steps, ft_lr, conditions, pre_dir = args
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(message)s")

    out = Path(out_s)
    path = out / "runs" / f"{data}_seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    raw, masks = load(data, Path(vnc_s))
    pos = pool_positions(raw.shape, seed)
    tiles = np.stack([raw[z, y : y + TILE, x : x + TILE] for z, y, x in pos])
    tmasks = np.stack([masks[z, y : y + TILE, x : x + TILE] for z, y, x in pos]).astype(np.int64)
    rng = np.random.default_rng([seed, 2])
    random_lab = sorted(rng.permutation(len(tiles))[:M].tolist())

    # --- SSL pretraining on the unlabelled pool (cached, resumable)
    pcfg = PretrainConfig(steps=pre_steps, time_budget_s=1e9, seed=seed, crop=TILE)
    t0 = time.monotonic()
    pre_model = fresh(seed)
    ckpt = Path(pre_dir or out / "pretrain") / f"{data}_seed{seed}.pt"
    pre = pretrain(pre_model, list(tiles), pcfg, checkpoint_path=ckpt)
    pre_seconds = time.monotonic() - t0
    chw = [t[None] for t in tiles]
    ident = float(np.mean([reconstruction_loss(*make_batch(chw, pcfg, s), 0.25) for s in range(20)]))
    losses = pre.losses
    pretrain_info = {
        "steps": pre.steps,
        "seconds": pre_seconds,
        "loss_first20": float(np.mean(losses[:20])),
        "loss_last20": float(np.mean(losses[-20:])),
        "identity_baseline": ident,
    }
    log.info("%s seed %d: pretraining %s", data, seed, pretrain_info)

    # --- coverage ordering on the pretrained embeddings (pool positions: one stack)
    emb = embed(pre_model, tiles)
    spos = StackPositions.from_array(np.column_stack([np.zeros(len(pos), np.int64), pos, np.full(len(pos), TILE)]))
    t1 = time.monotonic()
    order = coverage_order(emb, spos, M, config=BatchConfig(neighbourhood=Neighbourhood(z_radius=3)), seed=seed)
    cov_seconds = time.monotonic() - t1
    coverage_lab = sorted(order[:M].tolist())
    # Ablation: pure farthest-first (k-center) from the start instead of TypiClust's typical picks.
    kcenter_lab = sorted(coverage_order(emb, spos, M, seed=seed, method="kcenter")[:M].tolist())
    # Ablation: random order with the stack/feature exclusions only (keeps the pool's class prior).
    spread_lab = sorted(coverage_order(emb, spos, M, seed=seed, method="random")[:M].tolist())

    record: dict[str, Any] = {
        "data": data,
        "seed": seed,
        "ssl_lr": ft_lr or INIT_LR,
        "pretrain": pretrain_info,
        "coverage_seconds": cov_seconds,
    }
    for cond in conditions.split(","):
        lab = {"coverage": coverage_lab, "kcenter": kcenter_lab, "spread": spread_lab}.get(
            cond.split("+")[0], random_lab
        )
        model = fresh(seed)
        if cond.endswith("+ssl"):
            model.load_state_dict(pre.state_dict)
        cfg = TrainConfig(
            steps=init_steps, lr=ft_lr if ft_lr > 0 and cond.endswith("+ssl") else INIT_LR, batch_size=8,
            crop=TILE, val_fraction=0.2,
            eval_every=max(10, init_steps // 5), time_budget_s=1e9, seed=SeedSchedule(seed).train(0), split_seed=seed,
            device="cpu",
        )  # fmt: skip
        t2 = time.monotonic()
        res = fine_tune(model, list(tiles[lab]), list(tmasks[lab]), cfg, calibration_images=list(tiles))
        iou = held_out_iou(model, raw, masks)
        fg = tmasks[lab]
        record[cond] = {
            "test_iou": iou,
            "val_iou": res.metrics["val_iou"],
            "train_seconds": res.seconds,
            "seconds": time.monotonic() - t2,
            "labelled": [int(i) for i in lab],
            "foreground_fraction": float(fg.mean()),
            "tiles_with_foreground": int((fg.reshape(len(lab), -1).max(axis=1) > 0).sum()),
            "distinct_xy": len({(int(pos[i, 1]), int(pos[i, 2])) for i in lab}),
        }
        log.info("%s seed %d %s: test IoU %.3f (fg %.3f)", data, seed, cond, iou, float(fg.mean()))
    record["pool_foreground_fraction"] = float(tmasks.mean())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def summarise(records: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for data in sorted({r["data"] for r in records}):
        rs = sorted((r for r in records if r["data"] == data), key=lambda r: r["seed"])
        d: dict[str, Any] = {"seeds": [r["seed"] for r in rs]}
        for cond in [c for c in CONDITIONS if all(c in r for r in rs)]:
            v = np.array([r[cond]["test_iou"] for r in rs])
            d[cond] = {"per_seed": v.round(4).tolist(), "mean": float(v.mean()), "std": float(v.std())}
            if cond != "random" and all("random" in r for r in rs):
                diff = v - np.array([r["random"]["test_iou"] for r in rs])
                d[cond]["paired_gain_vs_random"] = {"per_seed": diff.round(4).tolist(), "mean": float(diff.mean())}
        d["pretrain"] = [r["pretrain"] for r in rs]
        out[data] = d
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="vnc,isotropic", help="comma list: vnc, isotropic, anisotropic")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--init-steps", type=int, default=INIT_STEPS, help="fine-tuning steps (smoke runs: fewer)")
    ap.add_argument("--ssl-lr", type=float, default=0.0, help="fine-tuning rate from pretrained weights (0: same)")
    ap.add_argument("--conditions", default=",".join(CONDITIONS[:4]))
    ap.add_argument("--pretrain-dir", default="", help="pretraining checkpoints (default: OUT/pretrain); reused")
    ap.add_argument("--vnc", default=None)
    ap.add_argument("--out", default="/tmp/issue11")
    return ap.parse_args(argv)


def jobs_of(a: argparse.Namespace) -> list[tuple[str, int, str, str, int, int, float, str, str]]:
    """``run_one``'s arguments for every (data, seed) of the command line, data sets outermost."""
    return [
        (d, int(s), a.out, str(vnc_dir(a.vnc)), a.pretrain_steps, a.init_steps, a.ssl_lr, a.conditions, a.pretrain_dir)
        for d in a.data.split(",")
        for s in a.seeds.split(",")
    ]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    jobs = jobs_of(a)
    if a.workers > 1:
        with mp.get_context("spawn").Pool(a.workers) as pool:
            records = pool.map(run_one, jobs, chunksize=1)
    else:
        records = [run_one(j) for j in jobs]
    done = [json.loads(p.read_text()) for p in sorted((Path(a.out) / "runs").glob("*.json"))]
    summary = summarise(done or records)
    (Path(a.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
