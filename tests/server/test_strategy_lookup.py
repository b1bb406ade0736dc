"""One project-strategy lookup with one error policy (issue 19, ``strategies.resolve.project_strategy``).

Setting a strategy that does not exist is the caller's error: /setup answers 400 and stores nothing. A stored
strategy that no longer resolves (removed by an upgrade, or a damaged state file) is not: every reader (the
training job, the /predict backlog job, /predict, the status page) uses the deployment's default, logs a warning
once, and the status page shows it on the project's section.
"""

from __future__ import annotations

import json
import logging

import pytest
from server_helpers import DENSE_XML, task

PROJECT = "7.1700000000"
JSON = {"Accept": "application/json"}


def _setup(client, extra_params=None):
    body = {"project": PROJECT, "schema": DENSE_XML}
    if extra_params is not None:
        body["extra_params"] = extra_params
    return client.post("/setup", json=body)


def _predict(client, tasks):
    return client.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": DENSE_XML})


def _state_file(settings):
    return settings.model_dir / "projects" / "7" / "state.json"


def _store_unknown_strategy(settings):
    state = json.loads(_state_file(settings).read_text())
    state.update(strategy="no-longer-registered", strategy_params={"aggregation": "sum"})
    _state_file(settings).write_text(json.dumps(state))


def _damage_state_file(settings):
    _state_file(settings).write_text("{not json")


def test_every_reader_uses_the_one_lookup():
    import ml_backend.jobs.backlog  # noqa: F401  (imports it from jobs.train inside the job)
    from ml_backend.jobs import train
    from ml_backend.strategies import resolve

    assert train.project_strategy is resolve.project_strategy


@pytest.mark.parametrize("name", ["nope", "no-longer-registered"])
def test_an_unknown_strategy_is_refused_when_it_is_set(client, settings, name):
    assert _setup(client, {"strategy": "margin"}).status_code == 200
    before = _state_file(settings).read_bytes()
    r = _setup(client, {"strategy": name})
    assert r.status_code == 400
    assert f"unknown strategy {name!r}" in r.get_json()["reason"]
    assert _state_file(settings).read_bytes() == before  # nothing stored: margin stays


@pytest.mark.parametrize("damage", [_store_unknown_strategy, _damage_state_file], ids=["unknown-stored", "unreadable"])
def test_a_stored_strategy_that_no_longer_resolves_falls_back_to_the_default_everywhere(
    client, settings, publish, caplog, damage
):
    from ml_backend.strategies.resolve import project_strategy

    publish(7)
    assert _setup(client, {"strategy": "entropy"}).status_code == 200  # the deployment default, set explicitly
    expected = _predict(client, [task(1, "t0.png"), task(2, "t1.png")]).get_json()
    assert _setup(client, {"strategy": "margin"}).status_code == 200
    damage(settings)

    with caplog.at_level(logging.WARNING, logger="ml_backend.strategies"):
        # the training job and the backlog job
        strategy = project_strategy(7, settings)
        assert strategy.name == settings.strategy and strategy.params() == {"aggregation": settings.aggregation}
        # /predict: answered with the default's scores, never a 400
        r = _predict(client, [task(1, "t0.png"), task(2, "t1.png")])
        assert r.status_code == 200, r.get_data(as_text=True)[:300]
        body = r.get_json()
        assert body["errors"] == []
        assert [x["score"] for x in body["results"]] == pytest.approx([x["score"] for x in expected["results"]])
        # the status page says why
        status = client.get("/status/7", headers=JSON).get_json()
    problems = " ".join(status["projects"][0]["problems"])
    assert f"using the default strategy {settings.strategy!r} (STRATEGY)" in problems
    if damage is _store_unknown_strategy:
        assert "unknown strategy 'no-longer-registered'" in problems
    else:
        assert "unreadable state.json" in problems
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "using the default strategy" in w]) == 1, warnings  # once per process

    # a new /setup with a valid strategy replaces it
    assert _setup(client, {"strategy": "margin"}).status_code == 200
    assert project_strategy(7, settings).name == "margin"
    assert not client.get("/status/7", headers=JSON).get_json()["projects"][0]["problems"]
