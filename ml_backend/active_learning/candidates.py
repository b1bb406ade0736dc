"""A bounded candidate sample per round (issue 20.2): round cost bounded by the batch, not by the dataset.

Why: re-scoring every unlabelled tile after every training made a round's cost grow with the dataset (1,980 tiles:
429 s of re-scoring on a shared 2-core CPU; a thousand 8k x 8k sections would take days). The papers scored a pool
of 2,000 random tiles; ``run_round`` now scores ``CANDIDATE_POOL`` tiles per round and selects among them:

* a fresh random draw per round (seeded by SEED and the round's version, so it is deterministic for a round and
  different across rounds): every unlabelled tile has a chance in every round, none is left out for good;
* plus the previous round's best candidates still unlabelled (the top of its ranking, at most ``CANDIDATE_KEEP``
  and at most half the sample, so at least half of it is always fresh): a tile that ranked high stays in the
  running even when the draw misses it;
* labelled tiles are never drawn: the sample comes from the round's unlabelled pool only.

Tiles outside the sample keep their last prediction in Label Studio (hygiene deletes an old prediction only on a task
that holds one of the new version). Label Studio 1.23.2 under "Uncertainty sampling" serves only tasks holding a
prediction of the project's ``model_version`` (lowest score first; at random only once none is left) and the queue
view sorts by ``predictions_score`` with nulls last, so the sample is served first, in its order, and the unsampled
tiles after it. ``prediction_age`` summarises how old each unlabelled tile's prediction is (the status page shows it).
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.store.atomic import write_atomic
from ml_backend.strategies.batch import hedged_share

log = logging.getLogger(__name__)

AGE_FILE = "prediction_age.json"
COLD_START = "cold-start"  # jobs.pretrain.COLD_START_VERSION: a coverage order, no mask
HISTORY_KEPT = 50  # delivered versions remembered for "versions back"


def round_key(version: str) -> int:
    """The per-round part of the draw's seed: a CRC of the round's version (stable across processes)."""
    return zlib.crc32(str(version).encode())


def sample_candidates(
    pool: Iterable[int],
    size: int,
    *,
    seed: int,
    round_key: int,
    previous_best: Sequence[int] = (),
    keep: int = 0,
) -> list[int]:
    """The round's candidates (sorted ids): the whole ``pool`` when ``size`` is 0 or covers it, else the first
    ``min(keep, size // 2)`` of ``previous_best`` found in the pool plus a uniform draw without replacement of the
    rest of the sample from the other pool ids, seeded by (``seed``, ``round_key``). Deterministic for the same pool
    (whatever its order), seed and key."""
    ids = np.unique(np.fromiter((int(t) for t in pool), dtype=np.int64))
    if size <= 0 or ids.size <= size:
        return ids.tolist()
    best = np.asarray([int(t) for t in previous_best], dtype=np.int64)
    if best.size:
        best = best[np.isin(best, ids)]
        _, first = np.unique(best, return_index=True)
        best = best[np.sort(first)]  # de-duplicated, in ranking order
    kept = best[: max(0, min(int(keep), size // 2))]
    rest = np.setdiff1d(ids, kept, assume_unique=True)
    rng = np.random.default_rng([int(seed) % 2**32, int(round_key) % 2**32, 0xCA2D])
    drawn = rest[rng.choice(rest.size, size - kept.size, replace=False)]
    return np.sort(np.concatenate([kept, drawn])).tolist()


@dataclass(frozen=True)
class CandidateSampler:
    """``RoundPlan.candidates``: the round's pool -> its bounded sample (``sample_candidates``); ``size`` 0 = the
    whole pool (CANDIDATE_POOL), ``keep`` the previous best carried over (CANDIDATE_KEEP)."""

    size: int = 2000
    keep: int = 200
    seed: int = 0
    previous_best: tuple[int, ...] = ()

    @classmethod
    def from_settings(cls, settings: Any, previous_best: Sequence[int] = ()) -> CandidateSampler:
        best = tuple(int(t) for t in previous_best)
        return cls(settings.candidate_pool, settings.candidate_keep, settings.seed, best)

    def __call__(self, pool: Sequence[int], version: str) -> list[int]:
        t0 = time.monotonic()
        out = sample_candidates(pool, self.size, seed=self.seed, round_key=round_key(version),
                                previous_best=self.previous_best, keep=self.keep)  # fmt: skip
        if len(out) < len(pool):
            log.info("%s: scoring a candidate sample of %d of %d unlabelled tiles (%d carried over at most), "
                     "drawn in %.3f s", version, len(out), len(pool), min(self.keep, self.size // 2),
                     time.monotonic() - t0)  # fmt: skip
        return out


def phase_candidate_pool(settings: Any, select: Any, n_labelled: int) -> int:
    """CANDIDATE_POOL for a round whose selector is ``select`` with ``n_labelled`` labelled tasks: bounded by
    RANDOM_PHASE_CANDIDATES while the selector's batch is a random draw (``strategies.batch.hedged_share`` 1: fewer
    than UNCERTAINTY_FROM_LABELS labels), where the scores pick nothing and scoring the whole pool would only delay
    the version (issue 18); 0 means no bound."""
    config = getattr(select, "config", None)  # a selector without batch rules (plain queue order) has no switch
    if config is None or settings.random_phase_candidates <= 0 or hedged_share(n_labelled, config) < 1.0:
        return settings.candidate_pool
    return min(n for n in (settings.candidate_pool, settings.random_phase_candidates) if n > 0)


def best_candidates(outcome: Any, strategy: Any, n: int) -> list[int]:
    """The top ``n`` of a round's ranking (for the next round's sample): the served order of a queue ranking; for a
    plain batch (the benchmark's ``TopK``), its picks then the strategy's next most informative tiles."""
    ranking, scored = outcome.ranking, outcome.scored
    if ranking is None or scored is None or n <= 0:
        return []
    if ranking.scores is not None:
        return [int(t) for t in ranking.picked[:n]]
    picked = [int(t) for t in ranking.picked]
    more = strategy.select(scored.scores.summary, min(n, len(scored.ids)), labelled_embeddings=None, seed=0)
    ids = np.asarray(scored.ids, dtype=np.int64)
    seen = set(picked)
    return (picked + [int(t) for t in ids[more.order] if int(t) not in seen])[:n]


def previous_best(tasks: Mapping[int, Mapping], labelled: Iterable[int], version: str | None, n: int) -> list[int]:
    """The live version's ranking as Label Studio holds it: unlabelled tasks with a prediction of ``version``, lowest
    score (served first) first, the top ``n``. Label Studio is the product's memory between rounds."""
    if not version or n <= 0:
        return []
    done = {int(t) for t in labelled}
    ranked: list[tuple[float, int]] = []
    for tid, task in tasks.items():
        if int(tid) in done:
            continue
        scores = [p.get("score") for p in task.get("predictions") or []
                  if isinstance(p, Mapping) and p.get("model_version") == version]  # fmt: skip
        scores = [float(s) for s in scores if isinstance(s, (int, float))]
        if scores:
            ranked.append((min(scores), int(tid)))
    ranked.sort()
    return [tid for _, tid in ranked[:n]]


# --------------------------------------------------------------------------------------------- prediction age


def prediction_age(
    tasks: Mapping[int, Mapping],
    labelled: Iterable[int],
    live: str,
    delivered: Iterable[int],
    history: Sequence[str],
) -> dict[str, int]:
    """How old each unlabelled task's newest prediction is after ``live`` was delivered to ``delivered`` tasks:
    ``{"0": live, "1": one delivered version back, ..., "older": a version not in ``history``, "cold-start": the
    cold start's order only, "never": no prediction}``. ``history``: the delivered versions, oldest first, ending with
    ``live``; ``tasks``: the listing from before the delivery (with ``predictions``)."""
    back = {str(v): len(history) - 1 - i for i, v in enumerate(history)}
    done, fresh = {int(t) for t in labelled}, {int(t) for t in delivered}
    counts: dict[str, int] = {}
    for tid, task in tasks.items():
        if int(tid) in done:
            continue
        if int(tid) in fresh:
            age = "0"
        else:
            versions = {str(p.get("model_version")) for p in task.get("predictions") or [] if isinstance(p, Mapping)}
            known = [back[v] for v in versions if v in back]
            if known:
                age = str(min(known))
            elif versions - {COLD_START}:
                age = "older"
            else:
                age = COLD_START if versions else "never"
        counts[age] = counts.get(age, 0) + 1
    return counts


class PredictionAgeLog:
    """``MODEL_DIR/projects/<id>/prediction_age.json``: the last delivery's prediction ages and the delivered
    versions (written by the training job under the project's lock, read by the status page)."""

    def __init__(self, model_dir: str | Path, project_id: int | str) -> None:
        self.path = Path(model_dir) / "projects" / str(int(project_id)) / AGE_FILE

    def read(self) -> dict:
        """The last record; {} when none was written (or it cannot be read: it is a report, rewritten every round)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def record(
        self,
        tasks: Mapping[int, Mapping],
        labelled: Iterable[int],
        live: str,
        delivered: Sequence[int],
        *,
        pool: int,
        candidate_pool: int,
    ) -> dict:
        """Append ``live`` to the history, count the ages, write the record atomically; returns it."""
        history = [str(v) for v in self.read().get("history") or [] if str(v) != live] + [live]
        history = history[-HISTORY_KEPT:]
        rec = {
            "live": live,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pool": int(pool),
            "scored": len(delivered),
            "candidate_pool": int(candidate_pool),
            "ages": prediction_age(tasks, labelled, live, delivered, history),
            "history": history,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(rec, indent=1))
        return rec
