"""One resolver: (strategy name, params) -> Strategy, with one error policy for every caller.

Callers: /setup (``extra_params`` typed by a user), /predict and the RQ jobs (the strategy stored by /setup, else
the deployment's STRATEGY / SCORE_AGGREGATION). The policy:

* no name -> the default name; the default aggregation is added only when the caller gave none, and only to a
  strategy whose declared parameters (``Strategy.Params``) take one (a default must never make a valid choice
  invalid);
* anything the caller did ask for that is invalid (unknown name, a parameter the strategy does not declare, a value
  out of its declared range, a non-finite number) is a ``StrategyError`` naming the strategy, the problem and the
  allowed parameters: never silently replaced by something else;
* what a project has STORED is not a request: a ``state.json`` written by an older version (before the parameters
  were bounded) or edited by hand may no longer validate. ``stored_strategy`` then uses the deployment's default
  and logs a warning saying why, so a project never stops training or predicting because of its file; /setup
  refuses such parameters, so a new /setup replaces them.
"""

from __future__ import annotations

import logging
from typing import Any

from .base import Strategy, get_strategy, strategy_params_model

__all__ = ["StrategyError", "resolve_strategy", "stored_strategy"]

log = logging.getLogger("ml_backend.strategies")

_WARNED_MAX = 1024  # distinct bad stored states warned about per process (/predict would repeat it per request)
_warned: set[str] = set()


class StrategyError(ValueError):
    """The requested strategy or its parameters are invalid (the message names both)."""


def resolve_strategy(
    name: str | None,
    params: dict[str, Any] | None = None,
    *,
    default_name: str = "entropy",
    default_aggregation: str | None = None,
) -> Strategy:
    """The strategy ``name`` (default ``default_name``) with ``params`` (see the module docstring for the policy)."""
    chosen = name or default_name
    try:
        given = dict(params or {})
        takes_aggregation = "aggregation" in strategy_params_model(chosen).model_fields
        if default_aggregation is not None and "aggregation" not in given and takes_aggregation:
            return get_strategy(chosen, **given, aggregation=default_aggregation)
        return get_strategy(chosen, **given)
    except (ValueError, TypeError) as exc:
        raise StrategyError(f"strategy {chosen!r} {params}: {exc}") from None


def stored_strategy(state: dict[str, Any], settings: Any, *, project: str | int | None = None) -> Strategy:
    """A project's strategy from its stored state (``strategy``, ``strategy_params`` written by /setup), else the
    deployment's STRATEGY / SCORE_AGGREGATION: what /predict and the training job both use. Stored parameters that
    no longer validate fall back to that default with a warning (module docstring)."""

    def default() -> Strategy:
        return resolve_strategy(None, None, default_name=settings.strategy, default_aggregation=settings.aggregation)

    name, params = state.get("strategy"), state.get("strategy_params")
    if not name and not params:
        return default()  # a bad default is the deployment's error: it raises, with nothing to fall back to
    try:
        return resolve_strategy(name, params, default_name=settings.strategy, default_aggregation=settings.aggregation)
    except StrategyError as exc:
        key = f"{project}|{name!r}|{params!r}"[:2048]
        if key not in _warned:
            if len(_warned) >= _WARNED_MAX:
                _warned.clear()
            _warned.add(key)
            log.warning(
                "project %s: the stored %s; using the default strategy %r (STRATEGY) instead. The stored parameters "
                "were written by an older version or by hand: send valid extra_params through /setup to replace them",
                project if project is not None else "?", exc, settings.strategy,
            )  # fmt: skip
        return default()
