"""Every registered strategy declares bounded parameters (issue 16, item 5): a ``Params`` model with ranges, finite
floats and no unknown keys, from which the strategy reads its parameters; the README table is generated from it.

Parametrised over the registry (a newly registered strategy is checked without touching this file), with
hypothesis properties: any valid parameters construct a strategy that selects on a small pool, and any value out of
its declared range is refused with a message naming the allowed parameters.
"""

from __future__ import annotations

import logging
import math
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ConfigDict, Field
from pydantic.fields import FieldInfo
from strategy_helpers import make_batch

from ml_backend.strategies import (
    AGGREGATIONS,
    Strategy,
    StrategyParams,
    available_strategies,
    get_strategy,
    register_strategy,
    strategy_params_model,
)
from ml_backend.strategies.base import _REGISTRY, params_table
from ml_backend.strategies.params import describe_field
from ml_backend.strategies.resolve import StrategyError, resolve_strategy, stored_strategy

README = Path(__file__).resolve().parents[2] / "README.md"
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = available_strategies()
FIELDS = [(name, field) for name in NAMES for field in strategy_params_model(name).model_fields]
NON_FINITE = [math.inf, -math.inf, math.nan]


# ------------------------------------------------------------------------------ reading a field's declaration
def _split(info: FieldInfo) -> tuple[Any, bool]:
    """(the type without None, whether null is allowed)."""
    args = get_args(info.annotation)
    if get_origin(info.annotation) in (Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return info.annotation, False


def _bounds(info: FieldInfo) -> tuple[float | None, float | None, bool, bool]:
    """(low, high, low exclusive, high exclusive)."""
    low = high = None
    low_open = high_open = False
    for item in info.metadata:
        if isinstance(item, at.Ge):
            low = item.ge
        elif isinstance(item, at.Gt):
            low, low_open = item.gt, True
        elif isinstance(item, at.Le):
            high = item.le
        elif isinstance(item, at.Lt):
            high, high_open = item.lt, True
    return low, high, low_open, high_open


def _valid(info: FieldInfo) -> st.SearchStrategy:
    """Values the declaration allows."""
    base, optional = _split(info)
    low, high, low_open, high_open = _bounds(info)
    if get_origin(base) is Literal:
        values: st.SearchStrategy = st.sampled_from(get_args(base))
    elif base is int:
        values = st.integers(int(low) + low_open, int(high) - high_open)
    elif base is float:
        values = st.floats(low, high, exclude_min=low_open, exclude_max=high_open, allow_nan=False)
    else:  # a new kind of field: this file must learn to generate it
        raise AssertionError(f"no generator for {base!r}")
    return st.one_of(st.none(), values) if optional else values


def _out_of_range(info: FieldInfo) -> list[Any]:
    """Values just outside the declared range, and far outside it (the issue's 1e9)."""
    base, _ = _split(info)
    low, high, low_open, high_open = _bounds(info)
    if get_origin(base) is Literal:
        return ["no-such-choice", 1]
    step = 1 if base is int else 1e-6
    bad = []
    if low is not None:
        bad += [low if low_open else low - step, -(10**9)]
    if high is not None:
        bad += [high if high_open else high + step, 10**9]
    return bad


def _params(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """Any valid parameter set of strategy ``name`` (each parameter present or left to its default)."""
    fields = strategy_params_model(name).model_fields
    return st.fixed_dictionaries({}, optional={field: _valid(info) for field, info in fields.items()})


def _message_names_allowed(message: str, name: str) -> bool:
    allowed = re.search(r"allowed parameters: ([\w, ]+)\)", message)
    return allowed is not None and allowed.group(1).split(", ") == list(strategy_params_model(name).model_fields)


NUMERIC_FIELDS = [(n, f) for n, f in FIELDS if _split(strategy_params_model(n).model_fields[f])[0] in (int, float)]


# ------------------------------------------------------------------------------ declarations
@pytest.mark.parametrize("name", NAMES)
def test_every_strategy_declares_a_bounded_params_model(name):
    model = strategy_params_model(name)
    assert issubclass(model, StrategyParams) and model is _REGISTRY[name].Params
    assert model.model_config["extra"] == "forbid" and model.model_config["allow_inf_nan"] is False
    for field, info in model.model_fields.items():
        base, _ = _split(info)
        assert info.description, f"{name}.{field} has no description (the README table needs one)"
        if base in (int, float):  # a number without both bounds could again be 1e9 or Infinity
            low, high, _, _ = _bounds(info)
            assert low is not None and high is not None, f"{name}.{field} is unbounded"


@pytest.mark.parametrize("name", NAMES)
def test_defaults_validate_and_are_what_the_strategy_uses(name):
    model = strategy_params_model(name)
    defaults = model().model_dump()
    assert model.model_validate(defaults).model_dump() == defaults
    strategy = get_strategy(name)
    assert strategy.params() == defaults
    assert get_strategy(name, **strategy.params()).params() == defaults  # what state.json stores constructs it again


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter_is_refused_naming_the_allowed_ones(name):
    with pytest.raises(ValueError, match="unknown parameter 'n_inits'") as info:
        get_strategy(name, n_inits=3)
    assert _message_names_allowed(str(info.value), name), str(info.value)


@pytest.mark.parametrize(("name", "field"), FIELDS)
def test_out_of_range_and_wrong_type_values_are_refused(name, field):
    info = strategy_params_model(name).model_fields[field]
    base, optional = _split(info)
    bad = _out_of_range(info) + [[1], {"x": 1}] + ([] if optional else [None])
    if base is not bool:
        bad.append(True)  # strict: a boolean is no number and no choice
    if base is int:
        bad += [2.0, "5"]  # strict: no float or text coercion into an integer
    for value in bad:
        with pytest.raises(ValueError, match=f"{field} must be ") as exc:
            get_strategy(name, **{field: value})
        assert describe_field(info) in str(exc.value) and _message_names_allowed(str(exc.value), name)


@pytest.mark.parametrize(("name", "field"), FIELDS)
@pytest.mark.parametrize("value", NON_FINITE, ids=["inf", "-inf", "nan"])
def test_non_finite_numbers_are_refused(name, field, value):
    with pytest.raises(ValueError, match=f"{field} must be .*not finite") as exc:
        get_strategy(name, **{field: value})
    assert _message_names_allowed(str(exc.value), name)


def test_the_issue_findings_are_refused():
    with pytest.raises(ValueError, match=r"n_init must be an integer in 1\.\.20, got 1000000000"):
        get_strategy("kmeans", n_init=1_000_000_000)
    for name in ("suggestive", "hybrid"):
        with pytest.raises(ValueError, match=r"candidates_factor must be a finite number in 1\.\.50, got inf"):
            get_strategy(name, candidates_factor=math.inf)


def test_declared_choices_match_what_the_code_dispatches_on():
    from ml_backend.strategies.hybrid import _UNCERTAINTY, HybridStrategy

    assert AGGREGATIONS == ("sum", "mean")
    assert set(get_args(HybridStrategy.Params.model_fields["uncertainty"].annotation)) == set(_UNCERTAINTY)


class _Loose(StrategyParams):
    model_config = ConfigDict(extra="ignore")


class _Undescribed(StrategyParams):
    width: int = Field(3, ge=1, le=5)


class _BadDefault(StrategyParams):
    width: int = Field(0, ge=1, le=5, description="a default outside its own range")


@pytest.mark.parametrize(
    ("params", "reason"),
    [(dict, "StrategyParams subclass"), (_Loose, "forbid unknown keys"), (_Undescribed, "need a description")],
)
def test_registration_refuses_an_undeclared_or_loose_params_model(params, reason):
    cls = type("Unchecked", (Strategy,), {"Params": params})
    with pytest.raises((TypeError, ValueError), match=reason):
        register_strategy("unchecked-params")(cls)
    assert "unchecked-params" not in available_strategies()


def test_registration_refuses_defaults_outside_the_declared_range():
    cls = type("BadDefault", (Strategy,), {"Params": _BadDefault})
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        register_strategy("bad-default")(cls)
    assert "bad-default" not in available_strategies()


# ------------------------------------------------------------------------------ properties
@SETTINGS
@given(data=st.data(), name=st.sampled_from(NAMES), k=st.integers(1, 12), seed=st.integers(0, 99))
def test_any_valid_params_construct_a_strategy_that_selects(data, name, k, seed):
    params = data.draw(_params(name), label="params")
    strategy = get_strategy(name, **params)
    assert {key: strategy.params()[key] for key in params} == params  # 2 == 2.0 for a float given as int
    batch = make_batch(n=10, seed=seed)
    selection = strategy.select(strategy.summarize(batch), k, seed=seed)
    assert selection.order.shape == (min(k, 10),) and len(np.unique(selection.order)) == min(k, 10)
    assert np.isfinite(selection.values).all()
    assert get_strategy(name, **strategy.params()).params() == strategy.params()


@SETTINGS
@given(data=st.data(), field=st.sampled_from(NUMERIC_FIELDS))
def test_any_number_beyond_the_declared_bounds_is_refused(data, field):
    name, key = field
    info = strategy_params_model(name).model_fields[key]
    low, high, low_open, high_open = _bounds(info)
    if _split(info)[0] is int:
        above = st.integers(int(high) + (not high_open), 2**62)
        below = st.integers(-(2**62), int(low) - (not low_open))
    else:  # an open bound is itself out of range
        finite = {"allow_nan": False, "allow_infinity": False}
        above = st.floats(min_value=high, exclude_min=not high_open, **finite)
        below = st.floats(max_value=low, exclude_max=not low_open, **finite)
    value = data.draw(st.one_of(above, below), label="value")
    with pytest.raises(ValueError, match=f"{key} must be ") as exc:
        get_strategy(name, **{key: value})
    assert _message_names_allowed(str(exc.value), name)


# ------------------------------------------------------------------------------ resolver and stored state
class _Deployment:
    strategy = "entropy"
    aggregation = "mean"


def test_resolver_adds_the_default_aggregation_and_refuses_bad_requests():
    assert resolve_strategy("kmeans", {"n_init": 3}, default_aggregation="mean").params() == {
        "aggregation": "mean",
        "n_init": 3,
    }
    with pytest.raises(StrategyError, match="'kmeans'.*n_init must be an integer in 1..20"):
        resolve_strategy("kmeans", {"n_init": 10**9}, default_aggregation="mean")


@pytest.mark.parametrize(
    "state",
    [
        {"strategy": "kmeans", "strategy_params": {"n_init": 1_000_000_000}},
        {"strategy": "hybrid", "strategy_params": {"candidates_factor": math.inf}},  # json.loads reads Infinity
        {"strategy": "entropy", "strategy_params": {"bogus": 1}},
        {"strategy": "no-longer-registered", "strategy_params": {}},
        {"strategy": "kmeans", "strategy_params": ["not", "an", "object"]},
    ],
)
def test_bad_stored_params_fall_back_to_the_default_with_a_warning(state, caplog):
    with caplog.at_level(logging.WARNING, logger="ml_backend.strategies"):
        strategy = stored_strategy(state, _Deployment, project=f"p-{id(state)}")
    assert strategy.name == "entropy" and strategy.params() == {"aggregation": "mean"}
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"p-{id(state)}" in warning and state["strategy"] in warning and "default strategy 'entropy'" in warning


def test_good_stored_params_are_used_and_a_bad_deployment_default_still_raises():
    stored = {"strategy": "kmeans", "strategy_params": {"aggregation": "sum", "n_init": 4}}
    assert stored_strategy(stored, _Deployment).params() == {"aggregation": "sum", "n_init": 4}

    class Broken(_Deployment):
        strategy = "nope"

    with pytest.raises(StrategyError, match="unknown strategy 'nope'"):
        stored_strategy({}, Broken)


# ------------------------------------------------------------------------------ documentation
def test_readme_lists_every_parameter_with_its_range():
    table = params_table()
    assert table in README.read_text(), (
        "README's strategy parameter table is out of date; paste the output of "
        "`python -c 'from ml_backend.strategies.base import params_table; print(params_table())'`"
    )
    for name, field in FIELDS:
        info = strategy_params_model(name).model_fields[field]
        assert f"`{field}` | {describe_field(info)} |" in table
