"""Project parameters from HTTP requests: project ids and /setup's ``extra_params`` (the per-project files are
``ml_backend.store.projects``)."""

from __future__ import annotations

from typing import Any

from ml_backend.ids import parse_project_ref
from ml_backend.store.projects import ProjectError, ProjectStore
from ml_backend.strategies.resolve import StrategyError, resolve_strategy

from .schemas import BadRequest, ExtraParams, SetupRequest, describe_validation_error

__all__ = ["ProjectError", "ProjectStore", "parse_project_id", "strategy_from_params"]


def parse_project_id(value: Any) -> str:
    """Project id from Label Studio's ``"<id>.<timestamp>"`` (or a bare id), in 1..MAX_ID (``ml_backend.ids``, the
    one id parser); ProjectError otherwise.

    Bounded here because the id names a folder (``MODEL_DIR/projects/<id>``) and Redis keys: an id that cannot exist
    in Label Studio must never create either.
    """
    try:
        return str(parse_project_ref(value))
    except ValueError as exc:
        raise ProjectError(str(exc)) from None


def strategy_from_params(extra_params: Any, default_name: str, default_aggregation: str) -> tuple[str, dict[str, Any]]:
    """(strategy name, params) from /setup's ``extra_params`` ({"strategy": ..., "aggregation": ..., ...}).

    Label Studio sends ``extra_params`` as an object or as a JSON string (what the user typed); ``None`` falls back
    to the defaults. The shape is checked by ``schemas.ExtraParams`` (wrong types are a ProjectError, never a
    TypeError), the name and params by instantiating the strategy.
    """
    from pydantic import ValidationError

    try:
        if not isinstance(extra_params, ExtraParams):
            checked = SetupRequest.model_validate({"project": 1, "extra_params": extra_params}).extra_params
            extra_params = checked
    except ValidationError as exc:
        raise ProjectError(describe_validation_error(exc)) from None
    except BadRequest as exc:
        raise ProjectError(str(exc)) from None
    params: dict[str, Any] = {}
    name = default_name
    if extra_params is not None:
        params = dict(extra_params.strategy_params)
        name = extra_params.strategy or default_name
        if extra_params.aggregation is not None:
            params["aggregation"] = extra_params.aggregation
    try:
        strategy = resolve_strategy(name, params, default_name=default_name, default_aggregation=default_aggregation)
    except StrategyError as exc:
        raise ProjectError(f"extra_params: {exc}") from None
    return strategy.name, strategy.params()
