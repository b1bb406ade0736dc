"""One resolver: (strategy name, params) -> Strategy, with one error policy for every caller.

Callers: /setup (``extra_params`` typed by a user), /predict and the RQ jobs (the strategy stored by /setup, else
the deployment's STRATEGY / SCORE_AGGREGATION). The policy:

* no name -> the default name; the default aggregation is added only when the caller gave none, and dropped again
  for a strategy that takes no aggregation (a default must never make a valid choice invalid);
* anything the caller did ask for that is invalid (unknown name, a parameter the strategy does not take, a bad
  value) is a ``StrategyError`` naming the strategy and the parameters: never silently replaced by something else.
"""

from __future__ import annotations

from typing import Any

from .base import Strategy, get_strategy

__all__ = ["StrategyError", "resolve_strategy", "stored_strategy"]


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
    given = dict(params or {})
    try:
        if "aggregation" in given or default_aggregation is None:
            return get_strategy(chosen, **given)
        try:
            return get_strategy(chosen, **given, aggregation=default_aggregation)
        except ValueError:
            return get_strategy(chosen, **given)  # the strategy takes no aggregation: the default does not apply
    except (ValueError, TypeError) as exc:
        raise StrategyError(f"strategy {chosen!r} {given}: {exc}") from None


def stored_strategy(state: dict[str, Any], settings: Any) -> Strategy:
    """A project's strategy from its stored state (``strategy``, ``strategy_params`` written by /setup), else the
    deployment's STRATEGY / SCORE_AGGREGATION: what /predict and the training job both use."""
    return resolve_strategy(
        state.get("strategy"),
        state.get("strategy_params"),
        default_name=settings.strategy,
        default_aggregation=settings.aggregation,
    )
