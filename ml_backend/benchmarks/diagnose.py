"""Why does a batch lower test IoU? Re-train one round of saved benchmark runs and look inside (issue 11).

For each (arm, seed) it rebuilds round ``r`` exactly as ``run.run_strategy`` trained it (the seed's cached initial
model fine-tuned through rounds 1..r on the saved labelled order, the same training seeds), then reports on the test
region: IoU, precision, recall and the predicted against the true foreground fraction, plus the labelled set's
foreground fraction. A model that over-segments after a foreground-heavy batch (precision falls, predicted
foreground rises) is a class-prior shift; one whose recall falls is not.

It also applies the classic prior correction (Saerens, Latinne & Decaestecker 2002, "Adjusting the outputs of a
classifier to new a priori probabilities") to the same model: the foreground posterior is re-weighted by
pi_ref / pi_train (and the background by the complements), where pi_train is the labelled set's foreground fraction
and pi_ref the initial (random) tiles' one, an unbiased estimate the product also has (its random audit tiles).
If the correction recovers the IoU, the prior shift is the cause; if not, it is something else.

    python -m ml_backend.benchmarks.diagnose --out benchmarks/stack_aware/vnc --arms random,entropy --round 1
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.active_learning import RoundPlan
from ml_backend.active_learning.loop import ActiveLoop, NextBatch, SeedSchedule
from ml_backend.benchmarks.data import dataset_for
from ml_backend.benchmarks.protocol import Protocol, train_config
from ml_backend.benchmarks.run import OracleLabels, calibration, ensure_initial
from ml_backend.config import torch_device
from ml_backend.inference.tiling import predict_tiled
from ml_backend.model import load_checkpoint
from ml_backend.training.metrics import confusion_counts, iou_from_counts
from ml_backend.training.recipe import ModelState

log = logging.getLogger("al_benchmark")


def prior_corrected(probs: np.ndarray, pi_train: float, pi_ref: float) -> np.ndarray:
    """(2, H, W) softmax -> the same with the foreground prior moved from ``pi_train`` to ``pi_ref`` (Saerens 2002)."""
    w1 = pi_ref / max(pi_train, 1e-9)
    w0 = (1 - pi_ref) / max(1 - pi_train, 1e-9)
    fg, bg = probs[1] * w1, probs[0] * w0
    total = fg + bg + 1e-12
    return np.stack([bg / total, fg / total])


def _evaluate(model, ds, p, pi_train: float, pi_ref: float) -> dict[str, float]:
    counts = {"raw": np.zeros(3), "corrected": np.zeros(3)}
    pred_fg = {"raw": 0, "corrected": 0}
    pixels = true_fg = 0
    for img, msk in zip(ds.test_images, ds.test_masks, strict=True):
        probs = predict_tiled(model, img, tile=p.infer_tile, overlap=p.infer_overlap, device=torch_device(p.device))
        for name, pr in (("raw", probs), ("corrected", prior_corrected(probs, pi_train, pi_ref))):
            pred = pr.argmax(axis=0)
            counts[name] += confusion_counts(pred, msk, ignore=None)
            pred_fg[name] += int(np.count_nonzero(pred))
        pixels += msk.size
        true_fg += int(np.count_nonzero(msk))
    tp, fp, fn = counts["raw"]
    out = {
        "iou": iou_from_counts(tp, fp, fn),
        "precision": tp / max(1, tp + fp),
        "recall": tp / max(1, tp + fn),
        "predicted_fg": pred_fg["raw"] / pixels,
        "true_fg": true_fg / pixels,
    }
    tp, fp, fn = counts["corrected"]
    out["iou_prior_corrected"] = iou_from_counts(tp, fp, fn)
    out["predicted_fg_corrected"] = pred_fg["corrected"] / pixels
    return out


def diagnose(out: Path, arm: str, seed: int, rnd: int) -> dict:
    """Round ``rnd`` of a saved (arm, seed) run, re-trained and dissected (see the module docstring)."""
    p = Protocol(**json.loads((out / "protocol.json").read_text()))
    run = json.loads((out / "runs" / f"{arm}__seed{seed}.json").read_text())
    ds = dataset_for(p, seed)
    model, extra = load_checkpoint(ensure_initial(out, p, seed))
    order = list(run["labelled_order"])

    class Replay(NextBatch):  # the tiles the saved run picked (nothing is scored here)
        def put(self, version: str, scored: Any, ranking: Any) -> int:
            return len(self.picked)

    def replay(r: int) -> NextBatch:  # after round r
        return Replay(order[p.m + r * p.k : p.m + (r + 1) * p.k])

    # The same chain as run_strategy (round r fine-tunes round r - 1 with the same seeds), the picks replayed.
    loop = ActiveLoop(
        OracleLabels(ds, order[: p.m]),
        train=lambda train_seed: train_config(p, steps=p.steps, lr=p.lr, seed=train_seed, split_seed=seed),
        sink=replay,
    )
    start = RoundPlan(None, ModelState(model, how="kept"), calibration=lambda: calibration(ds, p))
    model = loop.run(start, rnd, SeedSchedule(seed))[-1].trained.model
    lab = order[: p.m + rnd * p.k]
    pi_train = float(np.count_nonzero(ds.pool_masks[lab]) / ds.pool_masks[lab].size)
    first = order[: p.m]
    pi_ref = float(np.count_nonzero(ds.pool_masks[first]) / ds.pool_masks[first].size)
    res = _evaluate(model, ds, p, pi_train, pi_ref)
    saved = run["rounds"][rnd]["iou"] if rnd < len(run["rounds"]) else None
    return {"arm": arm, "seed": seed, "round": rnd, "saved_iou": saved, "labelled_fg": pi_train, "initial_fg": pi_ref,
            **res}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="a benchmark output dir with runs/ and protocol.json")
    ap.add_argument("--arms", default="random,entropy")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--save", type=Path, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(1)
    rows = []
    for seed in (int(s) for s in a.seeds.split(",")):
        for arm in a.arms.split(","):
            row = diagnose(a.out, arm, seed, a.round)
            rows.append(row)
            r = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items()}
            print(
                f"{arm:22s} seed {seed} round {a.round}: IoU {r['iou']} (saved {r['saved_iou']}) precision "
                f"{r['precision']} recall {r['recall']} predicted fg {r['predicted_fg']} (true {r['true_fg']}); "
                f"labelled fg {r['labelled_fg']} vs initial {r['initial_fg']}; prior-corrected IoU "
                f"{r['iou_prior_corrected']} (predicted fg {r['predicted_fg_corrected']})",
                flush=True,
            )
            if a.save:
                a.save.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
