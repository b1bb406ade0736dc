"""Declared, bounded strategy parameters: one pydantic model per registered strategy (``Strategy.Params``).

Why: parameters come from users (Label Studio's extra params, stored in ``state.json`` by /setup) and reach costly
code (k-means restarts, candidate pools). An unbounded ``n_init`` of 1e9 kept a 60-tile selection running; a
``candidates_factor`` of Infinity overflowed. So every strategy declares its parameters as a model with types,
ranges (generous for real use, bounded in cost), finite floats only and no unknown keys; the strategy's constructor
reads its parameters from the validated model, so the declaration cannot drift from what the code uses.

Error messages are built here from the declaration (not pydantic's wording), so that /setup, the resolver and the
README table all say the same thing: ``n_init must be an integer in 1..20, got 1000000000; allowed parameters:
aggregation, n_init``.
"""

from __future__ import annotations

import math
import types
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

__all__ = ["StrategyParams", "StrategyParamsError", "describe_field", "validate_params"]


class StrategyParamsError(ValueError):
    """A strategy's parameters do not validate (the message names the problem and the allowed parameters)."""


Aggregation = Literal["sum", "mean"]


class StrategyParams(BaseModel):
    """Parameters every strategy takes; subclasses add their own (each with bounds and a description)."""

    # strict: no "5" -> 5 or True -> 1 coercion (an int is still accepted for a float); finite floats only
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    aggregation: Aggregation = Field(
        "sum", description="pixel-to-tile aggregation: sum (the papers) or mean (size-independent)"
    )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def _bounds(info: FieldInfo) -> str:
    """'in 1..20', '> 0 and <= 1000000', '' from the field's annotated_types metadata."""
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
    if low is not None and high is not None and not (low_open or high_open):
        return f" in {_number(low)}..{_number(high)}"
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {_number(low)}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {_number(high)}")
    return (" " + " and ".join(parts)) if parts else ""


def describe_field(info: FieldInfo) -> str:
    """What a field accepts, in words: 'an integer in 1..20', 'one of 'sum', 'mean'', '... or null'."""
    annotation = info.annotation
    args = get_args(annotation)
    optional = get_origin(annotation) in (Union, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else annotation
    if get_origin(base) is Literal:
        text = "one of " + ", ".join(repr(choice) for choice in get_args(base))
    elif base is bool:
        text = "true or false"
    elif base is int:
        text = "an integer" + _bounds(info)
    elif base is float:
        text = "a finite number" + _bounds(info)
    else:  # pragma: no cover - a new field type must get a description here first
        raise TypeError(f"describe_field does not know the type {base!r}")
    return f"{text}, or null" if optional else text


def allowed_names(model: type[StrategyParams]) -> str:
    return ", ".join(model.model_fields)


def validate_params(model: type[StrategyParams], params: dict[str, Any], strategy: str) -> StrategyParams:
    """``params`` validated against ``model``; StrategyParamsError naming each problem and the allowed names."""
    if not isinstance(params, dict):
        raise StrategyParamsError(f"parameters of strategy {strategy!r} must be an object, got {_show(params)}")
    fields = model.model_fields
    problems = []
    unknown = [str(key) for key in params if key not in fields]
    if unknown:
        problems.append(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(_show, unknown))}")
    for name, value in params.items():
        if name in fields and isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{name} must be {describe_field(fields[name])}, got {value!r} (not finite)")
    if not problems:
        try:
            return model.model_validate(params)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                name = str(err["loc"][0]) if err["loc"] else ""
                if name in fields:
                    problems.append(f"{name} must be {describe_field(fields[name])}, got {_show(params.get(name))}")
                else:  # a model-level rule (none today); pydantic's wording then
                    problems.append(str(err["msg"]))
    problems = list(dict.fromkeys(problems))  # a Literal | None field reports once per union member
    raise StrategyParamsError(
        f"bad parameters for strategy {strategy!r}: {'; '.join(problems)} (allowed parameters: {allowed_names(model)})"
    )
