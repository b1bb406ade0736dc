"""Inference engines for the U-Net: the fast paths /predict and the re-scoring run on (``INFERENCE_PRECISION``,
``INFERENCE_RUNTIME``).

Why (profiled on a 2-core CPU, ``python -m ml_backend.benchmarks.speed``, BENCHMARKS.md "Speed"): the eager
PyTorch forward spends about half its time outside the convolutions, in BatchNorm (15%), ReLU (15%), ``cat`` and
max-pooling over wide full-resolution maps. So:

* BatchNorm is folded into the preceding convolution for inference (``fuse_batchnorm``: same outputs within float
  rounding, one pass over each map less);
* on CPU the fused model is exported to ONNX and run by ONNX Runtime (``INFERENCE_RUNTIME=auto``), whose MLAS
  kernels fuse the ReLU into the convolution and run the width-16 layers far closer to the machine's matmul speed;
* ``INFERENCE_PRECISION=int8`` quantises that graph statically (ONNX Runtime QDQ, per-channel int8 weights, uint8
  activations whose ranges come from MinMax calibration on the first images the engine is asked to score): the
  AVX-512 VNNI / AVX2 integer kernels. Off by default; the benchmark measures its speed-up and its IoU change on
  VNC and Lucchi before it may become the default;
* on CUDA the fused model runs in PyTorch under ``torch.autocast`` (bf16 by default, fp16 on request) in
  channels-last layout with ``cudnn.benchmark`` (``CUDA_TUNING``). These branches only run where a GPU exists.

An engine is built once per model and precision and cached (``inference_model``); it is rebuilt when the model's
weights change in place (tensor version counters). The wrapper (``InferenceUNet``) has the U-Net's inference
interface (``forward``, ``encode``, ``decode``, ``embed``, ``hparams``) so ``predict_tiled`` and ``score_pool`` use
it unchanged; MC-dropout decoder passes (BALD) run the fused fp32/autocast PyTorch decoder on the encoder's real
features. The caller's model is never modified (its mode, layout and weights stay as they were).
"""

from __future__ import annotations

import copy
import importlib.util
import io
import logging
import tempfile
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ml_backend.model.unet import UNet

log = logging.getLogger(__name__)

__all__ = [
    "PRECISIONS",
    "RUNTIMES",
    "Engine",
    "InferenceUNet",
    "count_flops",
    "fuse_batchnorm",
    "inference_model",
    "onnxruntime_available",
    "resolve_engine",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
RUNTIMES = ("auto", "torch", "onnxruntime")
ONNX_OPSET = 17
DEFAULT_CALIBRATION_TILES = 16


@dataclass(frozen=True)
class Engine:
    """A resolved engine: what actually runs (never "auto")."""

    precision: str  # fp32 | bf16 | fp16 | int8
    runtime: str  # torch | onnxruntime
    device: torch.device
    cuda_tuning: bool = True  # CUDA only: channels-last, cudnn.benchmark


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime (and the onnx package its exporter and quantiser need) can be imported."""
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def resolve_engine(
    precision: str = "auto", runtime: str = "auto", device: str | torch.device = "cpu", cuda_tuning: bool = True
) -> Engine:
    """The engine the settings mean on ``device``: auto = bf16 autocast in PyTorch on CUDA, fp32 in ONNX Runtime on
    CPU (PyTorch when ONNX Runtime is not installed). Combinations a device cannot run fall back with a warning
    (int8 on CUDA -> bf16; bf16/fp16 on CPU -> fp32); int8 without ONNX Runtime is an error."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown inference precision {precision!r}; expected one of {PRECISIONS}")
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown inference runtime {runtime!r}; expected one of {RUNTIMES}")
    dev = torch.device(device)
    if dev.type == "cuda":
        if precision == "int8":
            log.warning("INFERENCE_PRECISION=int8 is a CPU path (ONNX Runtime); using bf16 autocast on CUDA")
            precision = "bf16"
        if runtime == "onnxruntime":
            log.warning("INFERENCE_RUNTIME=onnxruntime runs on CPU only; using PyTorch on CUDA")
        return Engine("bf16" if precision == "auto" else precision, "torch", dev, cuda_tuning)
    if precision in ("bf16", "fp16"):
        log.warning("INFERENCE_PRECISION=%s applies to CUDA only; fp32 on %s", precision, dev)
        precision = "fp32"
    precision = "fp32" if precision == "auto" else precision
    have_ort = onnxruntime_available()
    if precision == "int8" and not have_ort:
        raise RuntimeError("INFERENCE_PRECISION=int8 needs ONNX Runtime: pip install onnxruntime onnx")
    if precision == "int8" or (runtime == "onnxruntime" and have_ort):
        return Engine(precision, "onnxruntime", dev, cuda_tuning)
    if runtime == "onnxruntime":
        log.warning("INFERENCE_RUNTIME=onnxruntime but onnxruntime is not installed; using PyTorch")
    if runtime == "auto" and have_ort:
        return Engine(precision, "onnxruntime", dev, cuda_tuning)
    return Engine(precision, "torch", dev, cuda_tuning)


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every Conv2d -> BatchNorm2d pair of its ``nn.Sequential`` blocks folded
    into one convolution (the BatchNorm becomes ``Identity``); ``model`` itself is not touched."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    for block in fused.modules():
        if not isinstance(block, nn.Sequential):
            continue
        layers = list(block)
        for i in range(len(layers) - 1):
            conv, bn = layers[i], layers[i + 1]
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                block[i] = fuse_conv_bn_eval(conv, bn)
                block[i + 1] = nn.Identity()
    return fused


def count_flops(model: nn.Module, shape: Sequence[int]) -> int:
    """FLOPs of one eval forward pass on a zero input of ``shape`` (torch.utils.flop_counter; a multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters(), None)
    x = torch.zeros(*shape, device=param.device if param is not None else "cpu")
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


class _Graph(nn.Module):
    """What is exported: padded input -> (logits, bottleneck's spatial mean as a 1 x 1 map), so one graph serves
    forward, encode and embed. Every consumer of the bottleneck averages it (embeddings); averaging inside the graph
    spares a multi-threaded torch reduction per batch (2% of a /predict request, profiled)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.net.encode(x)
        return self.net.decode(feats), feats[-1].mean(dim=(2, 3), keepdim=True)


class _Features(list):
    """``InferenceUNet.encode``'s result: ``depth + 1`` entries like ``UNet.encode`` (the last is the bottleneck; on
    ONNX Runtime its spatial mean as a 1 x 1 map, which averages to the same embedding), plus the logits of the same
    pass. The skips are computed (by the fused PyTorch encoder) only if a caller asks
    for them, i.e. for MC-dropout decoder passes."""

    def __init__(self, items: list[Any], logits: Tensor, x: Tensor, owner: InferenceUNet) -> None:
        super().__init__(items)
        self.logits = logits
        self.x = x
        self._owner = owner
        self._real: list[Tensor] | None = None

    def real(self) -> list[Tensor]:
        if self._real is None:
            self._real = list(self) if all(t is not None for t in self) else self._owner._torch_encode(self.x)
        return self._real


class InferenceUNet(nn.Module):
    """A U-Net for inference only, on one ``Engine``; same inference interface as ``UNet``.

    It holds a BatchNorm-fused copy of the weights (not a registered sub-module: ``parameters()`` is empty, so
    callers that move or re-layout "the model" leave this one alone) and, on ONNX Runtime, the session.
    """

    def __init__(self, base: nn.Module, engine: Engine, calibration: Sequence[np.ndarray] = ()) -> None:
        super().__init__()
        self.hparams: dict[str, Any] = dict(base.hparams)
        self.depth = int(base.depth)
        self.dropout = float(base.dropout)
        self.engine = engine
        net = fuse_batchnorm(base).to(engine.device)
        if engine.device.type == "cpu" or engine.cuda_tuning:
            net = net.to(memory_format=torch.channels_last)  # oneDNN / cuDNN run NHWC convolutions faster
        object.__setattr__(self, "_net", net)
        self._session: Any = None
        if engine.runtime == "onnxruntime":
            self._session = _ort_session(net, engine.precision, calibration)
        self.eval()

    @property
    def multiple(self) -> int:
        return 2**self.depth

    @property
    def embedding_dim(self) -> int:
        return int(self.hparams["width"]) * 2**self.depth

    def _autocast(self) -> Any:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.engine.precision)
        return torch.autocast(device_type="cuda", dtype=dtype or torch.bfloat16, enabled=self._uses_cuda_amp())

    def _uses_cuda_amp(self) -> bool:
        return self.engine.device.type == "cuda" and self.engine.precision in ("bf16", "fp16")

    def _torch_encode(self, x: Tensor) -> list[Tensor]:
        with torch.inference_mode(), self._autocast():
            return self._net.encode(x.to(self.engine.device))

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor] | None]:
        """(logits fp32, bottleneck fp32, the real features when PyTorch computed them) of a padded input."""
        if self._session is not None:
            arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
            logits, bottleneck = self._session.run(None, {"x": arr})
            return torch.from_numpy(logits), torch.from_numpy(bottleneck), None
        with torch.inference_mode(), self._autocast():
            feats = self._net.encode(x.to(self.engine.device))
            logits = self._net.decode(feats)
        return logits.float(), feats[-1].float(), feats

    def encode(self, x: Tensor) -> _Features:
        if x.ndim != 4:
            raise ValueError(f"expected input of shape (N, C, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ValueError(f"encode needs H, W multiples of {self.multiple} (got {h}x{w}); forward() takes any size")
        logits, bottleneck, feats = self._run(x)
        items: list[Any] = list(feats) if feats is not None else [None] * self.depth + [bottleneck]
        items[-1] = bottleneck
        return _Features(items, logits, x, self)

    def decode(self, feats: list[Tensor], mc_dropout: bool = False) -> Tensor:
        if isinstance(feats, _Features) and not mc_dropout:
            return feats.logits
        real = feats.real() if isinstance(feats, _Features) else feats
        with torch.inference_mode(), self._autocast():
            return self._net.decode(real, mc_dropout=mc_dropout).float()

    def forward(self, x: Tensor, mc_dropout: bool = False) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected input of shape (N, C, H, W), got {tuple(x.shape)}")
        xp, h, w = self._net._pad(x)
        if mc_dropout:
            return self.decode(self._torch_encode(xp), mc_dropout=True)[..., :h, :w]
        return self._run(xp)[0][..., :h, :w]

    def embed(self, x: Tensor) -> Tensor:
        xp, _, _ = self._net._pad(x)
        return self._run(xp)[1].mean(dim=(2, 3))


def _export_onnx(net: nn.Module) -> bytes:
    """The fused network as an ONNX graph with dynamic batch and spatial sizes (legacy TorchScript exporter:
    fast, no onnxscript needed)."""
    graph = _Graph(net).eval()
    c = int(net.hparams["in_channels"])
    side = max(32, 2 * 2 ** int(net.depth))
    buf = io.BytesIO()
    dims = {0: "n", 2: "h", 3: "w"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (torch.zeros(1, c, side, side),), buf, input_names=["x"], output_names=["logits", "bottleneck"],
            dynamic_axes={"x": dims, "logits": dims, "bottleneck": dims}, opset_version=ONNX_OPSET, dynamo=False,
        )  # fmt: skip
    net.eval()  # the exporter restores the wrapper's mode, which is eval; keep the net's explicit
    return buf.getvalue()


def _calibration_batches(net: nn.Module, images: Sequence[np.ndarray], limit: int) -> Iterator[dict[str, np.ndarray]]:
    """One padded (1, C, H, W) input per calibration image, at most ``limit`` of them (crops of <= 512 px)."""
    for img in list(images)[:limit]:
        arr = np.asarray(img, dtype=np.float32)
        arr = arr[None] if arr.ndim == 2 else arr
        arr = arr[:, :512, :512]
        xp, _, _ = net._pad(torch.from_numpy(np.ascontiguousarray(arr))[None])
        yield {"x": np.ascontiguousarray(xp.numpy())}


def _ort_session(net: nn.Module, precision: str, calibration: Sequence[np.ndarray]) -> Any:
    """An ONNX Runtime session of ``net`` (fp32, or int8 statically quantised on ``calibration``)."""
    import onnxruntime as ort

    model = _export_onnx(net)
    if precision == "int8":
        model = _quantize(net, model, calibration)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    # No busy-waiting between runs: on a shared CPU the spinning threads would steal cores from everything else.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _quantize(net: nn.Module, model: bytes, calibration: Sequence[np.ndarray]) -> bytes:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    images = list(calibration)
    if not images:
        raise ValueError("int8 inference needs calibration images (the first images it is asked to score)")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = _calibration_batches(net, images, len(images))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="ml-backend-int8-") as tmp:
        src, pre, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model)
        # ORT's pre-processing (graph optimisation, shape inference) lets the quantiser see Conv+ReLU as one node:
        # measured 1.8-3.3x the fp32 session against 1.05-1.8x without it (the symbolic shape pass fails on the
        # dynamic sizes and is skipped).
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        )  # fmt: skip
        return dst.read_bytes()


# --------------------------------------------------------------------------------------------------- the cache
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Engine, tuple[tuple, InferenceUNet]]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _fingerprint(model: nn.Module) -> tuple:
    """Changes whenever a weight or buffer is replaced or modified in place (training, load_state_dict, .to())."""
    return tuple((t.data_ptr(), t._version, t.device.type) for t in chain(model.parameters(), model.buffers()))


def inference_model(
    model: nn.Module,
    precision: str = "auto",
    runtime: str = "auto",
    device: str | torch.device = "cpu",
    *,
    calibration: Sequence[np.ndarray] = (),
    calibration_tiles: int = DEFAULT_CALIBRATION_TILES,
    cuda_tuning: bool = True,
) -> nn.Module:
    """The cached ``InferenceUNet`` of ``model`` for these settings; models that are not a ``UNet`` (tests'
    stand-ins, custom networks) are returned as they are. int8 calibrates on the first ``calibration_tiles`` of
    ``calibration`` when the engine is first built."""
    if not isinstance(model, UNet):
        return model
    engine = resolve_engine(precision, runtime, device, cuda_tuning)
    if engine.device.type == "cuda" and engine.cuda_tuning:
        torch.backends.cudnn.benchmark = True  # fixed tile shapes: pick the fastest convolution algorithm once
    fingerprint = _fingerprint(model)
    with _LOCK:
        entries = _CACHE.setdefault(model, {})
        hit = entries.get(engine)
        if hit is not None and hit[0] == fingerprint:
            return hit[1]
        calib = list(calibration)[: max(1, int(calibration_tiles))] if engine.precision == "int8" else []
        built = InferenceUNet(model, engine, calib)
        entries[engine] = (fingerprint, built)
        log.info("inference engine built: %s %s on %s", engine.runtime, engine.precision, engine.device)
        return built
