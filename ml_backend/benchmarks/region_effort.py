"""Region suggestion versus whole tiles: test IoU against the annotation effort (issue 12, item 2).

Both arms run the product's round (``active_learning.run_round`` with the benchmark's oracle plug-ins) from the same
cached initial model per seed, with the same strategy (entropy) scoring the pool:

* ``whole``: the oracle labels the k most uncertain tiles completely (the ground truth of the whole tile);
* ``region``: the oracle labels only the rectangle ``strategies.region.suggest_region`` proposes inside each of the
  4k most uncertain tiles (window = half the tile side: the same pixel budget per round as ``whole``), from the
  current model's softmax and its per-pixel normalised entropy; pixels outside are IGNORE to the loss
  (``region_training_mask``), as with the sparse label config.

Effort per round: annotated pixels (tile or rectangle area) and annotated boundary length (unit pixel edges between
classes inside the painted area, ``training.metrics.boundary_length``: Atzeni et al.'s effort proxy). Results are
saved per (arm, seed) as JSON when each run ends; the plots and the table go to ``benchmarks/region_effort*``.

    python -m ml_backend.benchmarks.cli region-effort --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.active_learning import Evaluation, RoundPlan, TopK
from ml_backend.active_learning.loop import ActiveLoop, RoundHooks, SeedSchedule
from ml_backend.benchmarks.data import REPO, Dataset, dataset_for, default_vnc_dir
from ml_backend.benchmarks.protocol import PRESETS, Protocol, train_config
from ml_backend.benchmarks.report import write_json
from ml_backend.benchmarks.run import LocalScorer, OracleLabels, ensure_initial, evaluate_test, scoring_config
from ml_backend.config import torch_device
from ml_backend.model import load_checkpoint
from ml_backend.strategies import get_strategy
from ml_backend.strategies.region import region_training_mask, suggest_region
from ml_backend.training.metrics import boundary_length
from ml_backend.training.recipe import ModelState

log = logging.getLogger("bench_region_effort")

ARMS = ("whole", "region")
NAMES = {"whole": "whole tiles", "region": "suggested regions"}
STRATEGY = "entropy"


def protocol(data: str = "auto", rounds: int = 3) -> Protocol:
    """The CPU preset with 128 px tiles (regions of 64 px), a smaller pool and short rounds: minutes per seed."""
    p = replace(Protocol(), **PRESETS["cpu"])
    p = replace(p, tile=128, pool_size=120, m=6, k=4, rounds=rounds, init_steps=400, steps=120, batch_size=4,
                test_every=8, ensemble=0, mc_passes=1)  # fmt: skip
    vnc = default_vnc_dir() / "stack1"
    if data == "vnc" or (data == "auto" and (vnc / "raw").is_dir() and (vnc / "mitochondria").is_dir()):
        return replace(p, data="vnc", images=str(vnc / "raw"), masks=str(vnc / "mitochondria"))
    return replace(p, data="synthetic", synthetic_n=12, synthetic_size=512, downsample=1)


def _probs(model: Any, images: np.ndarray, p: Protocol) -> np.ndarray:
    """(N, C, H, W) softmax of whole tiles (one forward pass per tile batch, eval mode)."""
    import torch

    dev = torch_device(p.device)
    model.eval().to(dev)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 16):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + 16], dtype=np.float32))[:, None].to(dev)
            out.append(torch.softmax(model(x), dim=1).cpu().numpy())
    return np.concatenate(out)


def regions_for(model: Any, ds: Dataset, ids: list[int], p: Protocol, window: int) -> list[tuple[int, int, int, int]]:
    """The suggested rectangle (x0, y0, x1, y1) of each tile: gain = normalised entropy, effort = boundary length."""
    probs = _probs(model, ds.pool_images[ids], p)
    out = []
    for pr in probs:
        entropy = -(pr * np.log(np.clip(pr, 1e-8, 1.0))).sum(axis=0) / np.log(pr.shape[0])
        r = suggest_region(pr, entropy, window=window, min_tile=window, stride=max(1, window // 4))
        out.append((0, 0, window, window) if r is None else (r.x0, r.y0, r.x1, r.y1))
    return out


def run_arm(out: Path, p: Protocol, arm: str, seed: int) -> dict:
    """One learning curve of an arm: round 0 = the cached initial model (whole tiles), then ``p.rounds`` rounds
    (``active_learning.loop.ActiveLoop``, the benchmark's loop and seeds)."""
    path = out / "runs" / f"{arm}__seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    t_run = time.monotonic()
    ds = dataset_for(p, seed)
    model, extra = load_checkpoint(ensure_initial(out, p, seed))
    window = p.tile // 2
    labels: dict[int, np.ndarray] = {int(i): ds.pool_masks[i].astype(np.int64) for i in extra["labelled"]}
    effort = {
        "pixels": sum(m.size for m in labels.values()),
        "boundary": sum(boundary_length(m) for m in labels.values()),
    }

    class Oracle(OracleLabels):
        """Whole tiles: their ground truth; regions: the ground truth inside the suggested rectangle, IGNORE out."""

        def annotate(self, ids: list[int], outcome: Any = None) -> None:
            if arm == "whole":
                for i in ids:
                    self.masks[i] = ds.pool_masks[i].astype(np.int64)
                    effort["pixels"] += self.masks[i].size
                    effort["boundary"] += boundary_length(self.masks[i])
            else:
                for i, (x0, y0, x1, y1) in zip(ids, regions_for(outcome.trained.model, ds, ids, p, window),
                                               strict=True):  # fmt: skip
                    self.masks[i] = region_training_mask(ds.pool_masks[i].astype(np.int64), (x0, y0, x1, y1))
                    effort["pixels"] += (x1 - x0) * (y1 - y0)
                    effort["boundary"] += boundary_length(ds.pool_masks[i][y0:y1, x0:x1])
            super().annotate(ids, outcome)

    oracle = Oracle(ds, list(labels), labels)
    rounds = [{"round": 0, "tiles": len(labels), **effort, "iou": extra["test"]["iou"], "dice": extra["test"]["dice"]}]

    class Record(RoundHooks):
        def evaluate(self, rnd: int, trained: Any) -> Evaluation:
            return Evaluation(evaluate_test(trained.model, ds, p))

        def after(self, rnd: int, outcome: Any, picked: list[int]) -> None:
            if rnd > 0:
                test = outcome.evaluation.metrics
                rounds.append({"round": rnd, "tiles": len(labels), **effort, "iou": test["iou"], "dice": test["dice"]})
                log.info("%s seed %d round %d: %d tiles, %d px, boundary %.0f, test IoU %.3f",
                         arm, seed, rnd, len(labels), effort["pixels"], effort["boundary"], test["iou"])  # fmt: skip

    k = p.k if arm == "whole" else 4 * p.k
    scoring = scoring_config(p)
    loop = ActiveLoop(
        oracle, train=lambda train_seed: train_config(p, steps=p.steps, lr=p.lr, seed=train_seed, split_seed=seed),
        scorer=LocalScorer(ds.pool_images, scoring), select=TopK(k), hooks=Record(),
    )  # fmt: skip
    loop.run(RoundPlan(get_strategy(STRATEGY), ModelState(model, how="kept"), scoring=scoring), p.rounds,
             SeedSchedule(seed))  # fmt: skip
    record = {"arm": arm, "seed": seed, "strategy": STRATEGY, "k": k, "window": window, "rounds": rounds,
              "seconds": time.monotonic() - t_run}  # fmt: skip
    write_json(path, record)
    return record


def _interp(runs: list[dict], key: str, grid: np.ndarray) -> np.ndarray:
    """Mean IoU over seeds at each effort of ``grid`` (linear interpolation of each run's curve)."""
    ys = [np.interp(grid, [r[key] for r in run["rounds"]], [r["iou"] for r in run["rounds"]]) for run in runs]
    return np.mean(ys, axis=0)


def write_report(out: Path, runs: list[dict], p: Protocol, command: str, markdown: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arm = {a: sorted([r for r in runs if r["arm"] == a], key=lambda r: r["seed"]) for a in ARMS}
    write_json(
        out / "curves.json",
        {a: [{k: r[k] for k in ("seed", "k", "window", "rounds")} for r in by_arm[a]] for a in ARMS},
    )  # fmt: skip  (runs/ is not versioned)
    for key, label in (("boundary", "annotated boundary length (pixel edges)"), ("pixels", "annotated pixels")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, colour in zip(ARMS, ("tab:blue", "tab:orange"), strict=True):
            for i, run in enumerate(by_arm[arm]):
                ax.plot([r[key] for r in run["rounds"]], [r["iou"] for r in run["rounds"]], "o-", color=colour,
                        alpha=0.6, label=NAMES[arm] if i == 0 else None)  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("test IoU")
        ax.set_title(f"Region suggestion vs whole tiles ({len(by_arm['whole'])} seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"region_effort_{key}.png", dpi=110)
        plt.close(fig)
    lines = [
        "# Region suggestion versus whole tiles: IoU per annotation effort",
        "",
        f"Data: {p.data} ({'VNC stack1' if p.data == 'vnc' else 'generated'}), binned x{p.downsample}; tiles "
        f"{p.tile} px, suggested regions {p.tile // 2} px; pool {p.pool_size}; initial {p.m} whole tiles; "
        f"{p.rounds} rounds of {p.k} whole tiles or {4 * p.k} regions (the same pixels per round); strategy "
        f"{STRATEGY}; U-Net width {p.width}, {p.steps} steps per round; test IoU on every {p.test_every}th slice of "
        "the test half. Both arms use the product's round (`run_round`) with the ground-truth oracle.",
        "",
        f"Command: `{command}`",
        "",
        "![IoU vs boundary](region_effort/region_effort_boundary.png)",
        "![IoU vs pixels](region_effort/region_effort_pixels.png)",
        "",
        "| arm | seed | round | tiles touched | annotated pixels | annotated boundary | test IoU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        for run in by_arm[arm]:
            for r in run["rounds"]:
                lines.append(f"| {arm} | {run['seed']} | {r['round']} | {r['tiles']} | {r['pixels']} | "
                             f"{r['boundary']:.0f} | {r['iou']:.3f} |")  # fmt: skip
    if all(by_arm[a] for a in ARMS):
        lines += ["", "Mean test IoU over seeds at equal effort (linear interpolation between rounds):", "",
                  "| effort | whole tiles | region suggestion |", "|---|---:|---:|"]  # fmt: skip
        for key in ("boundary", "pixels"):
            hi = min(run["rounds"][-1][key] for a in ARMS for run in by_arm[a])  # no run extrapolated
            lo = max(run["rounds"][0][key] for a in ARMS for run in by_arm[a])
            for x in np.linspace(lo, hi, 4)[1:]:
                w, g = (_interp(by_arm[a], key, np.array([x]))[0] for a in ARMS)
                lines.append(f"| {key} = {x:.0f} | {w:.3f} | {g:.3f} |")
    text = "\n".join(lines) + "\n"
    markdown.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--data", choices=["auto", "vnc", "synthetic"], default="auto")
    ap.add_argument("--rounds", type=int, default=3, help="rounds after the initial model")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "region_effort")
    ap.add_argument("--markdown", type=Path, default=REPO / "benchmarks" / "region_effort.md")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(1)
    p = protocol(a.data, a.rounds)
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "protocol.json", asdict(p))
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    if not a.report_only:
        for seed in seeds:
            for arm in [x.strip() for x in a.arms.split(",") if x.strip()]:
                run_arm(a.out, p, arm, seed)
    runs = [json.loads(f.read_text()) for f in sorted((a.out / "runs").glob("*.json"))]
    command = f"python -m ml_backend.benchmarks.cli region-effort --seeds {a.seeds} --rounds {a.rounds}"
    print(write_report(a.out, [r for r in runs if r["seed"] in seeds], p, command, a.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
