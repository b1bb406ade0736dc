"""Helpers for the strategy tests: small, fully filled pool batches (every optional field present)."""

from __future__ import annotations

import numpy as np

from ml_backend.strategies import PoolBatch


def softmax(logits: np.ndarray, axis: int) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def make_batch(n: int = 12, c: int = 2, size: int = 8, t: int = 3, e: int = 3, d: int = 5, seed: int = 0):
    """A pool batch whose fields are consistent random softmax maps (MC/ensemble members perturb the mean)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(scale=2.0, size=(n, c, size, size))
    return PoolBatch(
        probs=softmax(base, axis=1),
        mc_probs=softmax(base[None] + rng.normal(size=(t, n, c, size, size)), axis=2),
        embeddings=rng.normal(size=(n, d)).astype(np.float32),
        ensemble_probs=softmax(base[None] + rng.normal(size=(e, n, c, size, size)), axis=2),
    )


def binary_probs(p_fg: np.ndarray) -> np.ndarray:
    """(n, H, W) foreground probabilities -> (n, 2, H, W) softmax maps."""
    p = np.asarray(p_fg, dtype=np.float32)
    return np.stack([1.0 - p, p], axis=1)
