"""The backend's own counters: requests and errors per route, /predict tasks and latency, of one process.

``Metrics`` is what ``GET /metrics`` answers as JSON; ``prometheus_text`` writes the same snapshot in Prometheus'
text exposition format (``/metrics?format=prometheus``). gunicorn workers each keep their own (``pid`` tells them
apart).
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from typing import Any

__all__ = ["Metrics", "prometheus_text"]


class Metrics:
    """Thread-safe counters of one process (gunicorn workers each keep their own; ``pid`` tells them apart)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.predict = {"requests": 0, "tasks": 0, "failed_tasks": 0, "cold_start_tasks": 0, "queued_tasks": 0}
        self.latencies: list[float] = []  # last 1000 /predict latencies (seconds)
        self.latency_total = 0.0

    def record(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[route] += 1
            if status >= 400:
                self.errors[f"{route} {status}"] += 1

    def record_predict(self, seconds: float, tasks: int, failed: int, cold: bool, queued: int = 0) -> None:
        with self._lock:
            self.predict["requests"] += 1
            self.predict["tasks"] += tasks
            self.predict["failed_tasks"] += failed
            self.predict["queued_tasks"] += queued  # not done by the deadline: predicted in the background
            if cold:
                self.predict["cold_start_tasks"] += tasks - failed
            self.latency_total += seconds
            self.latencies.append(seconds)
            del self.latencies[:-1000]

    def snapshot(self) -> dict:
        with self._lock:
            lat = sorted(self.latencies)
            count = self.predict["requests"]

            def pct(q: float) -> float | None:
                return round(lat[min(len(lat) - 1, int(q * len(lat)))], 4) if lat else None

            return {
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 1),
                "requests": dict(self.requests),
                "errors": dict(self.errors),
                "predict": dict(self.predict),
                "predict_latency_s": {
                    "count": count,
                    "mean": round(self.latency_total / count, 4) if count else None,
                    "p50": pct(0.5),
                    "p95": pct(0.95),
                    "max": round(lat[-1], 4) if lat else None,
                },
            }


def prometheus_text(snap: dict) -> bytes:
    """The JSON counters in Prometheus' text exposition format (this process only: gunicorn workers add ``pid``)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    pid = str(snap["pid"])

    class _Snapshot:
        def collect(self) -> Any:
            requests_ = CounterMetricFamily("mlbackend_requests", "HTTP requests by route", labels=["pid", "route"])
            for route, count in sorted(snap["requests"].items()):
                requests_.add_metric([pid, route], count)
            errors = CounterMetricFamily(
                "mlbackend_errors", "HTTP error answers by route and status", labels=["pid", "route", "status"]
            )
            for key, count in sorted(snap["errors"].items()):
                route, _, status = key.rpartition(" ")
                errors.add_metric([pid, route, status], count)
            predict = CounterMetricFamily("mlbackend_predict", "/predict requests and tasks", labels=["pid", "kind"])
            for kind, count in snap["predict"].items():
                predict.add_metric([pid, kind], count)
            loads = CounterMetricFamily("mlbackend_model_loads", "models loaded by this process", labels=["pid"])
            loads.add_metric([pid], snap["model_loads"])
            latency = GaugeMetricFamily(
                "mlbackend_predict_latency_seconds", "/predict latency of the last 1000 requests", labels=["pid", "q"]
            )
            for q, value in snap["predict_latency_s"].items():
                if q != "count" and value is not None:
                    latency.add_metric([pid, q], value)
            uptime = GaugeMetricFamily("mlbackend_uptime_seconds", "seconds since this process started", labels=["pid"])
            uptime.add_metric([pid], snap["uptime_s"])
            yield from (requests_, errors, predict, loads, latency, uptime)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot())
    return generate_latest(registry)
