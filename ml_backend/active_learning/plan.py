"""The product's round plan: what ``run_round`` does for a project, from Settings (recipe, seeds, scoring) and the
project's current version (the model to fine-tune; the project's pretrained weights for its first version).

Also the product's selector (issue 11): ``StackAwareQueue`` runs the benchmark's ``selection.StackAware`` over the
strategy's queue so that the next TRAIN_BATCH_SIZE tasks hold no near-duplicates (the same stack at overlapping xy
within DIVERSITY_Z_RADIUS slices, or closer than DIVERSITY_FEATURE_RADIUS in the bottleneck features) and adds what is
the product's own: tile positions from the task data the importer writes, and the audit tasks at their rate
(``active_learning.audit``).
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.active_learning.audit import audit_every, audit_task_ids
from ml_backend.active_learning.candidates import CandidateSampler
from ml_backend.active_learning.round import RoundPlan
from ml_backend.active_learning.selection import QueueOrder, Ranking, StackAware
from ml_backend.config import Settings, torch_device
from ml_backend.inference.scoring import PoolScores, ScoringConfig
from ml_backend.strategies.batch import (
    BatchConfig,
    LabelledTiles,
    Neighbourhood,
    StackPositions,
    resolve_neighbourhood,
    stack_conflicts,
)
from ml_backend.training.recipe import EnsembleSpec, ModelState, initial_model, product_train_config

log = logging.getLogger(__name__)


def product_plan(
    registry: Any,  # store: the project's ModelRegistry (its current version is fine-tuned)
    config: Any,
    settings: Settings,
    strategy: Any,
    *,
    train_overrides: dict | None = None,
    calibration: Callable[[], list[np.ndarray]] | None = None,
    progress: Callable[[dict], None] | None = None,
    score: bool = True,
    unlabelled: Callable[[], list[np.ndarray]] | None = None,
    previous_best: Sequence[int] = (),
) -> RoundPlan:
    """The product's round: fine-tune the current version (or a new U-Net), Settings' recipe and seeds.

    Parameters: four positional (what is trained, on which labels, how, scored by what) and six keyword-only options,
    each defaulting to "off" (the job passes its pool callbacks; tests and the round-cost benchmark pass none).

    ``unlabelled()``: the pool's tiles for the semi-supervised term (SEMI_SUPERVISED); scores a CANDIDATE_POOL sample
    holding up to CANDIDATE_KEEP of ``previous_best`` (the live ranking's top, issue 20.2)."""
    model, parent, how = initial_model(registry, config, settings)
    if parent is None and load_pretrained(registry, model):
        how = "pretrained"  # issue 11: the first fine-tuning starts from the project's self-supervised weights
    tcfg = product_train_config(settings, parent, train_overrides)
    return RoundPlan(
        strategy,
        ModelState(model, parent, how),
        train=tcfg,
        ensemble=EnsembleSpec.from_train_config(tcfg),
        calibration=calibration,
        progress=progress,
        unlabelled=unlabelled,
        scoring=ScoringConfig.from_settings(settings),
        score_seed=settings.seed,
        select_seed=settings.seed,
        score=score,
        candidates=CandidateSampler.from_settings(settings, previous_best),
    )


def pretrained_path(registry: Any) -> Path:
    """The project's self-supervised weights (``ml_backend.jobs.pretrain``), inside its registry folder."""
    return Path(registry.root) / "pretrain" / "pretrained.pt"


def load_pretrained(registry: Any, model: Any) -> bool:
    """Load the project's pretrained weights into ``model`` when they exist and fit its architecture."""
    import torch

    path = pretrained_path(registry)
    if not path.is_file():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: train from scratch, as before pretraining existed
        log.warning("project %s: pretrained weights unreadable (%s); training from scratch", registry.project_id, exc)
        return False
    if state.get("hparams") != dict(getattr(model, "hparams", {})):
        log.warning("project %s: pretrained weights are for another architecture (%s); training from scratch",
                    registry.project_id, state.get("hparams"))  # fmt: skip
        return False
    model.load_state_dict(state["state_dict"])
    log.info("project %s: first fine-tuning starts from the pretrained weights (%s steps)", registry.project_id,
             state.get("steps"))  # fmt: skip
    return True


def log_plan(registry: Any, plan: RoundPlan, n_tiles: int) -> None:
    tcfg = plan.train
    log.info(
        "project %s: training (%s, parent %s) on %d tiles, %d steps, lr %g, budget %.0f s, device %s",
        registry.project_id, plan.model.how, plan.model.parent, n_tiles, tcfg.steps, tcfg.lr, tcfg.time_budget_s,
        torch_device(tcfg.device),
    )  # fmt: skip


# ------------------------------------------------------------------------------------- stack-aware queue (issue 11)


def task_position(task: dict) -> tuple[int, int, int, int, int, int] | None:
    """(stack, z, y, x, h, w) from the task data the importer writes (``stack``, ``slice``, ``tile_y``, ...); None
    when the task does not say where it comes from (then it excludes nothing). The stack id is a CRC of the stack
    path (``stack``; older imports only have ``source``, which is the stack for a TIFF but one file per slice for a
    folder of slices): stable across jobs and processes."""
    data = task.get("data") or {}
    try:
        src = data.get("stack") or data["source"]
        z, y, x = int(data["slice"]), int(data["tile_y"]), int(data["tile_x"])
        h, w = int(data["tile_height"]), int(data["tile_width"])
    except (KeyError, TypeError, ValueError):
        return None
    if h < 1 or w < 1:
        return None
    return zlib.crc32(str(src).encode()), z, y, x, h, w


def positions_of(ids: Sequence[int], tasks: dict[int, dict]) -> np.ndarray:
    """(n, 6) ``[stack, z, y, x, h, w]`` for ``ids``; a task without a position is its own stack (no exclusion)."""
    rows = []
    for tid in ids:
        pos = task_position(tasks.get(int(tid)) or {})
        rows.append(pos if pos is not None else (-1 - int(tid), 0, 0, 0, 1, 1))
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), 6)


def batch_config(settings: Settings) -> BatchConfig:
    """BATCH_DIVERSITY's rules from Settings (strategies.batch): z radius, feature radius, method, hedges."""
    return BatchConfig(
        neighbourhood=Neighbourhood(z_radius=settings.diversity_z_radius),
        method=settings.diversity_method,
        feature_radius=settings.diversity_feature_radius,
        random_share=settings.selection_random_share,
        uncertainty_from_labels=settings.uncertainty_from_labels,
    )


def interleave_audit(selected: Sequence[int], audit: Sequence[int], every: int) -> list[int]:
    """The served order: one audit task at every ``every``-th place (places every-1, 2 every-1, ...) while audit
    tasks remain, the selection's tasks everywhere else, in their order; ``every`` 0: no audit places."""
    out: list[int] = []
    sel, aud = list(selected), list(audit)
    i = j = 0
    while i < len(sel) or j < len(aud):
        slot = every > 0 and (len(out) + 1) % every == 0
        if (slot and j < len(aud)) or i >= len(sel):
            out.append(int(aud[j]))
            j += 1
        else:
            out.append(int(sel[i]))
            i += 1
    return out


def audit_slots(k: int, n_audit: int, every: int) -> int:
    """How many of the first ``k`` served places are audit places (``interleave_audit``)."""
    return 0 if every <= 0 else min(n_audit, k // every)


@dataclass(frozen=True)
class FixedPool:
    """A pool with fixed queue scores (``stack_aware_order``): task ``ids``, their ``scores`` (lower = more
    informative), ``embeddings`` (rows for ``ids``, or None) and ``positions`` (rows for ``ids``)."""

    ids: Sequence[int]
    scores: np.ndarray
    embeddings: np.ndarray | None
    positions: np.ndarray


def stack_aware_order(
    pool: FixedPool,
    *,
    k: int,
    config: BatchConfig,
    labelled: LabelledTiles | None = None,
    audit: Sequence[int] = (),
    audit_every: int = 0,
    seed: int = 0,
) -> list[int]:
    """The served order ``StackAwareQueue`` gives for the fixed queue scores of ``pool``: the next batch of ``k``
    places without near-duplicates (of each other and of the ``labelled`` tiles' positions and embeddings; their
    ``count`` is not used), then the rest."""
    labelled_positions = None if labelled is None else labelled.positions
    labelled_embeddings = None if labelled is None else labelled.embeddings
    ids = [int(i) for i in pool.ids]
    row = {t: i for i, t in enumerate(ids)}
    pos = np.asarray(pool.positions)
    summary = {} if pool.embeddings is None else {"embedding": np.asarray(pool.embeddings)}
    stack = StackAware(
        _FixedQueue(np.asarray(pool.scores, dtype=np.float64)), lambda xs: pos[[row[int(t)] for t in xs]], k=k,
        config=config, labelled_positions=None if labelled_positions is None else lambda: labelled_positions,
    )  # fmt: skip
    queue = StackAwareQueue(stack, list(audit), audit_every)
    return queue(None, ids, PoolScores(summary, np.ones(len(ids))), labelled_embeddings=labelled_embeddings,
                 seed=seed).picked  # fmt: skip


@dataclass(frozen=True)
class _FixedQueue:
    """A queue selector with given scores (``stack_aware_order``)."""

    scores: np.ndarray

    def __call__(self, strategy: Any, ids: list[int], scores: Any, **_: Any) -> Ranking:
        order = np.argsort(self.scores, kind="stable")
        return Ranking(list(ids), [int(ids[i]) for i in order], self.scores)


def rank_scores(ids: Sequence[int], order: Sequence[int]) -> np.ndarray:
    """Queue scores in [0, 1) for ``ids`` from a served order (rank / n; lower = served first)."""
    rank = {int(t): r for r, t in enumerate(order)}
    n = max(1, len(ids))
    return np.asarray([rank[int(t)] / n for t in ids], dtype=np.float64)


@dataclass(frozen=True)
class StackAwareQueue:
    """The product's selector: ``selection.StackAware`` (the benchmark's selector, around ``QueueOrder``) plus the
    audit places: the audit tasks of the pool are never picked, the ones served within the next ``stack.k`` places
    count as picked for the exclusion rules (``StackAware.served``), and all of them are interleaved one every
    ``audit_every`` places (``interleave_audit``). Scores are ranks of the served order (comparable within one
    re-scoring, which pushes the whole pool)."""

    stack: StackAware
    audit: Sequence[int] = ()
    audit_every: int = 0

    @property
    def config(self) -> BatchConfig | None:
        return self.stack.config

    @property
    def wants_labelled_embeddings(self) -> bool:
        return self.stack.wants_labelled_embeddings

    def __call__(
        self, strategy: Any, ids: list[int], scores: Any, *, labelled_embeddings: np.ndarray | None, seed: int
    ) -> Ranking:
        pool = {int(t) for t in ids}
        audit = [a for a in (int(x) for x in self.audit) if a in pool]
        served = audit[: audit_slots(self.stack.k, len(audit), self.audit_every)]
        stack = dataclasses.replace(self.stack, held_out=tuple(audit), served=tuple(served))
        ranking = stack(strategy, ids, scores, labelled_embeddings=labelled_embeddings, seed=seed)
        held = set(audit)
        order = interleave_audit([t for t in ranking.picked if int(t) not in held], audit, self.audit_every)
        return Ranking(list(ids), order, rank_scores(ids, order))


def product_selector(
    settings: Settings, num_classes: int, tasks: dict[int, dict], labelled_ids: Sequence[int], audit: Sequence[int]
) -> Any:
    """The job's selector: ``StackAwareQueue`` (``selection.StackAware`` over ``QueueOrder``, positions from the task
    data, plus the audit places) when BATCH_DIVERSITY is on; off, the strategy's order with the audit tasks still
    interleaved (the audit rate does not depend on diversity), or plain ``QueueOrder`` (the strategy's own scores)
    when there is no audit task to serve either."""
    every = audit_every(settings.audit_fraction)
    if not settings.batch_diversity and not (every and audit):
        return QueueOrder(num_classes)  # the strategy's own scores (absolute for pixel-uncertainty strategies)
    cfg = batch_config(settings)
    if not settings.batch_diversity:
        cfg = dataclasses.replace(cfg, method="top", feature_radius=0.0, neighbourhood=Neighbourhood(z_radius=-1))
    labelled = [int(t) for t in labelled_ids]
    stack = StackAware(
        QueueOrder(num_classes), lambda ids: positions_of(ids, tasks), k=settings.train_batch_size, config=cfg,
        labelled_positions=lambda: positions_of(labelled, tasks), wants_labelled_embeddings=settings.batch_diversity,
    )  # fmt: skip
    return StackAwareQueue(stack, list(audit), every)


# ------------------------------------------------------------------------------------ cold start: spread (issue 18)


_SPREAD_HEAD = 1000  # spread_order: tiles placed by the greedy rules; the rest round-robin over the slices


def _farthest_first_1d(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Visiting order of ``values`` (one stack's slice numbers): a random first one, then always the one farthest
    from every visited (ties at random), so any prefix spreads over the stack's depth."""
    m = len(values)
    order = np.empty(m, dtype=np.int64)
    dist = np.full(m, np.inf)
    jitter = rng.random(m) * 1e-6
    i = int(rng.integers(m))
    for j in range(m):
        order[j] = i
        dist = np.minimum(dist, np.abs(values - values[i]))
        dist[i] = -np.inf
        if j + 1 < m:
            i = int(np.argmax(dist + jitter))
    return order


def spread_order(ids: Sequence[int], tasks: dict[int, dict], settings: Settings) -> list[int]:
    """A served order that needs no image and no model, spread over the data: slice by slice in a farthest-first
    order of each stack's slices (stacks interleaved by their share of slices), and within a slice the tile
    farthest in xy from the tiles already placed of that stack, avoiding near-duplicates of them (the stack rule of
    BATCH_DIVERSITY) while it can. The first ``_SPREAD_HEAD`` tiles are placed that way, the rest round-robin over
    the slices in a seeded random order. Why: right after an import, before the cold start's coverage order exists,
    the first batch must already span the stack's slices and field of view (issue 18: without scores Label Studio
    served tasks 1-20, the first two slices). Deterministic for the same tasks and seed; a task without a position
    is a slice of its own."""
    ids = [int(t) for t in ids]
    n = len(ids)
    if not n:
        return []
    rng = np.random.default_rng([settings.seed, 0x5B2])
    raw = positions_of(ids, tasks)
    pos = StackPositions.from_array(raw)
    slices, slice_of = np.unique(raw[:, :2], axis=0, return_inverse=True)
    slice_of = slice_of.reshape(-1)
    rank = np.zeros(len(slices))  # position of each slice in its stack's visiting order, as a fraction
    for stack in np.unique(slices[:, 0]):
        rows = np.flatnonzero(slices[:, 0] == stack)
        visit = _farthest_first_1d(slices[rows, 1].astype(np.float64), rng)
        rank[rows[visit]] = np.arange(len(rows)) / len(rows)
    slice_order = np.lexsort((rng.random(len(slices)), rank))  # interleaved stacks; ties at random
    # xy of tile centres, normalised per stack (the farthest-in-xy rule compares tiles of one stack)
    cy, cx = (raw[:, 2] + raw[:, 4] / 2).astype(np.float64), (raw[:, 3] + raw[:, 5] / 2).astype(np.float64)
    for stack in np.unique(raw[:, 0]):
        rows = raw[:, 0] == stack
        for c in (cy, cx):
            lo, hi = c[rows].min(), c[rows].max()
            c[rows] = (c[rows] - lo) / (hi - lo) if hi > lo else 0.5
    z_radius = settings.diversity_z_radius
    nb = resolve_neighbourhood(Neighbourhood(z_radius=z_radius), None, pos, settings.seed)
    members = [np.flatnonzero(slice_of == s) for s in range(len(slices))]
    chosen = np.zeros(n, dtype=bool)
    blocked = np.zeros(n, dtype=bool)
    mind = np.full(n, 4.0)  # squared xy distance to the nearest placed tile of the same stack (at most 2)
    jitter = rng.random(n) * 1e-9
    order: list[int] = []
    head = min(n, _SPREAD_HEAD)
    while len(order) < head:
        for s in slice_order:
            cand = members[s][~chosen[members[s]]]
            if not cand.size:
                continue
            free = cand[~blocked[cand]]
            pick = free if free.size else cand  # the stack rule is relaxed only when the slice has nothing else
            i = int(pick[np.argmax(mind[pick] + jitter[pick])])
            order.append(i)
            chosen[i] = True
            blocked |= stack_conflicts(pos, i, pos, nb)
            same = raw[:, 0] == raw[i, 0]
            d2 = (cy - cy[i]) ** 2 + (cx - cx[i]) ** 2
            mind = np.where(same, np.minimum(mind, d2), mind)
            if len(order) >= head:
                break
    rest = np.flatnonzero(~chosen)
    slice_pos = np.empty(len(slices), dtype=np.int64)
    slice_pos[slice_order] = np.arange(len(slices))
    turn = np.empty(len(rest), dtype=np.int64)  # the round in which a slice serves this tile
    within = rng.permutation(len(rest))
    for s in range(len(slices)):
        sel = np.flatnonzero(slice_of[rest] == s)
        turn[sel[np.argsort(within[sel], kind="stable")]] = np.arange(sel.size)
    rest = rest[np.lexsort((slice_pos[slice_of[rest]], turn))]
    return [ids[i] for i in (*order, *rest.tolist())]


def cold_start_order(
    ids: Sequence[int], tasks: dict[int, dict], settings: Settings, head: Sequence[int] = ()
) -> list[int]:
    """The cold start's served order of the unlabelled ``ids``: ``head`` first (the coverage order of the embedded
    sample, when it exists), then the other tasks in ``spread_order``; audit tasks (``AUDIT_FRACTION``) interleaved
    one every ``round(1 / AUDIT_FRACTION)`` places, as after every training."""
    pool = [int(t) for t in ids]
    in_pool = set(pool)
    audit = [a for a in audit_task_ids(sorted(tasks), settings.audit_fraction, settings.seed) if a in in_pool]
    held = set(audit)
    first = [int(t) for t in head if int(t) in in_pool and int(t) not in held]
    seen = set(first)
    rest = [t for t in spread_order(pool, tasks, settings) if t not in held and t not in seen]  # the pool's order
    return interleave_audit(first + rest, audit, audit_every(settings.audit_fraction))
