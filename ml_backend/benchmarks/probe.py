"""Probe the training recipe: full supervision on the benchmark's pool, with the test region's IoU printed as it trains.

A diagnostic for the AL benchmark's
(``ml_backend.benchmarks``) full-supervision reference: it trains the product's U-Net with the product's
`fine_tune` on every pool tile of the CPU preset (VNC stack1, 2x binned, 64 px tiles, 400 tiles) and reports test
IoU every tenth of the run, plus the final IoU on the training tiles (under- or over-fitting?). The test slices are
only watched here, never used for a decision (the last weights are kept), so the numbers are the ones a fixed
number of steps gives. Example (the figures in benchmarks/active_learning.md, 'Why BatchNorm'):

    python scripts/full_supervision_probe.py --norm group --batch-size 32 --steps 2000
    python scripts/full_supervision_probe.py --norm batch --batch-size 32 --steps 2000
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from ml_backend.active_learning.loop import SeedSchedule
from ml_backend.benchmarks import data, protocol, run
from ml_backend.model import build_model
from ml_backend.training import TrainConfig, evaluate, fine_tune
from ml_backend.training.augment import AugmentConfig
from ml_backend.training.trainer import ValidationTiles


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--norm", default="batch", help="U-Net normalisation: batch, group, instance, none")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--no-augment", action="store_true", help="no flips, rotations or intensity jitter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    vnc = data.default_vnc_dir() / "stack1"
    if not (vnc / "raw").is_dir():
        raise SystemExit(f"VNC data not found at {vnc} (set VNC_DATA_DIR)")
    p = replace(
        protocol.Protocol(), **protocol.PRESETS["cpu"], images=str(vnc / "raw"), masks=str(vnc / "mitochondria")
    )
    p = replace(p, width=a.width, dropout=a.dropout, norm=a.norm)
    ds = data.dataset_for(p, a.seed)
    torch.manual_seed(a.seed)
    model = build_model("unet", width=p.width, depth=p.depth, dropout=p.dropout, norm=p.norm)
    augment = (
        AugmentConfig(flip=False, rot90=False, contrast=0.0, brightness=0.0, noise=0.0)
        if a.no_augment
        else AugmentConfig()
    )
    every = max(10, a.steps // 10)
    cfg = TrainConfig(
        steps=a.steps,
        lr=a.lr,
        batch_size=a.batch_size,
        crop=p.tile,
        eval_every=every,
        time_budget_s=1e9,
        seed=SeedSchedule(a.seed).train(0),
        select="last",
        augment=augment,
    )
    t0 = time.monotonic()

    def show(d: dict) -> None:
        if d["step"] % every == 0 and d.get("val_iou") is not None:
            print(
                f"step {d['step']:5d}  loss {d['loss']:.3f}  test IoU {d['val_iou']:.3f}  {time.monotonic() - t0:.0f}s"
            )

    test_masks = [m.astype(np.int64) for m in ds.test_masks]
    fine_tune(
        model,
        list(ds.pool_images),
        list(ds.pool_masks),
        cfg,
        progress=show,
        validation=ValidationTiles(ds.test_images, test_masks),
        calibration_images=run.calibration(ds, p),
    )
    test = run.evaluate_test(model, ds, p)
    train = evaluate(model, list(ds.pool_images), list(ds.pool_masks), torch.device("cpu"))
    print(
        f"norm {a.norm} batch {a.batch_size} steps {a.steps} lr {a.lr:g} width {a.width} dropout {a.dropout} "
        f"augment {not a.no_augment} seed {a.seed}: test IoU {test['iou']:.3f}, train IoU {train['iou']:.3f} "
        f"({time.monotonic() - t0:.0f}s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
