"""Inference helpers: tiled whole-image prediction and batched tile prediction."""

from ml_backend.inference.tiling import predict_batch, predict_tiled

__all__ = ["predict_batch", "predict_tiled"]
