"""Core types of the acquisition-strategy registry: pool batches, selections, the Strategy protocol, validation.

Scoring is split in two phases so that a pool of 10,000 tiles never needs all its pixel maps in memory at once:

1. ``Strategy.summarize(batch)`` reduces one chunk of model outputs (``PoolBatch``: pixel maps of n tiles) to small
   per-tile statistics (``{"value": (n,), "embedding": (n, D), ...}``); ``score_pool`` concatenates them over chunks.
2. ``Strategy.select(summary, k)`` turns the whole pool's summary into a ``Selection``: a per-tile acquisition value
   (HIGHER = more informative) and the k most informative tiles in order.

Pixel-uncertainty strategies (entropy, ...) rank by their value; batch strategies (kmeans, coreset, suggestive,
hybrid) build the selection greedily, and their value is derived from the selection order (see ``batch_values``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, get_args

import numpy as np

from .params import Aggregation, StrategyParams, describe_field, validate_params

AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
OPTIONAL_INPUTS = frozenset({"mc_probs", "embeddings", "ensemble_probs"})

# Probabilities are clipped here before log so that p = 0 contributes 0 * log(tiny) = 0, not NaN.
EPS = 1e-12


@dataclass
class PoolBatch:
    """Model outputs for one chunk of n pool tiles (everything a strategy may need; only ``probs`` is mandatory)."""

    probs: np.ndarray  # (n, C, H, W) softmax of the deterministic (eval-mode) pass
    mc_probs: np.ndarray | None = None  # (T, n, C, H, W) Monte-Carlo dropout passes          ("bald")
    embeddings: np.ndarray | None = None  # (n, D) model.embed: bottleneck channel means      (kmeans, coreset, ...)
    ensemble_probs: np.ndarray | None = None  # (E, n, C, H, W) bootstrap ensemble members     ("suggestive")

    @property
    def n(self) -> int:
        return int(np.shape(self.probs)[0])

    def validate(self, needs: frozenset[str] = frozenset()) -> None:
        """Raise ValueError when shapes disagree or a field the strategy needs is missing (cheap: shapes only)."""
        probs = np.asarray(self.probs)
        if probs.ndim != 4:
            raise ValueError(f"probs must have shape (n, C, H, W), got {probs.shape}")
        n, c, h, w = probs.shape
        if n == 0:
            raise ValueError("empty pool: probs holds 0 tiles")
        if c < 2:
            raise ValueError(f"probs must hold C >= 2 classes (softmax over background + foreground), got C={c}")
        if h == 0 or w == 0:
            raise ValueError(f"probs has an empty spatial size {h}x{w}")
        for name in sorted(needs):
            if getattr(self, name) is None:
                raise ValueError(f"this strategy needs PoolBatch.{name}, which is None")
        if self.mc_probs is not None:
            mc = np.shape(self.mc_probs)
            if len(mc) != 5 or tuple(mc[1:]) != probs.shape or mc[0] < 1:
                raise ValueError(f"mc_probs must have shape (T>=1, {n}, {c}, {h}, {w}), got {mc}")
        if self.ensemble_probs is not None:
            ens = np.shape(self.ensemble_probs)
            if len(ens) != 5 or tuple(ens[1:]) != probs.shape or ens[0] < 2:
                raise ValueError(f"ensemble_probs must have shape (E>=2, {n}, {c}, {h}, {w}), got {ens}")
        if self.embeddings is not None:
            emb = np.shape(self.embeddings)
            if len(emb) != 2 or emb[0] != n or emb[1] < 1:
                raise ValueError(f"embeddings must have shape ({n}, D>=1), got {emb}")


@dataclass
class Selection:
    """Result of ``Strategy.select``."""

    values: np.ndarray  # (N,) float64 acquisition value per pool tile, HIGHER = more informative
    order: np.ndarray  # (k,) int64 indices into the pool, most informative first, no duplicates


class Strategy:
    """Base class of every acquisition strategy.

    Subclasses set ``needs`` (optional PoolBatch fields they read) and implement ``_summarize`` and ``_select``;
    the public methods add the validation every strategy shares, so each strategy fails the same way on bad input.
    ``summary_keys`` lists the keys ``select`` requires in the summary. ``Params`` declares the constructor's
    parameters (types, bounds, defaults: ``params.StrategyParams``); the constructor validates its keyword arguments
    against it and keeps the result as ``config``, which is all a strategy reads its parameters from.
    """

    name: ClassVar[str] = "base"
    needs: ClassVar[frozenset[str]] = frozenset()
    summary_keys: ClassVar[tuple[str, ...]] = ("value",)
    Params: ClassVar[type[StrategyParams]] = StrategyParams

    def __init__(self, **params: Any) -> None:
        self.config = validate_params(self.Params, params, self.name)
        self.aggregation: str = self.config.aggregation

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in sorted(self.params().items()))
        return f"{type(self).__name__}({params})"

    def params(self) -> dict[str, Any]:
        """Constructor parameters, validated (for logs, model metadata and state.json: they construct it again)."""
        return self.config.model_dump()

    # ------------------------------------------------------------------ public API
    def summarize(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        """Per-tile statistics of one chunk; every array has n rows."""
        batch.validate(self.needs)
        summary = self._summarize(batch)
        check_summary(summary, self.summary_keys, expected_n=batch.n)
        return summary

    def select(
        self,
        summary: dict[str, np.ndarray],
        k: int,
        *,
        labelled_embeddings: np.ndarray | None = None,
        seed: int = 0,
    ) -> Selection:
        """The k most informative tiles of the pool described by ``summary`` (whole pool when k > N)."""
        n = check_summary(summary, self.summary_keys)
        k = check_k(k, n)
        if labelled_embeddings is not None and "embedding" in summary:
            labelled_embeddings = check_labelled(labelled_embeddings, summary["embedding"].shape[1])
        selection = self._select(summary, k, labelled_embeddings=labelled_embeddings, seed=int(seed))
        _check_selection(selection, n, k, self.name)
        return selection

    def max_pixel_value(self, num_classes: int) -> float | None:
        """Largest possible per-pixel value (for the absolute queue-score mapping); None for batch strategies."""
        return None

    def max_value(self, num_classes: int, num_pixels: int) -> float | None:
        """Largest possible tile value under this strategy's aggregation; None when there is no absolute scale."""
        per_pixel = self.max_pixel_value(num_classes)
        if per_pixel is None:
            return None
        return float(per_pixel * num_pixels) if self.aggregation == "sum" else float(per_pixel)

    # ------------------------------------------------------------------ to implement
    def _summarize(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _select(
        self, summary: dict[str, np.ndarray], k: int, *, labelled_embeddings: np.ndarray | None, seed: int
    ) -> Selection:
        raise NotImplementedError


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Strategy]] = {}
S = TypeVar("S", bound=type[Strategy])


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator: make a Strategy subclass selectable by ``name`` (as baal's heuristics registry)."""

    def decorator(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(f"@register_strategy({name!r}) must decorate a Strategy subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"strategy name {name!r} is already registered by {_REGISTRY[name].__name__}")
        unknown = cls.needs - OPTIONAL_INPUTS
        if unknown:
            raise ValueError(f"strategy {name!r} needs unknown PoolBatch fields {sorted(unknown)}")
        _check_params_model(name, cls.Params)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _check_params_model(name: str, model: Any) -> None:
    """A registered strategy declares bounded parameters: a StrategyParams model refusing unknown keys and
    non-finite numbers, every field described (the README table is generated from it), defaults that validate."""
    if not (isinstance(model, type) and issubclass(model, StrategyParams)):
        raise TypeError(f"strategy {name!r}: Params must be a StrategyParams subclass, got {model!r}")
    config = model.model_config
    if config.get("extra") != "forbid" or config.get("allow_inf_nan") is not False:
        raise ValueError(f"strategy {name!r}: Params must forbid unknown keys and non-finite numbers")
    undescribed = [field for field, info in model.model_fields.items() if not info.description]
    if undescribed:
        raise ValueError(f"strategy {name!r}: Params fields {undescribed} need a description")
    model.model_validate(model().model_dump())  # pydantic does not check defaults by itself


def strategy_params_model(name: str) -> type[StrategyParams]:
    """The parameter model of registered strategy ``name`` (what /setup validates ``strategy_params`` against)."""
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(available_strategies())}")
    return _REGISTRY[key].Params


def available_strategies() -> list[str]:
    """Registered names, in registration order."""
    return list(_REGISTRY)


def get_strategy(name: str, **params: Any) -> Strategy:
    """Instantiate a registered strategy, e.g. ``get_strategy("entropy", aggregation="mean")``."""
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(available_strategies())}")
    try:
        return _REGISTRY[key](**params)
    except TypeError as exc:  # unexpected keyword: say which strategy and what it accepts
        raise ValueError(f"bad parameters for strategy {key!r}: {exc}") from exc


def _row(strategy: str, field: str, info: Any) -> str:
    default = "null" if info.default is None else f"`{info.default!r}`".replace("'", '"')
    return f"| {strategy} | `{field}` | {describe_field(info)} | {default} | {info.description or ''} |"


def params_table() -> str:
    """The README's table of every registered strategy's parameters (kept true by tests/strategies): the shared
    ones once, then each strategy's own."""
    rows = ["| strategy | parameter | allowed | default | meaning |", "| --- | --- | --- | --- | --- |"]
    rows += [_row("every strategy", field, info) for field, info in StrategyParams.model_fields.items()]
    for name in available_strategies():
        fields = strategy_params_model(name).model_fields
        rows += [_row(f"`{name}`", f, info) for f, info in fields.items() if f not in StrategyParams.model_fields]
    return "\n".join(rows)


# ---------------------------------------------------------------------- validation helpers
def check_k(k: int, n: int) -> int:
    """Validated number of tiles to select, clipped to the pool size (k > N returns the whole pool)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if n <= 0:
        raise ValueError("empty pool: nothing to select from")
    return int(min(int(k), n))


def check_summary(summary: dict[str, np.ndarray], keys: tuple[str, ...], expected_n: int | None = None) -> int:
    """Pool size of a summary; ValueError when keys are missing, row counts differ, the pool is empty or not finite."""
    if not isinstance(summary, dict):
        raise ValueError(f"summary must be a dict of arrays, got {type(summary).__name__}")
    missing = [key for key in keys if key not in summary]
    if missing:
        raise ValueError(f"summary lacks {missing}; has {sorted(summary)}")
    sizes = {key: np.shape(arr)[0] if np.ndim(arr) else None for key, arr in summary.items()}
    if any(size is None for size in sizes.values()):
        raise ValueError(f"summary arrays must have one row per tile; got scalars in {sizes}")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"summary arrays have mismatched tile counts: {sizes}")
    n = next(iter(sizes.values())) if sizes else 0
    if n == 0:
        raise ValueError("empty pool: the summary holds 0 tiles")
    if expected_n is not None and n != expected_n:
        raise ValueError(f"summary holds {n} tiles, the batch {expected_n}")
    for key, ndim, shape, hint in (
        ("value", 1, "(n,)", " (are the probabilities valid?)"),
        ("embedding", 2, "(n, D)", ""),
    ):
        if key in summary:
            arr = summary[key]
            if np.ndim(arr) != ndim:
                raise ValueError(f"summary[{key!r}] must have shape {shape}, got {np.shape(arr)}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"summary[{key!r}] holds NaN or infinite values{hint}")
    return int(n)


def check_labelled(labelled: np.ndarray, dim: int) -> np.ndarray | None:
    """Labelled-set embeddings as float64 (m, D), None when empty; ValueError when D differs from the pool's."""
    arr = np.asarray(labelled, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"labelled_embeddings must have shape (m, D), got {arr.shape}")
    if arr.shape[0] == 0:
        return None
    if arr.shape[1] != dim:
        raise ValueError(f"labelled_embeddings have D={arr.shape[1]}, the pool embeddings D={dim}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("labelled_embeddings hold NaN or infinite values")
    return arr


def _check_selection(selection: Selection, n: int, k: int, name: str) -> None:
    """Internal invariant of every strategy (a bug, not bad input, when it fails)."""
    order = selection.order
    if selection.values.shape != (n,) or order.shape != (k,) or len(np.unique(order)) != k:
        raise AssertionError(
            f"strategy {name!r} broke the Selection contract: values {selection.values.shape}, "
            f"order {order.shape} (unique {len(np.unique(order))}), expected n={n}, k={k}"
        )


# ---------------------------------------------------------------------- shared numerics
def aggregate(pixel_map: np.ndarray, aggregation: str) -> np.ndarray:
    """(n, H, W) pixel values -> (n,) float64 tile values: sum (the papers) or mean (size-independent)."""
    flat = pixel_map.reshape(pixel_map.shape[0], -1)
    total = flat.sum(axis=1, dtype=np.float64)
    return total if aggregation == "sum" else total / flat.shape[1]


def as_float(probs: np.ndarray) -> np.ndarray:
    """Probabilities as float32 (half the memory of float64; plenty for sums over 65k pixels in float64)."""
    return np.asarray(probs, dtype=np.float32)


def class_max(probs: np.ndarray) -> np.ndarray:
    """(..., C, H, W) -> (..., H, W) maximum over classes.

    A loop over the (few) classes on contiguous (H, W) slabs: several times faster than ``max(axis=-3)``, whose
    strided reduction dominated the summarize step.
    """
    best = probs[..., 0, :, :].copy()
    for c in range(1, probs.shape[-3]):
        np.maximum(best, probs[..., c, :, :], out=best)
    return best


def hard_labels(probs: np.ndarray) -> np.ndarray:
    """(..., C, H, W) -> (..., H, W) int64 argmax over classes (first maximum on ties, as ``argmax``), vectorised
    per class (``argmax(axis=-3)`` is ~100x slower on 256x256 maps)."""
    if probs.shape[-3] == 2:
        return (probs[..., 1, :, :] > probs[..., 0, :, :]).astype(np.int64)
    best = probs[..., 0, :, :].copy()
    labels = np.zeros(best.shape, dtype=np.int64)
    for c in range(1, probs.shape[-3]):
        better = probs[..., c, :, :] > best
        labels[better] = c
        np.maximum(best, probs[..., c, :, :], out=best)
    return labels


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first; ties broken by the lower index (deterministic)."""
    values = np.asarray(values, dtype=np.float64)
    if k >= values.shape[0]:
        return np.argsort(-values, kind="stable").astype(np.int64)
    part = np.argpartition(-values, k - 1)[:k]
    # the partition may cut through a tie; pick the lowest indices among equal values at the cut
    threshold = values[part].min()
    above = np.flatnonzero(values > threshold)
    equal = np.flatnonzero(values == threshold)[: k - above.shape[0]]
    chosen = np.concatenate([above, equal])
    return chosen[np.argsort(-values[chosen], kind="stable")].astype(np.int64)


def ranked_selection(values: np.ndarray, k: int) -> Selection:
    """Selection of a strategy that ranks tiles by a per-tile value."""
    values = np.asarray(values, dtype=np.float64)
    return Selection(values=values, order=top_k(values, k))


def batch_values(n: int, order: np.ndarray, secondary: np.ndarray | None = None) -> np.ndarray:
    """Per-tile values of a batch strategy, derived from its selection order.

    The tile picked r-th (r = 0..k-1) gets ``2 - r/k`` (in (1, 2]); unselected tiles get the strategy's secondary
    score (e.g. distance to the nearest centre, uncertainty) rescaled to [0, 0.5], or 0 without one. So ordering the
    values descending reproduces the selection, and the unselected rest keeps a meaningful order for the queue.
    """
    values = np.zeros(n, dtype=np.float64)
    if secondary is not None:
        sec = np.asarray(secondary, dtype=np.float64)
        lo, hi = float(sec.min()), float(sec.max())
        values = 0.5 * (sec - lo) / (hi - lo) if hi > lo else np.zeros(n, dtype=np.float64)
    k = order.shape[0]
    values[order] = 2.0 - np.arange(k, dtype=np.float64) / k
    return values
