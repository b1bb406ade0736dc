"""One resolver and one project-strategy lookup, with one error policy for every caller.

``resolve_strategy``: (strategy name, params) -> Strategy. ``project_strategy``: THE lookup of the strategy a
project uses, for every reader: the training job (and the re-scoring it coordinates), the /predict backlog jobs,
``/predict`` and the status page. ``predict_strategy``: what ``/predict`` scores with, given that strategy.

The policy:

* no name -> the default name; the default aggregation is added only when the caller gave none, and only to a
  strategy whose declared parameters (``Strategy.Params``) take one (a default must never make a valid choice
  invalid);
* SETTING a strategy (``/setup``'s ``extra_params``, typed by a user): anything invalid (unknown name, a parameter
  the strategy does not declare, a value out of its declared range, a non-finite number) is a ``StrategyError``
  naming the strategy, the problem and the allowed parameters; ``/setup`` answers 400 and stores nothing. Never
  silently replaced by something else;
* READING a project's stored strategy is not a request: a ``state.json`` written by an older version (a strategy
  since removed, parameters before they were bounded), edited by hand, or unreadable may no longer resolve. Every
  reader then uses the deployment's default (STRATEGY / SCORE_AGGREGATION), logs a warning saying why (once per
  process and reason: /predict would repeat it per request) and, when the caller collects them (the status page),
  reports the same warning. A project never stops training or predicting because of its file; a new ``/setup``
  with valid ``extra_params`` replaces it;
* the deployment's default itself is validated at start-up; should it still be invalid, that is the deployment's
  error: a ``StrategyError`` with nothing to fall back to;
* ``/predict`` answers one request, not a pool: a strategy without an absolute per-tile score (batch and diversity
  strategies rank only within a whole pool) or needing more than MC-dropout samples is scored by
  ``PREDICT_FALLBACK`` (entropy) with the same aggregation, and so is an MC strategy (bald) on an image above
  ``mc_max_pixels``; the re-scoring job pushes the strategy's own pool-wide order after each training.
"""

from __future__ import annotations

import logging
from typing import Any

from ml_backend.store.projects import ProjectError, ProjectStore

from .base import Strategy, get_strategy, strategy_params_model

__all__ = [
    "PREDICT_FALLBACK",
    "StrategyError",
    "predict_strategy",
    "project_strategy",
    "resolve_strategy",
    "stored_strategy",
]

log = logging.getLogger("ml_backend.strategies")

PREDICT_FALLBACK = "entropy"  # what /predict scores with when the project's strategy has no absolute per-tile score
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


def _warn_once(key: str, message: str, *args: Any) -> None:
    key = key[:2048]
    if key in _warned:
        return
    if len(_warned) >= _WARNED_MAX:
        _warned.clear()
    _warned.add(key)
    log.warning(message, *args)


def stored_strategy(
    state: dict[str, Any], settings: Any, *, project: str | int | None = None, warnings: list[str] | None = None
) -> Strategy:
    """A project's strategy from its stored state (``strategy``, ``strategy_params`` written by /setup), else the
    deployment's STRATEGY / SCORE_AGGREGATION. Stored parameters that no longer resolve fall back to that default
    with a warning, appended to ``warnings`` too when given (module docstring). ``project_strategy`` reads the state
    and calls this."""

    def default() -> Strategy:
        return resolve_strategy(None, None, default_name=settings.strategy, default_aggregation=settings.aggregation)

    name, params = state.get("strategy"), state.get("strategy_params")
    if not name and not params:
        return default()  # a bad default is the deployment's error: it raises, with nothing to fall back to
    try:
        return resolve_strategy(name, params, default_name=settings.strategy, default_aggregation=settings.aggregation)
    except StrategyError as exc:
        shown = project if project is not None else "?"
        _warn_once(
            f"{project}|{name!r}|{params!r}",
            "project %s: the stored %s; using the default strategy %r (STRATEGY) instead. The stored parameters "
            "were written by an older version or by hand: send valid extra_params through /setup to replace them",
            shown, exc, settings.strategy,
        )  # fmt: skip
        if warnings is not None:
            warnings.append(
                f"the stored {exc}; using the default strategy {settings.strategy!r} (STRATEGY) instead: send valid "
                "extra_params through /setup to replace it"
            )
        return default()


def project_strategy(
    project_id: str | int, settings: Any, *, store: ProjectStore | None = None, warnings: list[str] | None = None
) -> Strategy:
    """THE strategy project ``project_id`` uses: the one stored by /setup (``extra_params``), else STRATEGY /
    SCORE_AGGREGATION; a stored choice that no longer resolves, or an unreadable state file, falls back to that
    default with a warning (logged once, appended to ``warnings`` when given). The policy is the module docstring's;
    every reader (jobs, /predict, status page) calls this and nothing else."""
    store = store if store is not None else ProjectStore(settings.model_dir)
    try:
        state = store.state(str(project_id))
    except ProjectError as exc:  # an unreadable state file must stop neither training nor predicting
        _warn_once(
            f"{project_id}|unreadable|{exc}",
            "%s; using the default strategy %r (STRATEGY) until a /setup with extra_params writes the state again",
            exc, settings.strategy,
        )  # fmt: skip
        if warnings is not None:
            warnings.append(
                f"{exc}; using the default strategy {settings.strategy!r} (STRATEGY) until a /setup with extra_params "
                "writes it again"
            )
        state = {}
    return stored_strategy(state, settings, project=project_id, warnings=warnings)


def predict_strategy(
    strategy: Strategy, default_aggregation: str, *, pixels: int | None = None, mc_max_pixels: int | None = None
) -> Strategy:
    """What ``/predict`` scores with for ``strategy`` (the project's, from ``project_strategy``): the strategy itself
    when it has an absolute per-tile score from probabilities or MC samples, else ``PREDICT_FALLBACK`` with the same
    aggregation; and ``PREDICT_FALLBACK`` as well for an MC strategy on an image of more than ``mc_max_pixels``
    pixels (``pixels`` = H x W of the image being scored)."""
    if strategy.max_pixel_value(2) is None or not strategy.needs <= frozenset({"mc_probs"}):
        return get_strategy(PREDICT_FALLBACK, aggregation=getattr(strategy, "aggregation", default_aggregation))
    if "mc_probs" in strategy.needs and pixels is not None and mc_max_pixels is not None and pixels > mc_max_pixels:
        return get_strategy(PREDICT_FALLBACK, aggregation=strategy.aggregation)
    return strategy
