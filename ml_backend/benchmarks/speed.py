"""Speed at the hardware's limit (issue 20.3): every inference and training path as a fraction of the machine's matmul
ceiling, measured in ONE run so the ratios share the machine's load.

    python -m ml_backend.benchmarks.speed                       # CPU, the default U-Net, int8 IoU on VNC and Lucchi
    python -m ml_backend.benchmarks.speed --device cuda         # the GPU preset (bf16 autocast engine)
    python -m ml_backend.benchmarks.speed --quick --out /tmp/s  # seconds: every section on tiny sizes (tests)

What it measures, in this order (``--rounds`` rounds of short windows; in each round every figure is measured in
turn with the figures it is compared with (a, b, c, a, b, c, ... until each had its window: ``interleaved``), so
a change in the machine's load hits both sides of every ratio alike):

1. the fp32 matmul ceiling: ``torch.mm`` of two large square matrices, torch's thread count (GFLOP/s);
2. the U-Net's FLOPs per megapixel (``torch.utils.flop_counter.FlopCounterMode``, not by hand);
3. the bare forward pass (a batch of ``INFERENCE_BATCH`` tiles of ``TILE_SIZE``): eager PyTorch (the model as
   trained, channels-last, inference mode), the BatchNorm-fused PyTorch engine, ONNX Runtime fp32 and int8
   (``inference.precision``); MP/s and fraction of the ceiling;
4. ``/predict`` through the real Flask app (test client; images as Label Studio local files; the product's default
   label config with the uncertainty layer), as a ratio to the configured engine's bare forward on the same tiles;
5. the re-scoring pipeline (``inference.scoring.score_images`` with the product's settings, entropy, masks' probs
   kept) on pool tiles, as a ratio to the bare forward;
6. training: steps/s of the product's ``fine_tune`` (TrainConfig defaults: 8 crops of 128 px), as a fraction of the
   ceiling with the step's FLOPs counted (forward + backward);
7. int8 against fp32 on real data: a small U-Net trained once per data set with the product's trainer on the AL
   benchmark's CPU preset (``benchmarks.data``; cached under ``.cache/speed``), both engines' masks against the
   ground truth of the held-out test region (IoU), int8 calibrated on pool tiles.

Writes ``speed.json`` and ``speed.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.benchmarks import protocol
from ml_backend.benchmarks.data import dataset_for, default_vnc_dir
from ml_backend.benchmarks.machine import describe_text
from ml_backend.benchmarks.serving import _Backend
from ml_backend.config import Settings, get_settings, torch_device
from ml_backend.data.synthetic import generate_em_like
from ml_backend.imaging import normalize
from ml_backend.inference.precision import count_flops, inference_model, onnxruntime_available
from ml_backend.inference.scoring import ScoringConfig, score_images
from ml_backend.inference.tiling import predict_tiled
from ml_backend.model import build_model, load_checkpoint, save_checkpoint
from ml_backend.strategies import get_strategy
from ml_backend.training.metrics import iou_from_counts
from ml_backend.training.trainer import TrainConfig, fine_tune

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "speed"


@dataclass
class Preset:
    """Sizes of one run."""

    matmul: int = 2048  # side of the ceiling's square matrices
    tile: int = 256
    batch: int = 4
    width: int = 16
    depth: int = 4
    window_s: float = 2.0  # each timed window
    rounds: int = 3
    predict_tiles: int = 8  # tasks in one /predict request
    rescore_tiles: int = 16
    train_steps: int = 20
    iou_train_steps: int = 300
    iou_datasets: tuple[str, ...] = ("vnc", "lucchi")


PRESETS = {
    "cpu": Preset(),
    "cuda": Preset(matmul=8192, batch=16, window_s=2.0, predict_tiles=16, rescore_tiles=64, train_steps=50),
    "quick": Preset(
        matmul=256,
        tile=64,
        batch=2,
        width=8,
        depth=3,
        window_s=0.2,
        rounds=1,
        predict_tiles=2,
        rescore_tiles=4,
        train_steps=2,
        iou_train_steps=5,
        iou_datasets=("synthetic",),
    ),  # fmt: skip
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one short round (checks the pipeline)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default: the preset's)")
    ap.add_argument("--window", type=float, default=None, help="seconds per timed window (default: the preset's)")
    ap.add_argument("--datasets", default=None, help="int8 IoU data sets: vnc,lucchi (default), '' = skip")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/speed/<device>)")
    a = ap.parse_args(argv)
    preset = PRESETS["quick" if a.quick else a.device]
    if a.rounds is not None:
        preset = replace(preset, rounds=max(1, a.rounds))
    if a.window is not None:
        preset = replace(preset, window_s=max(0.05, a.window))
    if a.datasets is not None:
        preset = replace(preset, iou_datasets=tuple(d for d in a.datasets.split(",") if d))
    a.preset = preset
    a.out = Path(a.out or REPO / "benchmarks" / "speed" / a.device)
    return a


# ------------------------------------------------------------------------------------------------------ timing
def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rate(fn: Callable[[], Any], work: float, window_s: float, device: Any = "cpu") -> float:
    """``work`` units per second of ``fn`` over a window of about ``window_s`` (after one untimed call)."""
    fn()
    _sync(device)
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        _sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= window_s:
            return work * calls / elapsed


def interleaved(jobs: dict[str, tuple[Callable[[], Any], float]], window_s: float, device: Any = "cpu") -> dict:
    """Rates (work units / s) of several jobs run in turn (a, b, c, a, b, c, ...) until each has had ``window_s``
    of time: a change in the machine's load hits all of them alike, so their ratios hold even when it does not."""
    spent = dict.fromkeys(jobs, 0.0)
    done = dict.fromkeys(jobs, 0.0)
    for fn, _ in jobs.values():  # untimed warm-up
        fn()
    _sync(device)
    while min(spent.values()) < window_s:
        for name, (fn, work) in jobs.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            spent[name] += time.perf_counter() - t0
            done[name] += work
    return {name: done[name] / spent[name] for name in jobs}


def _mm(n: int, device: Any) -> tuple[Callable[[], Any], float]:
    """One ``torch.mm`` of two n x n fp32 matrices and its GFLOP."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 figure
    return (lambda: torch.mm(a, b)), 2 * n**3 / 1e9


def matmul_ceiling(n: int, window_s: float, device: Any = "cpu") -> float:
    """GFLOP/s of ``torch.mm`` on two n x n fp32 matrices (TF32 off on CUDA: a true fp32 figure)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    return rate(lambda: torch.mm(a, b), 2 * n**3 / 1e9, window_s, device)


def training_flops(model: Any, batch: int, crop: int, device: Any) -> int:
    """FLOPs of one training step's forward + backward (counted; the optimiser's few element-wise ops aside)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, int(model.hparams["in_channels"]), crop, crop, device=device)
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------------ sections
def _em_tiles(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, normalised float32 images) of generated EM-like tiles."""
    raw, _ = generate_em_like(n, size=size, seed=seed)
    return raw, np.stack([normalize(im) for im in raw]).astype(np.float32)


class Engines:
    """The forward passes compared: eager PyTorch, fused PyTorch, ONNX Runtime fp32 / int8 (CPU), bf16 (CUDA)."""

    def __init__(self, model: Any, tiles: np.ndarray, device: Any) -> None:
        import torch

        self.device = torch.device(device)
        self.x = torch.from_numpy(tiles[:, None].copy()).to(self.device)
        self.eager = model.to(self.device).eval()
        if self.device.type == "cpu":
            self.eager.to(memory_format=torch.channels_last)  # what predict_tiled did before the engines
        self.models: dict[str, Any] = {"eager fp32 (PyTorch)": self.eager}
        self.models["fused fp32 (PyTorch)"] = inference_model(model, "fp32", "torch", self.device)
        if self.device.type == "cuda":
            self.models["fused bf16 autocast (PyTorch)"] = inference_model(model, "bf16", "torch", self.device)
        elif onnxruntime_available():
            self.models["ONNX Runtime fp32"] = inference_model(model, "fp32", "onnxruntime", self.device)
            self.models["ONNX Runtime int8"] = inference_model(
                model, "int8", "onnxruntime", self.device, calibration=list(tiles)
            )

    def forward(self, name: str) -> Callable[[], Any]:
        import torch

        net = self.models[name]

        def run() -> Any:
            with torch.inference_mode():
                return net(self.x)

        return run


class PredictApp:
    """The real Flask app (test client) serving a published model; ``run()`` is one /predict of every tile."""

    def __init__(self, model: Any, images: list[np.ndarray], workdir: Path) -> None:
        args = argparse.Namespace(server="flask", threads=0)
        self.backend = _Backend(args, model, images, workdir)
        config = (REPO / "label_config" / "dense_uncertainty.xml").read_text()  # the set-up command's default
        status, body = self.backend.client.post(
            "/setup", {"project": self.backend.project, "schema": config, "extra_params": {}}
        )
        if status != 200:
            raise RuntimeError(f"/setup answered {status}: {body}")
        self.backend.label_config = config
        self.n = len(images)

    def run(self) -> float:
        return self.backend.run(self.n)


def _load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def measure_speed(p: Preset, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Sections 1-6, interleaved in rounds; returns the raw per-round figures and their medians."""
    import torch

    dev = torch_device(device)
    torch.manual_seed(0)
    model = build_model("unet", width=p.width, depth=p.depth, norm="batch").eval()
    flops_mp = count_flops(model, (1, 1, p.tile, p.tile)) / (p.tile * p.tile / 1e6)
    log(f"U-Net width {p.width} depth {p.depth}: {flops_mp / 1e9:.1f} GFLOP per megapixel")
    raw, tiles = _em_tiles(max(p.batch, p.predict_tiles, p.rescore_tiles), p.tile)
    mp_batch = p.batch * p.tile * p.tile / 1e6
    engines = Engines(model, tiles[: p.batch], dev)
    settings = Settings.from_env(device=device)
    default_engine = inference_model(
        model, settings.inference_precision, settings.inference_runtime, dev, calibration=list(tiles),
        calibration_tiles=settings.int8_calibration_tiles,
    )  # fmt: skip
    default_name = next((k for k, v in engines.models.items() if v is default_engine), "eager fp32 (PyTorch)")
    log(f"configured engine (INFERENCE_PRECISION={settings.inference_precision}, "
        f"INFERENCE_RUNTIME={settings.inference_runtime}): {default_name}")  # fmt: skip

    # /predict and re-scoring run the configured engine: the bare forward they are compared with is the same engine
    # on the same tiles in batches of INFERENCE_BATCH (tile size TILE_SIZE = the preset's).
    os.environ.update({"TILE_SIZE": str(p.tile), "INFERENCE_BATCH": str(p.batch), "DEVICE": device})
    get_settings.cache_clear()
    scoring = ScoringConfig.from_settings(Settings.from_env())
    pool = list(tiles[: p.rescore_tiles])
    entropy = get_strategy("entropy")
    kept: list[Any] = []

    def rescore() -> None:
        kept.clear()
        score_images(model, pool, entropy, scoring, on_probs=lambda i, probs: kept.append(probs.shape))

    def bare(n: int) -> Callable[[], None]:
        xs = [engines.x.new_tensor(tiles[i : i + p.batch, None]) for i in range(0, n, p.batch)]

        def run() -> None:
            with torch.inference_mode():
                for x in xs:
                    torch.softmax(default_engine(x), dim=1)

        return run

    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        app = PredictApp(model, list(raw[: p.predict_tiles]), Path(tmp))
        app.run()  # warm-up: the worker loads the version and builds its engine
        mp_predict = p.predict_tiles * p.tile * p.tile / 1e6
        mp_rescore = p.rescore_tiles * p.tile * p.tile / 1e6
        mm = _mm(p.matmul, dev)
        for r in range(p.rounds):
            fig: dict[str, Any] = {"load_avg": _load_avg()}
            # The ceiling and every engine in turn, then each served path in turn with its bare forward.
            jobs = {"ceiling": mm, **{k: (engines.forward(k), mp_batch) for k in engines.models}}
            got = interleaved(jobs, p.window_s, dev)
            fig["ceiling_gflop_s"] = got.pop("ceiling")
            fig["forward_mp_s"] = got
            got = interleaved({"bare": (bare(p.predict_tiles), mp_predict), "predict": (app.run, mp_predict)},
                              p.window_s, dev)  # fmt: skip
            fig["bare_for_predict_mp_s"], fig["predict_mp_s"] = got["bare"], got["predict"]
            got = interleaved({"bare": (bare(p.rescore_tiles), mp_rescore), "rescore": (rescore, mp_rescore)},
                              p.window_s, dev)  # fmt: skip
            fig["bare_for_rescore_mp_s"], fig["rescore_mp_s"] = got["bare"], got["rescore"]
            rounds.append(fig)
            log(f"round {r + 1}/{p.rounds}: ceiling {fig['ceiling_gflop_s']:.1f} GFLOP/s, forward "
                + ", ".join(f"{k} {v:.3f}" for k, v in fig["forward_mp_s"].items())
                + f" MP/s; /predict {fig['predict_mp_s']:.3f}, rescoring {fig['rescore_mp_s']:.3f} MP/s; "
                f"load {fig['load_avg']}")  # fmt: skip
        app.backend.close()

    # Training: the product's fine_tune (its own setup included), bracketed by two ceiling windows.
    cfg = TrainConfig(steps=p.train_steps, batch_size=8, crop=min(128, p.tile), val_fraction=0.0, eval_every=0,
                      device=device, time_budget_s=1e9)  # fmt: skip
    train_model = build_model("unet", width=p.width, depth=p.depth, norm="batch").to(dev)
    step_flops = training_flops(train_model, cfg.batch_size, cfg.crop, dev)
    masks = (tiles > 0.5).astype(np.int64)
    t_ceil = [matmul_ceiling(p.matmul, p.window_s, dev)]
    t_load = _load_avg()
    fine_tune(train_model, list(tiles[:8]), list(masks[:8]), replace(cfg, steps=1))  # warm-up
    result = fine_tune(train_model, list(tiles[:8]), list(masks[:8]), cfg)
    t_ceil.append(matmul_ceiling(p.matmul, p.window_s, dev))
    steps_s = result.steps / result.seconds
    training = {
        "steps_s": steps_s, "step_gflop": step_flops / 1e9, "batch": cfg.batch_size, "crop": cfg.crop,
        "ceiling_gflop_s": float(np.mean(t_ceil)), "fraction": steps_s * step_flops / 1e9 / float(np.mean(t_ceil)),
        "load_avg": t_load,
    }  # fmt: skip
    log(f"training: {steps_s:.2f} steps/s x {step_flops / 1e9:.1f} GFLOP = {training['fraction']:.2f} of the ceiling")
    return {"flops_per_mp": flops_mp, "engines": list(engines.models), "configured_engine": default_name,
            "rounds": rounds, "training": training, "summary": summarize(rounds, flops_mp)}  # fmt: skip


def summarize(rounds: list[dict[str, Any]], flops_mp: float) -> dict[str, Any]:
    """Medians over rounds of every throughput, its fraction of that round's ceiling, and the ratios."""

    def med(fn: Callable[[dict[str, Any]], float]) -> float:
        return float(statistics.median(fn(r) for r in rounds))

    out: dict[str, Any] = {"ceiling_gflop_s": med(lambda r: r["ceiling_gflop_s"]), "forward": {}}
    for name in rounds[0]["forward_mp_s"]:
        out["forward"][name] = {
            "mp_s": med(lambda r, n=name: r["forward_mp_s"][n]),
            "fraction": med(lambda r, n=name: r["forward_mp_s"][n] * flops_mp / 1e9 / r["ceiling_gflop_s"]),
        }
    out["predict"] = {
        "mp_s": med(lambda r: r["predict_mp_s"]),
        "bare_mp_s": med(lambda r: r["bare_for_predict_mp_s"]),
        "time_ratio": med(lambda r: r["bare_for_predict_mp_s"] / r["predict_mp_s"]),
    }
    out["rescore"] = {
        "mp_s": med(lambda r: r["rescore_mp_s"]),
        "bare_mp_s": med(lambda r: r["bare_for_rescore_mp_s"]),
        "time_ratio": med(lambda r: r["bare_for_rescore_mp_s"] / r["rescore_mp_s"]),
    }
    names = list(rounds[0]["forward_mp_s"])
    if "ONNX Runtime int8" in names and "ONNX Runtime fp32" in names:
        out["int8_speedup_vs_ort_fp32"] = med(
            lambda r: r["forward_mp_s"]["ONNX Runtime int8"] / r["forward_mp_s"]["ONNX Runtime fp32"]
        )
        out["int8_speedup_vs_eager"] = med(
            lambda r: r["forward_mp_s"]["ONNX Runtime int8"] / r["forward_mp_s"]["eager fp32 (PyTorch)"]
        )
    return out


# ------------------------------------------------------------------------------------------------------ int8 IoU
def _protocol(name: str) -> Any:
    """The AL benchmark's CPU preset on data set ``name`` (vnc, lucchi, or synthetic for --quick)."""
    p = replace(protocol.Protocol(), **protocol.PRESETS["cpu"])
    if name == "vnc":
        root = default_vnc_dir() / "stack1"
        return replace(p, data="vnc", images=str(root / "raw"), masks=str(root / "mitochondria"))
    if name == "lucchi":
        root = Path(os.environ.get("LUCCHI_DATA_DIR", REPO.parent / "shared" / "data" / "lucchi"))
        return replace(p, data="folder", images=str(root / "images"), masks=str(root / "masks"))
    return replace(p, data="synthetic", downsample=1, synthetic_n=4, synthetic_size=128, tile=32, pool_size=16,
                   test_every=1)  # fmt: skip


def int8_iou(name: str, steps: int, log: Callable[[str], None]) -> dict[str, Any] | None:
    """fp32 and int8 engines' IoU against the ground truth on the held-out test region of data set ``name``."""
    import torch

    p = _protocol(name)
    if p.data != "synthetic" and not Path(p.images).is_dir():
        log(f"int8 IoU on {name}: skipped, no data at {p.images}")
        return None
    ds = dataset_for(p, 0)
    ckpt = CACHE / f"{name}-w{p.width}-d{p.depth}-t{p.tile}-s{steps}.pt"
    if ckpt.is_file():
        model = load_checkpoint(ckpt)[0]
        log(f"int8 IoU on {name}: cached model {ckpt}")
    else:
        torch.manual_seed(0)
        model = build_model("unet", width=p.width, depth=p.depth, dropout=p.dropout, norm=p.norm)
        t0 = time.monotonic()
        fine_tune(model, list(ds.pool_images), list(ds.pool_masks),
                  TrainConfig(steps=steps, lr=p.init_lr, batch_size=p.batch_size, crop=p.tile, val_fraction=0.1,
                              time_budget_s=1e9, eval_every=max(1, steps // 3)))  # fmt: skip
        log(f"int8 IoU on {name}: trained {steps} steps in {time.monotonic() - t0:.0f} s")
        if name != "synthetic":
            CACHE.mkdir(parents=True, exist_ok=True)
            save_checkpoint(model, ckpt, {"note": "speed benchmark int8 IoU model", "steps": steps})
    model.eval()
    calib = list(ds.pool_images[:16])
    out: dict[str, Any] = {"tiles": len(ds.test_images), "test_shape": list(ds.test_images[0].shape),
                           "train_steps": steps}  # fmt: skip
    preds: dict[str, list[np.ndarray]] = {}
    for precision in ("fp32", "int8"):
        net = inference_model(model, precision, "onnxruntime", "cpu", calibration=calib)
        counts = np.zeros(3, dtype=np.int64)
        preds[precision] = []
        for img, msk in zip(ds.test_images, ds.test_masks, strict=True):
            pred = predict_tiled(net, img, tile=p.infer_tile, overlap=p.infer_overlap, device="cpu").argmax(0) > 0
            truth = msk > 0
            tp = int(np.count_nonzero(pred & truth))
            counts += [tp, int(pred.sum()) - tp, int(truth.sum()) - tp]
            preds[precision].append(pred)
        out[f"iou_{precision}"] = iou_from_counts(*counts.tolist())
    same = sum(int(np.count_nonzero(a == b)) for a, b in zip(preds["fp32"], preds["int8"], strict=True))
    out["pixel_agreement"] = same / sum(a.size for a in preds["fp32"])
    out["iou_change"] = out["iou_int8"] - out["iou_fp32"]
    log(f"int8 IoU on {name}: fp32 {out['iou_fp32']:.4f}, int8 {out['iou_int8']:.4f} "
        f"(change {out['iou_change']:+.4f}); masks agree on {out['pixel_agreement']:.4%} of pixels")  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------------ report
def markdown(res: dict[str, Any]) -> str:
    s, tr = res["summary"], res["training"]
    flops = res["flops_per_mp"] / 1e9
    lines = [
        f"# Speed ({res['device']})", "", f"`{res['command']}`", "", f"Machine: {res['machine']}", "",
        f"Load average at start {res['load_start']}, at end {res['load_end']}. {res['rounds']} rounds; each figure is "
        "the median over rounds; within a round each ratio's two sides ran in turn (a, b, a, b, ...).", "",
        "| measure | value | fraction of the ceiling | ratio |", "| --- | ---: | ---: | ---: |",
        f"| fp32 matmul ceiling (torch.mm {res['preset']['matmul']}^2) | {s['ceiling_gflop_s']:.1f} GFLOP/s | 1 | |",
        f"| U-Net FLOPs (width {res['preset']['width']}, depth {res['preset']['depth']}) | {flops:.1f} GFLOP/MP | | |",
    ]  # fmt: skip
    for name, f in s["forward"].items():
        mark = " (configured)" if name == res["configured_engine"] else ""
        lines.append(f"| forward, {name}{mark} | {f['mp_s']:.3f} MP/s | {f['fraction']:.2f} | |")
    pr, rs = s["predict"], s["rescore"]
    lines += [
        f"| /predict, {res['preset']['predict_tiles']} tiles in one request | {pr['mp_s']:.3f} MP/s | "
        f"{pr['mp_s'] * flops / s['ceiling_gflop_s']:.2f} | {pr['time_ratio']:.2f}x the bare forward's time |",
        f"| re-scoring (score_images, entropy), {res['preset']['rescore_tiles']} tiles | {rs['mp_s']:.3f} MP/s | "
        f"{rs['mp_s'] * flops / s['ceiling_gflop_s']:.2f} | {rs['time_ratio']:.2f}x the bare forward's time |",
        f"| training (fine_tune, {tr['batch']} x {tr['crop']} px, {tr['step_gflop']:.1f} GFLOP/step counted) | "
        f"{tr['steps_s']:.2f} steps/s | {tr['fraction']:.2f} | |",
    ]  # fmt: skip
    if "int8_speedup_vs_ort_fp32" in s:
        lines.append(f"| int8 speed-up | | | {s['int8_speedup_vs_ort_fp32']:.2f}x ONNX Runtime fp32, "
                     f"{s['int8_speedup_vs_eager']:.2f}x eager PyTorch |")  # fmt: skip
    if res.get("iou"):
        lines += ["", "| data set | test tiles | fp32 IoU | int8 IoU | IoU change | masks agree |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for name, d in res["iou"].items():
            if d:
                lines.append(
                    f"| {name} | {d['tiles']} x {d['test_shape']} | {d['iou_fp32']:.4f} | {d['iou_int8']:.4f} | "
                    f"{d['iou_change']:+.4f} | {d['pixel_agreement']:.4%} |"
                )
    lines += ["", "Per round:", ""]
    for i, r in enumerate(res["raw"]["rounds"], 1):
        fw = ", ".join(f"{k} {v:.3f}" for k, v in r["forward_mp_s"].items())
        lines.append(f"- round {i} (load {r['load_avg']}): ceiling {r['ceiling_gflop_s']:.1f} GFLOP/s; forward MP/s: "
                     f"{fw}; /predict {r['predict_mp_s']:.3f}, bare {r['bare_for_predict_mp_s']:.3f}; re-scoring "
                     f"{r['rescore_mp_s']:.3f}, bare {r['bare_for_rescore_mp_s']:.3f}")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")

    def log(msg: str) -> None:
        print(f"[speed] {msg}", file=sys.stderr, flush=True)

    p: Preset = a.preset
    load_start = _load_avg()
    machine = describe_text()
    log(machine)
    raw = measure_speed(p, a.device, log)
    iou = {name: int8_iou(name, p.iou_train_steps, log) for name in p.iou_datasets} if a.device == "cpu" else {}
    res = {
        "command": " ".join(["python -m ml_backend.benchmarks.speed", *(argv if argv is not None else sys.argv[1:])]),
        "device": a.device, "machine": machine, "preset": p.__dict__, "rounds": p.rounds,
        "load_start": load_start, "load_end": _load_avg(), "flops_per_mp": raw["flops_per_mp"],
        "configured_engine": raw["configured_engine"], "summary": raw["summary"], "training": raw["training"],
        "iou": iou, "raw": {"rounds": raw["rounds"]},
    }  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "speed.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (a.out / "speed.md").write_text(markdown(res))
    print(markdown(res))
    log(f"wrote {a.out / 'speed.json'} and {a.out / 'speed.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
