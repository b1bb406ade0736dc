"""Compatibility shim: the machine description lives in ``ml_backend.benchmarks.machine``."""

from ml_backend.benchmarks.machine import cpu_model, describe, describe_text

__all__ = ["cpu_model", "describe", "describe_text"]
