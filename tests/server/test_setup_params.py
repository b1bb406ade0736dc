"""/setup refuses unbounded strategy parameters (issue 16, item 5), through the Flask app as Label Studio calls it.

The three findings: ``n_init`` 1e9 was stored and a 60-tile selection still ran after 20 s; ``candidates_factor``
Infinity was written into ``state.json`` (not JSON) and the selection overflowed; unknown top-level keys of
``extra_params`` were silently ignored. Each is now a 400 naming what is allowed, with nothing written. A
``state.json`` from an older version holding such parameters no longer stops the training job: it uses the
default strategy and logs a warning.
"""

from __future__ import annotations

import json
import logging

import pytest
from server_helpers import DENSE_XML

PROJECT = "7.1700000000"


def _setup(client, extra_params):
    return client.post("/setup", json={"project": PROJECT, "schema": DENSE_XML, "extra_params": extra_params})


def _raw_setup(client, text: str):
    return client.post("/setup", data=text, content_type="application/json")


def _state_file(settings):
    return settings.model_dir / "projects" / "7" / "state.json"


def _reason(r) -> str:
    assert r.status_code == 400, r.get_data(as_text=True)[:300]
    body = r.get_json()
    assert body["status"] == "error"
    return body["reason"]


@pytest.fixture(params=["fresh", "stored"])
def before(request, client, settings):
    """State before the bad request: no project yet, or a project set up with valid k-means parameters."""
    if request.param == "stored":
        assert _setup(client, {"strategy": "kmeans", "strategy_params": {"n_init": 3}}).status_code == 200
    path = _state_file(settings)
    return path.read_bytes() if path.exists() else None


def _unchanged(settings, before) -> bool:
    path = _state_file(settings)
    return (path.read_bytes() if path.exists() else None) == before


@pytest.mark.parametrize("n_init", [1_000_000_000, 1e9, 0, 21])
def test_n_init_out_of_range_is_400_naming_the_range(client, settings, before, n_init):
    reason = _reason(_setup(client, {"strategy": "kmeans", "strategy_params": {"n_init": n_init}}))
    assert "n_init must be an integer in 1..20" in reason and "allowed parameters: aggregation, n_init" in reason
    assert _unchanged(settings, before)


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
@pytest.mark.parametrize("as_text", [False, True], ids=["object", "typed-json-text"])
def test_non_finite_candidates_factor_is_400_and_nothing_is_written(client, settings, before, literal, as_text):
    extra = f'{{"strategy": "hybrid", "strategy_params": {{"candidates_factor": {literal}}}}}'
    if as_text:  # Label Studio forwards what the user typed as a JSON string
        body = json.dumps({"project": PROJECT, "schema": DENSE_XML, "extra_params": extra})
    else:
        body = f'{{"project": "{PROJECT}", "schema": {json.dumps(DENSE_XML)}, "extra_params": {extra}}}'
    reason = _reason(_raw_setup(client, body))
    assert f"{literal} is not a JSON number" in reason
    assert _unchanged(settings, before)
    assert "Infinity" not in (_state_file(settings).read_text() if _state_file(settings).exists() else "")


def test_non_finite_number_that_got_past_the_parser_is_refused_too(settings):
    """Defence in depth: a Python caller (the CLI, a test) handing inf to the same code path gets a clear error."""
    from ml_backend.server.projects import ProjectError, strategy_from_params

    with pytest.raises(ProjectError, match=r"strategy_params\['candidates_factor'\] is inf: numbers must be finite"):
        strategy_from_params(
            {"strategy": "hybrid", "strategy_params": {"candidates_factor": float("inf")}}, "entropy", "sum"
        )


@pytest.mark.parametrize(
    ("extra", "unknown"),
    [
        ({"strategy": "kmeans", "n_init": 5}, "key 'n_init'"),  # a strategy parameter outside strategy_params
        ({"strategy": "entropy", "aggregaton": "mean"}, "key 'aggregaton'"),  # a typo
        ('{"stratgy": "margin", "extra": 1}', "keys 'stratgy', 'extra'"),  # typed JSON text
    ],
)
def test_unknown_top_level_key_is_400_naming_the_allowed_keys(client, settings, before, extra, unknown):
    reason = _reason(_setup(client, extra))
    assert f"extra_params has unknown {unknown}" in reason
    assert "allowed: strategy, aggregation, strategy_params" in reason
    assert _unchanged(settings, before)


def test_unknown_strategy_parameter_is_400_naming_the_allowed_ones(client, settings, before):
    reason = _reason(_setup(client, {"strategy": "suggestive", "strategy_params": {"candidate_factor": 3}}))
    assert "unknown parameter 'candidate_factor'" in reason
    assert "allowed parameters: aggregation, candidates_factor" in reason
    assert _unchanged(settings, before)


def test_valid_bounded_params_are_stored_and_the_good_request_after_a_bad_one_works(client, settings):
    assert _setup(client, {"strategy": "kmeans", "strategy_params": {"n_init": 10**9}}).status_code == 400
    r = _setup(client, {"strategy": "hybrid", "aggregation": "mean", "strategy_params": {"candidates_factor": 50}})
    assert r.status_code == 200
    state = json.loads(_state_file(settings).read_text())
    assert state["strategy"] == "hybrid"
    assert state["strategy_params"] == {
        "aggregation": "mean",
        "candidates_factor": 50.0,
        "diversity": "coreset",
        "uncertainty": "entropy",
    }


def test_state_json_is_never_written_with_non_finite_numbers(settings):
    from ml_backend.labelstudio.labelconfig import parse_label_config
    from ml_backend.store.projects import ProjectStore

    store = ProjectStore(settings.model_dir)
    config = parse_label_config(DENSE_XML)
    store.save("7", DENSE_XML, config, strategy="entropy", strategy_params={"aggregation": "sum"})
    before = _state_file(settings).read_bytes()
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        store.save("7", DENSE_XML, config, strategy="hybrid", strategy_params={"candidates_factor": float("nan")})
    assert _state_file(settings).read_bytes() == before


@pytest.mark.parametrize(
    "stored_text",
    [
        '{"strategy": "hybrid", "strategy_params": {"candidates_factor": Infinity}}',
        '{"strategy": "kmeans", "strategy_params": {"n_init": 1000000000}}',
        '{"strategy": "entropy", "strategy_params": {"bogus": 1}}',
    ],
)
def test_a_state_json_from_an_older_version_falls_back_to_the_default_in_the_job(client, settings, stored_text, caplog):
    """What an older version wrote must not crash the training job: the default strategy, with a warning."""
    from ml_backend.jobs.train import project_strategy

    assert _setup(client, {"strategy": "margin"}).status_code == 200
    state = json.loads(_state_file(settings).read_text())
    state.update(json.loads(stored_text))  # json.loads, like ProjectStore.state, reads Infinity
    _state_file(settings).write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="ml_backend.strategies"):
        strategy = project_strategy(7, settings)
    assert strategy.name == settings.strategy and strategy.params() == {"aggregation": settings.aggregation}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("project 7" in w and "using the default strategy" in w for w in warnings), warnings
    # a new /setup with valid params replaces them
    assert _setup(client, {"strategy": "kmeans", "strategy_params": {"n_init": 2}}).status_code == 200
    assert project_strategy(7, settings).params() == {"aggregation": settings.aggregation, "n_init": 2}
