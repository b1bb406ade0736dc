"""The one strategy resolver: defaults fill gaps, never replace what was asked for; invalid requests name themselves."""

import pytest

from ml_backend.strategies.resolve import StrategyError, resolve_strategy


def test_defaults_fill_what_was_not_given():
    s = resolve_strategy(None, None, default_name="margin", default_aggregation="mean")
    assert s.name == "margin" and s.params() == {"aggregation": "mean"}
    s = resolve_strategy("entropy", {"aggregation": "sum"}, default_aggregation="mean")
    assert s.params() == {"aggregation": "sum"}  # an explicit choice wins over the default


def test_invalid_requests_are_errors_naming_strategy_and_params():
    with pytest.raises(StrategyError, match="'nope'.*unknown strategy"):
        resolve_strategy("nope", {})
    with pytest.raises(StrategyError, match=r"'entropy' \{'bogus': 1\}"):
        resolve_strategy("entropy", {"bogus": 1}, default_aggregation="sum")
    with pytest.raises(StrategyError, match="aggregation"):
        resolve_strategy("entropy", {"aggregation": "median"})
    assert issubclass(StrategyError, ValueError)  # callers that catch ValueError keep working
