"""The simulated active loop: ``run_round`` over rounds 0..n with an oracle, and the seeds each round uses.

The benchmark (``benchmarks.run.run_strategy``), the region-effort comparison (``benchmarks.region_effort``) and the
diagnosis (``benchmarks.diagnose``, which replays a saved run) all run this one loop:

    round 0: keep the starting model (train None) ─► score the pool ─► pick ─► the oracle labels the picks
    round r: fine-tune on every label so far (seed ``train(r)``) ─► evaluate ─► score ─► pick ─► label ...
    round n: fine-tune ─► evaluate (nothing more is picked)

Each round's model starts from the previous round's. Everything a caller adds around a round (its records, the
emulated gate, the annotation effort, a per-round candidate sample) is a ``RoundHooks`` method; what the oracle does
with the picked tiles (ground truth of whole tiles, or of a suggested region) is ``Oracle.annotate``.

``SeedSchedule`` is the ONE rule that turns a run's seed into the seeds of its rounds; changing it changes every
published figure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ml_backend.active_learning.round import (
    Evaluation,
    LabelledSet,
    LabelSource,
    PoolScorer,
    RoundOutcome,
    RoundPlan,
    ScoredPool,
    run_round,
)
from ml_backend.active_learning.selection import Ranking, Selector
from ml_backend.training.recipe import EnsembleSpec, ModelState, TrainedModel


@dataclass(frozen=True)
class SeedSchedule:
    """The seeds of one simulated run, from its ``seed``: the same for every arm, so arms are paired per seed.

    * ``split``: the train/validation split of every training (the run's seed itself);
    * ``train(r)``: the training seed of round r (round 0: the initial model);
    * ``pick(r)``: the scoring (MC dropout) and selection seed of round r's tiles, picked after round r - 1;
    * ``members(r, n)``: the seeds of the n bootstrap members that score the pool for round r's pick (their
      resamples are drawn with ``pick(r)``).
    """

    seed: int

    @property
    def split(self) -> int:
        return self.seed

    def train(self, rnd: int) -> int:
        return self.seed * 1000 + rnd

    def pick(self, rnd: int) -> int:
        return self.seed * 1000 + rnd

    def members(self, rnd: int, n: int) -> tuple[int, ...]:
        return tuple(self.seed * 1000 + rnd * 10 + e for e in range(n))


# ------------------------------------------------------------------------------------------------ the plug-ins


class Oracle(LabelSource, Protocol):
    """A label source that annotates the tiles a round picked (the next rounds train on them too)."""

    def annotate(self, ids: list[int], outcome: RoundOutcome) -> None: ...


@dataclass
class KeepInMemory:
    """The simulation's publisher: the model stays in memory for the next round; the version is the round's name."""

    name: str

    def publish(self, trained: TrainedModel, labelled: LabelledSet, evaluation: Evaluation) -> str:
        return self.name


@dataclass
class NextBatch:
    """The simulation's prediction sink: remembers the tiles the oracle annotates next."""

    picked: list[int] = field(default_factory=list)

    def put(self, version: str, scored: ScoredPool | None, ranking: Ranking | None) -> int:
        self.picked = [] if ranking is None else list(ranking.picked)
        return len(self.picked)


class RoundHooks:
    """What a caller does around each round; every method is optional (this class: nothing).

    Order per round r: ``before(r, plan)`` -> ``run_round`` (``evaluate(r, trained)`` from round 1 on) ->
    ``after(r, outcome, picked)`` -> the oracle annotates ``picked`` (none on the last round).
    """

    def before(self, rnd: int, plan: RoundPlan) -> RoundPlan:
        """Round ``rnd``'s plan, right before it runs (a caller may add its per-round parts: progress, candidates)."""
        return plan

    def evaluate(self, rnd: int, trained: TrainedModel) -> Evaluation:
        """The round's evaluation (rounds 1..n: round 0's model was measured where it was trained)."""
        return Evaluation()

    def after(self, rnd: int, outcome: RoundOutcome, picked: list[int]) -> None:
        """The round ran; ``picked``: the tiles it chose for the next round (empty on the last)."""


@dataclass
class ActiveLoop:
    """The plug-ins of a simulated run (see the module doc). ``train``: a training seed -> the round's TrainConfig;
    ``ensemble``: round r -> the bootstrap members that score the pool for r's pick (None: no members);
    ``sink``: round r -> the sink that records its picks (``NextBatch``; the diagnosis replays a saved order)."""

    oracle: Oracle
    train: Callable[[int], Any]
    scorer: PoolScorer | None = None
    select: Selector | None = None
    ensemble: Callable[[int], EnsembleSpec | None] | None = None
    sink: Callable[[int], NextBatch] = lambda rnd: NextBatch()
    hooks: RoundHooks = field(default_factory=RoundHooks)

    def run(self, start: RoundPlan, rounds: int, schedule: SeedSchedule) -> list[RoundOutcome]:
        """Rounds 0..``rounds`` from ``start`` (its model, strategy, scoring, calibration, unlabelled pool,
        candidates; the loop sets its training, ensemble, seeds and whether it scores). Returns the rounds' outcomes
        (fewer when a round picks nothing)."""
        state = start.model
        outcomes: list[RoundOutcome] = []
        for rnd in range(rounds + 1):
            last = rnd == rounds
            plan = replace(
                start,
                model=state,
                train=None if rnd == 0 else self.train(schedule.train(rnd)),
                ensemble=None if last or self.ensemble is None else self.ensemble(rnd + 1),
                score_seed=schedule.pick(rnd + 1),
                select_seed=schedule.pick(rnd + 1),
                score=not last,
            )
            plan = self.hooks.before(rnd, plan)
            sink = self.sink(rnd)
            outcome = run_round(
                plan, self.oracle, publisher=KeepInMemory(f"round-{rnd}"), scorer=self.scorer, select=self.select,
                sink=sink, evaluate=None if rnd == 0 else lambda trained, rnd=rnd: self.hooks.evaluate(rnd, trained),
            )  # fmt: skip
            outcomes.append(outcome)
            state = ModelState(outcome.trained.model, how="kept")  # the next round fine-tunes this round's model
            picked = [] if last else [int(i) for i in sink.picked]
            self.hooks.after(rnd, outcome, picked)
            if not picked:
                break
            self.oracle.annotate(picked, outcome)
        return outcomes
