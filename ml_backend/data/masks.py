"""The mask value shared by every layer that reads annotation masks (training, strategies, the benchmark).

It sits in ``data/``, below ``strategies/`` and ``training/``, so that ``strategies.region`` need not import
``training`` (issue 19); ``ml_backend.training.metrics.IGNORE`` re-exports it.
"""

IGNORE = -1  # mask value for unknown pixels (sparse label config: unpainted)

__all__ = ["IGNORE"]
