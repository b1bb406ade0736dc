"""Inference engines (ml_backend.inference.precision): BatchNorm fusion, ONNX Runtime fp32 / int8, the settings that
choose them for /predict and the re-scoring, FLOP counting, and the speed benchmark's --quick run."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ml_backend.config import ConfigError, Settings
from ml_backend.data.synthetic import generate_em_like
from ml_backend.imaging import normalize
from ml_backend.inference import precision
from ml_backend.inference.precision import (
    InferenceUNet,
    count_flops,
    fuse_batchnorm,
    inference_model,
    onnxruntime_available,
    resolve_engine,
)
from ml_backend.inference.scoring import ScoringConfig, score_images
from ml_backend.inference.tiling import predict_tiled
from ml_backend.model import build_model
from ml_backend.strategies import get_strategy
from ml_backend.training.trainer import TrainConfig, fine_tune

REPO = Path(__file__).resolve().parents[2]
needs_ort = pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime / onnx not installed")


def _bn_unet(seed: int = 0, width: int = 8, depth: int = 2) -> nn.Module:
    """A BatchNorm U-Net whose BatchNorm layers do something (non-trivial statistics and affine parameters)."""
    torch.manual_seed(seed)
    model = build_model("unet", width=width, depth=depth, norm="batch").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model


@pytest.fixture(scope="module")
def trained():
    """A tiny BatchNorm U-Net trained for real (seconds) on generated EM-like tiles, and held-out tiles + masks."""
    images, masks = generate_em_like(12, 64, seed=5)
    imgs = [normalize(i) for i in images]
    torch.manual_seed(0)
    model = build_model("unet", width=8, depth=2, norm="batch")
    cfg = TrainConfig(steps=60, lr=3e-3, batch_size=4, crop=64, eval_every=0, val_fraction=0.0, seed=0)
    fine_tune(model, imgs[:8], [m.astype(np.int64) for m in masks[:8]], cfg)
    return model.eval(), imgs[:8], imgs[8:], masks[8:]


def test_batchnorm_fusion_gives_the_same_outputs_and_leaves_the_model_alone():
    model = _bn_unet().train()  # the caller's mode must survive
    fused = fuse_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0 and model.training
    x = torch.randn(2, 1, 40, 36)
    model.eval()
    with torch.no_grad():
        ref, got = model(x), fused(x)
    assert ref.abs().max() > 0.1  # the BatchNorm layers matter for this output
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_flop_count_matches_a_hand_computed_convolution():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    # each of the 8 x 16 x 16 outputs is a dot product of length 3 * 3 * 3: that many multiply-adds, 2 FLOPs each
    assert count_flops(conv, (1, 3, 16, 16)) == 2 * (8 * 16 * 16) * (3 * 3 * 3)
    assert count_flops(conv, (4, 3, 16, 16)) == 4 * count_flops(conv, (1, 3, 16, 16))


def test_engine_resolution_on_cpu_and_what_cuda_would_get():
    ort = onnxruntime_available()
    auto = resolve_engine("auto", "auto", "cpu")
    assert (auto.precision, auto.runtime) == ("fp32", "onnxruntime" if ort else "torch")
    assert resolve_engine("auto", "torch", "cpu").runtime == "torch"
    assert resolve_engine("bf16", "torch", "cpu").precision == "fp32"  # autocast is a CUDA-only setting
    cuda = resolve_engine("auto", "auto", "cuda")  # only resolved here: building it needs a GPU
    assert (cuda.precision, cuda.runtime) == ("bf16", "torch")
    assert resolve_engine("int8", "onnxruntime", "cuda").precision == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_engine("int4", "auto", "cpu")
    with pytest.raises(ValueError, match="runtime"):
        resolve_engine("fp32", "tensorrt", "cpu")


def test_settings_validate_and_default_to_the_measured_cpu_path():
    s = Settings.from_env()
    assert (s.inference_precision, s.inference_runtime, s.cuda_tuning) == ("auto", "auto", True)
    cfg = ScoringConfig.from_settings(s.replace(inference_precision="int8", int8_calibration_tiles=3))
    assert (cfg.runtime, cfg.precision, cfg.calibration_tiles) == ("auto", "int8", 3)
    assert ScoringConfig().runtime is None  # direct callers keep the model as given
    fields = Settings.model_fields
    assert set(fields["inference_precision"].annotation.__args__) == set(precision.PRECISIONS)
    assert set(fields["inference_runtime"].annotation.__args__) == set(precision.RUNTIMES)
    with pytest.raises(ConfigError, match="INFERENCE_PRECISION"):
        Settings.from_env(inference_precision="int4")
    with pytest.raises(ConfigError, match="INFERENCE_RUNTIME"):
        Settings.from_env(inference_runtime="tensorrt")


def test_the_engine_settings_are_in_the_readme_table_with_their_defaults():
    readme = (REPO / "README.md").read_text()
    defaults = dict(Settings.documented())
    for var in ("INFERENCE_PRECISION", "INFERENCE_RUNTIME", "INT8_CALIBRATION_TILES", "CUDA_TUNING"):
        assert f"| `{var}` | `{defaults[var]}` |" in readme, var


def test_torch_engine_matches_the_model_on_every_inference_entry_point():
    model = _bn_unet(width=4, depth=3)
    net = inference_model(model, "fp32", "torch", "cpu")
    assert isinstance(net, InferenceUNet) and list(net.parameters()) == []
    x = torch.randn(3, 1, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(net.embed(x), model.embed(x), atol=1e-5, rtol=1e-4)
        xp = torch.randn(2, 1, 32, 32)
        feats, ref = net.encode(xp), model.encode(xp)
        assert len(feats) == len(ref)
        torch.testing.assert_close(net.decode(feats), model.decode(ref), atol=1e-5, rtol=1e-4)
    assert inference_model(model, "fp32", "torch", "cpu") is net  # cached
    not_a_unet = nn.Conv2d(1, 2, 1)
    assert inference_model(not_a_unet, "fp32", "torch", "cpu") is not_a_unet


def test_engine_is_rebuilt_when_the_weights_change_in_place():
    model = _bn_unet(width=4, depth=2)
    first = inference_model(model, "fp32", "torch", "cpu")
    model.load_state_dict(_bn_unet(seed=1, width=4, depth=2).state_dict())
    second = inference_model(model, "fp32", "torch", "cpu")
    assert second is not first
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(second(x), model(x), atol=1e-5, rtol=1e-4)


@needs_ort
def test_onnxruntime_fp32_matches_pytorch_including_mc_dropout_passes():
    model = _bn_unet(width=4, depth=3)
    net = inference_model(model, "fp32", "onnxruntime", "cpu")
    x = torch.randn(2, 1, 40, 24)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), atol=1e-4, rtol=1e-4)
        xp = torch.randn(2, 1, 32, 32)
        feats = net.encode(xp)
        emb = model.encode(xp)[-1].mean(dim=(2, 3))
        torch.testing.assert_close(feats[-1].mean(dim=(2, 3)), emb, atol=1e-4, rtol=1e-4)  # score_pool's embedding
        torch.testing.assert_close(net.embed(x), model.embed(x), atol=1e-4, rtol=1e-4)
        torch.manual_seed(3)
        mc = net.decode(feats, mc_dropout=True)  # needs the real skips: computed by the fused PyTorch encoder
        torch.manual_seed(3)
        ref = model.decode(model.encode(xp), mc_dropout=True)
    torch.testing.assert_close(mc, ref, atol=1e-4, rtol=1e-4)


@needs_ort
def test_int8_and_fp32_masks_nearly_agree_on_a_trained_model(trained):
    model, calib, held_out, masks = trained
    fp32 = inference_model(model, "fp32", "onnxruntime", "cpu")
    int8 = inference_model(model, "int8", "onnxruntime", "cpu", calibration=calib)
    assert int8 is not fp32
    agree, total, fg = 0, 0, 0
    for img, truth in zip(held_out, masks, strict=True):
        a = predict_tiled(fp32, img, tile=64, overlap=16, device="cpu").argmax(0)
        b = predict_tiled(int8, img, tile=64, overlap=16, device="cpu").argmax(0)
        agree += int((a == b).sum())
        total += a.size
        fg += int(a.sum())
        assert truth.shape == a.shape
    assert fg > 0.01 * total  # the model segments something: agreement is not on an all-background answer
    # Tolerance: int8 masks agree with fp32 on at least 97% of held-out pixels (quantisation moves boundaries).
    assert agree / total >= 0.97


@needs_ort
def test_the_setting_switches_the_engine_used_by_scoring_and_predict(trained, monkeypatch):
    from ml_backend.labelstudio.prediction import _score_group

    model, calib, held_out, _ = trained
    ran: list[tuple[str, str]] = []
    original = InferenceUNet._run

    def spy(self, x):
        ran.append((self.engine.runtime, self.engine.precision))
        return original(self, x)

    monkeypatch.setattr(InferenceUNet, "_run", spy)
    base = Settings.from_env(device="cpu", tile_size=64, tile_overlap=16)
    strategy = get_strategy("entropy")
    for setting, engine in (("int8", ("onnxruntime", "int8")), ("fp32", ("onnxruntime", "fp32"))):
        settings = base.replace(inference_precision=setting)
        ran.clear()
        score_images(model, calib[:3], strategy, ScoringConfig.from_settings(settings))  # the re-scoring's path
        assert ran and set(ran) == {engine}
        ran.clear()
        out = _score_group(model, held_out[:2], strategy, settings, torch.device("cpu"), 0)  # /predict's path
        assert ran and set(ran) == {engine} and len(out) == 2
    ran.clear()
    score_images(model, calib[:2], strategy, ScoringConfig.from_settings(base.replace(inference_runtime="torch")))
    assert set(ran) == {("torch", "fp32")}
    ran.clear()
    score_images(model, calib[:2], strategy, ScoringConfig(tile_size=64))  # no runtime: the model itself
    assert ran == []


def test_cpu_training_with_cuda_precision_settings_stays_fp32():
    images, masks = generate_em_like(4, 32, seed=2)
    for prec in ("fp16", "bf16"):
        torch.manual_seed(0)
        model = build_model("unet", width=4, depth=2, norm="batch")
        cfg = TrainConfig(steps=3, batch_size=2, crop=32, eval_every=0, val_fraction=0.0, precision=prec)
        result = fine_tune(model, [normalize(i) for i in images], [m.astype(np.int64) for m in masks], cfg)
        assert result.steps == 3 and np.isfinite(result.metrics["train_loss"])
        assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="int8")


def test_int8_without_calibration_images_is_refused(caplog):
    if not onnxruntime_available():
        with pytest.raises(RuntimeError, match="onnxruntime"):
            resolve_engine("int8", "auto", "cpu")
        return
    with caplog.at_level(logging.INFO), pytest.raises(ValueError, match="calibration"):
        precision.inference_model(_bn_unet(width=4, depth=2), "int8", "auto", "cpu", calibration=[])


def test_speed_benchmark_quick_mode_writes_its_json(tmp_path):
    out = tmp_path / "speed"
    proc = subprocess.run(
        [sys.executable, "-m", "ml_backend.benchmarks.speed", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "speed.json").read_text())
    s = res["summary"]
    assert res["flops_per_mp"] > 0 and s["ceiling_gflop_s"] > 0
    assert "eager fp32 (PyTorch)" in s["forward"] and all(f["mp_s"] > 0 for f in s["forward"].values())
    assert s["predict"]["mp_s"] > 0 and s["rescore"]["mp_s"] > 0 and res["training"]["steps_s"] > 0
    assert res["raw"]["rounds"][0]["load_avg"]
    if onnxruntime_available():
        assert "int8_speedup_vs_ort_fp32" in s and res["iou"]["synthetic"]["iou_change"] is not None
    assert "| forward, eager fp32 (PyTorch)" in (out / "speed.md").read_text()
