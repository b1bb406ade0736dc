"""Benchmarks of the product's own code: active-learning learning curves (``protocol``, ``data``, ``run``,
``report``, ``cli``) and the machine description every benchmark reports (``machine``).

The benchmark runs ``ml_backend.active_learning.run_round``, the round the RQ training job runs, with a ground-truth
oracle where the product has Label Studio: its curves measure the product, not a copy of it.
"""

from ml_backend.benchmarks.cli import build_protocol, main, parse_args
from ml_backend.benchmarks.protocol import PRESETS, Protocol
from ml_backend.benchmarks.report import markdown_report, summarize, write_outputs
from ml_backend.benchmarks.run import run_full, run_strategy

__all__ = [
    "PRESETS",
    "Protocol",
    "build_protocol",
    "main",
    "markdown_report",
    "parse_args",
    "run_full",
    "run_strategy",
    "summarize",
    "write_outputs",
]
