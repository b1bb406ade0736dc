"""The load benchmark's pieces that need no server (``ml_backend.benchmarks.load``; ``scripts/bench_load.py`` wraps
it): the command line, the per-route statistics, the request bodies and their checks, and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ml_backend.benchmarks import load

REPO = Path(__file__).resolve().parents[2]


def test_command_line_defaults_and_limits():
    args = load.parse_args([])
    assert (args.duration, args.baseline, args.predict_count, args.webhook_count) == (60.0, 15.0, 1000, 40000)
    assert (args.predict_concurrency, args.webhook_concurrency, args.workers, args.threads) == (4, 8, 2, 4)
    assert Path(args.out) == REPO / "benchmarks" / "load.md" and args.json == ""
    args = load.parse_args(["--duration", "30", "--predict-count", "100", "--webhook-count", "2000", "--out", ""])
    assert (args.duration, args.predict_count, args.webhook_count, args.out) == (30.0, 100, 2000, "")
    with pytest.raises(SystemExit):
        load.parse_args(["--tiles", "0"])


def test_route_stats_summary():
    stats = load.RouteStats()
    for ms in range(1, 101):  # 1 .. 100 ms
        stats.add(ms / 1000, None)
    stats.add(1.5, "HTTP 500: boom")
    s = stats.summary(wall_s=10.0)
    assert s["requests"] == 101 and s["throughput_per_s"] == 10.1
    assert (s["p50_ms"], s["p99_ms"], s["max_ms"]) == (51.0, 100.0, 1500.0)
    assert s["errors"] == 1 and s["error_examples"] == ["HTTP 500: boom"] and s["over_1s"] == 1
    empty = load.RouteStats().summary(wall_s=0.0)
    assert empty["requests"] == 0 and empty["p50_ms"] is None and empty["throughput_per_s"] is None


def test_webhook_bodies_and_answers():
    path, body = load.Stack.webhook_payload(5001)
    assert path == "/webhook" and body["action"] == "ANNOTATION_CREATED"
    assert body["annotation"]["id"] == 105001 and body["task"] == {"id": 2, "project": load.PROJECT_ID}
    assert all(load.Stack.check_webhook({"status": s}) is None for s in ("counted", "queued", "coalesced"))
    assert "webhook answer" in load.Stack.check_webhook({"status": "ignored"})


def test_report_lists_every_phase_and_route():
    args = load.parse_args(["--out", ""])
    route = {"requests": 10, "throughput_per_s": 2.0, "p50_ms": 5.0, "p99_ms": 9.0, "max_ms": 9.5, "mean_ms": 5.1,
             "errors": 0, "error_examples": [], "over_1s": 0}  # fmt: skip
    results = {
        "phases": [{"phase": "webhook only", "wall_s": 5.0, "routes": {"/webhook": route}},
                   {"phase": "mixed", "wall_s": 5.0, "routes": {"/webhook": route, "/predict": route}}],
        "memory": {"peak_total_mib": 800.0, "peak_single_mib": 300.0},
        "queued_training_jobs": 1, "errors_total": 0, "webhook_p99_mixed_ms": 9.0,
    }  # fmt: skip
    text = load.report(args, "test machine", results)
    assert text.startswith("# Load benchmark (issue 9)") and "Machine: test machine" in text
    assert "| mixed (5 s) | /predict | 10 | 2.0 | 5.0 ms | 9.0 ms | 9.5 ms | 0 | - |" in text
    assert "| webhook only (5 s) | /webhook | 10 |" in text and "**800.0 MiB**" in text
    assert json.loads(text.split("```json\n")[1].split("```")[0]) == results


def test_the_script_is_the_module():
    out = subprocess.run([sys.executable, "scripts/bench_load.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout  # fmt: skip
    assert "--predict-concurrency" in out and "Load benchmark" in out
