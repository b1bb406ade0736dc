"""Basic auth and /health (issue 9, finding 8): a user without a password refuses to start, /health says only "UP",
details and every other route need the credentials when they are configured."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time

import pytest
from server_helpers import DENSE_XML, REPO

from ml_backend.config import ConfigError

PROJECT = "7.1700000000"


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def auth_client(make_client):
    return make_client(basic_auth_user="ls", basic_auth_pass="s3cret")


def test_create_app_refuses_a_user_without_password(monkeypatch, tmp_path):
    from ml_backend.server.app import create_app

    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("BASIC_AUTH_USER", "ls")
    monkeypatch.delenv("BASIC_AUTH_PASS", raising=False)
    with pytest.raises(ConfigError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together"):
        create_app()
    assert not (tmp_path / "projects").exists()


def test_gunicorn_does_not_start_with_a_user_without_password(tmp_path, redis_tools):
    """The real entry point: gunicorn's master exits (worker failed to boot) and the log names the variables."""
    gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    if not os.path.exists(gunicorn):
        pytest.skip("gunicorn is not installed in this environment")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASIC_AUTH")}
    env.update(BASIC_AUTH_USER="ls", MODEL_DIR=str(tmp_path))
    port = redis_tools.free_port()
    t0 = time.monotonic()
    proc = subprocess.run(
        [gunicorn, "--workers", "1", "--bind", f"127.0.0.1:{port}", "ml_backend.server.app:create_app()"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together" in proc.stderr
    assert time.monotonic() - t0 < 60


def test_health_says_up_and_nothing_else(make_client, settings):
    for client in (make_client(), make_client(basic_auth_user="ls", basic_auth_pass="s3cret")):
        for path in ("/health", "/"):
            r = client.get(path)
            assert r.status_code == 200
            assert r.get_json() == {"status": "UP", "model_class": "UNet"}
            assert str(settings.model_dir) not in r.get_data(as_text=True)


def test_health_details_need_auth(auth_client, settings):
    for query in ("details=1", "details=true", "details="):
        r = auth_client.get(f"/health?{query}")
        assert r.status_code == 401 and r.get_json()["status"] == "error"
        assert str(settings.model_dir) not in r.get_data(as_text=True)
    r = auth_client.get("/health?details=1", headers=_basic("ls", "wrong"))
    assert r.status_code == 401
    r = auth_client.get("/health?details=1", headers=_basic("ls", "s3cret"))
    assert r.status_code == 200
    body = r.get_json()
    assert body["model_dir"] == str(settings.model_dir) and body["device"] == "cpu"
    assert body["default_strategy"] == "entropy" and body["basic_auth"] is True


def test_health_details_without_auth_configured(client, settings):
    assert client.get("/health?details=1").get_json()["model_dir"] == str(settings.model_dir)
    assert "model_dir" not in client.get("/health?details=0").get_json()


def test_every_route_but_plain_health_needs_auth(auth_client):
    app = auth_client.application
    checked = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in sorted(rule.methods - {"OPTIONS", "HEAD"}):
            r = auth_client.open(rule.rule, method=method, json={"project": PROJECT, "schema": DENSE_XML})
            open_ = rule.rule in ("/health", "/") and method == "GET"
            assert (r.status_code == 200) if open_ else (r.status_code == 401), (rule.rule, method, r.status_code)
            assert r.get_json()["status"] in ("UP", "error")
            checked.append((rule.rule, method))
    assert {("/setup", "POST"), ("/predict", "POST"), ("/webhook", "POST"), ("/metrics", "GET")} <= set(checked)
    assert {("/versions", "GET"), ("/versions", "POST")} <= set(checked)
    # an unknown route does not tell an unauthenticated caller whether it exists
    assert auth_client.get("/nope").status_code == 401
    ok = auth_client.get("/metrics", headers=_basic("ls", "s3cret"))
    assert ok.status_code == 200 and "requests" in ok.get_json()


def test_auth_refusal_comes_before_body_validation(auth_client, settings):
    """An unauthenticated caller learns nothing from validation and creates nothing."""
    r = auth_client.post("/setup", data="{not json", content_type="application/json")
    assert r.status_code == 401
    r = auth_client.post("/setup", json={"project": "9.1", "schema": DENSE_XML})
    assert r.status_code == 401
    assert not (settings.model_dir / "projects").exists()


def test_prometheus_metrics_behind_auth(auth_client):
    from prometheus_client.parser import text_string_to_metric_families

    assert auth_client.get("/metrics?format=prometheus").status_code == 401
    creds = _basic("ls", "s3cret")
    assert auth_client.post("/setup", json={"project": PROJECT, "schema": DENSE_XML}, headers=creds).status_code == 200
    assert auth_client.post("/setup", json={"project": "-1.1"}, headers=creds).status_code == 400
    r = auth_client.get("/metrics?format=prometheus", headers=creds)
    assert r.status_code == 200 and r.mimetype == "text/plain"
    samples = {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid"))): s.value
        for family in text_string_to_metric_families(r.get_data(as_text=True))
        for s in family.samples
    }
    assert samples[("mlbackend_requests_total", (("route", "/setup"),))] == 2
    assert samples[("mlbackend_errors_total", (("route", "/setup"), ("status", "400")))] == 1
    assert samples[("mlbackend_model_loads_total", ())] == 0
