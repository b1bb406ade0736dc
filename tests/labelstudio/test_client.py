"""SDK client helpers: retry/backoff and clear errors, annotation selection rules.

Calls against a real Label Studio are covered by tests/integration; here: the failure paths that need no server.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from label_studio_sdk.core.api_error import ApiError

from ml_backend.config import Settings
from ml_backend.labelstudio import client
from ml_backend.labelstudio.client import (
    LabelStudioAuthError,
    LabelStudioError,
    LabelStudioUnavailable,
    call,
    connect,
    latest_annotations,
)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Flaky:
    def __init__(self, failures: list[BaseException]):
        self.failures = list(failures)
        self.calls = 0

    def __call__(self, **kwargs):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return kwargs


def test_call_retries_transient_errors_with_exponential_backoff(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(client.time, "sleep", sleeps.append)
    fn = _Flaky([httpx.ConnectError("refused"), ApiError(status_code=503, body="busy")])
    assert call(None, fn, x=1, what="testing", attempts=5, base_delay=0.5) == {"x": 1}
    assert fn.calls == 3
    assert sleeps == [0.5, 1.0]


def test_call_gives_up_with_labelstudio_unavailable(monkeypatch):
    monkeypatch.setattr(client.time, "sleep", lambda s: None)
    fn = _Flaky([httpx.ConnectError("refused")] * 10)
    with pytest.raises(LabelStudioUnavailable, match="listing things failed 3 times"):
        call(None, fn, what="listing things", attempts=3)
    assert fn.calls == 3


def test_call_does_not_retry_client_errors():
    fn = _Flaky([ApiError(status_code=400, body={"detail": "bad"})])
    with pytest.raises(LabelStudioError, match="HTTP 400 while creating"):
        call(None, fn, what="creating", attempts=5)
    assert fn.calls == 1
    fn = _Flaky([ApiError(status_code=401, body="no")])
    with pytest.raises(LabelStudioAuthError, match="refused the API token"):
        call(None, fn, what="x", attempts=5)
    assert fn.calls == 1


def test_connect_to_nothing_is_unavailable_quickly():
    s = Settings.from_env(label_studio_url=f"http://127.0.0.1:{_closed_port()}", label_studio_api_key="k" * 40)
    t0 = time.monotonic()
    with pytest.raises(LabelStudioUnavailable, match="is unavailable: checking the API token"):
        connect(s, attempts=2)
    assert time.monotonic() - t0 < 10


def test_closed_port_is_retried_with_growing_delays_then_names_the_url(caplog):
    """A real refused connection (nothing listens): tenacity's backoff doubles, and the error names the URL."""
    url = f"http://127.0.0.1:{_closed_port()}"
    s = Settings.from_env(label_studio_url=url, label_studio_api_key="k" * 40)
    t0 = time.monotonic()
    with (
        caplog.at_level("WARNING", logger="ml_backend.labelstudio.client"),
        pytest.raises(LabelStudioUnavailable, match=f"Label Studio at {url}.* failed 4 times"),
    ):
        connect(s, attempts=4)
    elapsed = time.monotonic() - t0
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert [m.split(" in ")[-1] for m in retries] == ["0.5 s", "1.0 s", "2.0 s"]
    assert 3.5 <= elapsed < 15


def test_connect_without_token_says_where_to_get_one():
    with pytest.raises(LabelStudioAuthError, match="LABEL_STUDIO_API_KEY is not set"):
        connect(Settings.from_env(label_studio_url="http://127.0.0.1:8080", label_studio_api_key=""))


def _ann(i, updated, **kw):
    return {"id": i, "updated_at": updated, "result": [{"x": i}], **kw}


def test_latest_annotations_rules():
    tasks = [
        {"id": 1, "annotations": [_ann(10, "2024-01-01T00:00:00Z"), _ann(11, "2024-02-01T00:00:00Z")]},
        {
            "id": 2,
            "annotations": [_ann(20, "2024-01-01T00:00:00Z"), _ann(21, "2024-03-01T00:00:00Z", was_cancelled=True)],
        },
        {"id": 3, "annotations": [_ann(30, "2024-01-01T00:00:00Z", was_cancelled=True)]},
        {"id": 4, "annotations": []},
        {
            "id": 5,
            "annotations": [_ann(50, "2024-01-01T00:00:00Z", ground_truth=True), _ann(51, "2024-05-01T00:00:00Z")],
        },
        {"id": 6, "annotations": [{"id": 60, "updated_at": "2024-01-01T00:00:00Z", "result": []}]},
        {"id": 7},
    ]
    chosen = latest_annotations(tasks)
    assert {tid: a["id"] for tid, a in chosen.items()} == {1: 11, 2: 20, 5: 50, 6: 60}
