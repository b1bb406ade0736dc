"""The simulated active loop (``active_learning.loop``): the seed schedule, and the order in which a 2-round run
calls its plug-ins, with fakes (no training: the fake training config is None, so each round keeps the model)."""

from __future__ import annotations

import numpy as np
import torch

from ml_backend.active_learning import Evaluation, LabelledSet, LabelledTile, Ranking, RoundPlan, ScoredPool
from ml_backend.active_learning.loop import ActiveLoop, NextBatch, RoundHooks, SeedSchedule
from ml_backend.benchmarks.run import ensemble_spec
from ml_backend.training.recipe import ModelState


def test_the_seed_schedule():
    s = SeedSchedule(3)
    assert s.split == 3
    assert [s.train(r) for r in range(3)] == [3000, 3001, 3002]  # round 0: the initial model
    assert [s.pick(r) for r in range(1, 4)] == [3001, 3002, 3003]  # round r's tiles, picked after round r - 1
    assert s.members(2, 3) == (3020, 3021, 3022)
    assert SeedSchedule(0).train(0) == 0 and SeedSchedule(0).members(1, 2) == (10, 11)
    assert SeedSchedule(3) == SeedSchedule(3) and hash(SeedSchedule(3)) == hash(SeedSchedule(3))


def test_the_benchmark_ensemble_follows_the_schedule():
    from dataclasses import replace

    from ml_backend.benchmarks.protocol import PRESETS, Protocol

    p = replace(Protocol(), **PRESETS["quick"])
    spec = ensemble_spec(p, 2, 3)  # the members that score the pool for round 3's pick
    assert spec.bootstrap_seed == SeedSchedule(2).pick(3) == 2003
    assert spec.member_seeds == SeedSchedule(2).members(3, p.ensemble) == (2030, 2031)
    assert spec.base.seed == 2003 and spec.base.split_seed == 2


class _Oracle:
    def __init__(self, calls: list) -> None:
        self.ids, self.calls = [0, 1], calls

    def labelled(self) -> LabelledSet:
        self.calls.append(("labelled", tuple(self.ids)))
        return LabelledSet([LabelledTile(i, None, np.zeros((8, 8), np.float32), np.zeros((8, 8), np.int64))
                            for i in self.ids])  # fmt: skip

    def unlabelled(self) -> list[int]:
        self.calls.append(("unlabelled",))
        return [i for i in range(8) if i not in self.ids]

    def annotate(self, ids: list[int], outcome) -> None:
        self.calls.append(("annotate", tuple(ids)))
        self.ids = self.ids + ids


class _Hooks(RoundHooks):
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def before(self, rnd, plan):
        self.calls.append(("before", rnd, plan.train, plan.score, plan.score_seed, plan.select_seed, plan.ensemble))
        return plan

    def evaluate(self, rnd, trained):
        self.calls.append(("evaluate", rnd))
        return Evaluation({"iou": 0.5})

    def after(self, rnd, outcome, picked):
        self.calls.append(("after", rnd, outcome.version, tuple(picked)))


def test_a_two_round_run_calls_its_plug_ins_in_order():
    calls: list = []
    oracle = _Oracle(calls)

    def train(seed: int):
        calls.append(("train config", seed))
        return None  # keep the model: the order of the calls is what this test is about

    def score(trained, version, strategy, ids, seed):
        calls.append(("score", version, tuple(ids), seed))
        return ScoredPool(list(ids), None)

    def select(strategy, ids, scores, *, labelled_embeddings, seed):
        calls.append(("select", seed))
        return Ranking(list(ids), list(ids[:2]))

    class Scorer:
        pass

    scorer = Scorer()
    scorer.score = score
    loop = ActiveLoop(oracle, train=train, scorer=scorer, select=select,
                      ensemble=lambda rnd: f"ensemble for round {rnd}", hooks=_Hooks(calls))  # fmt: skip
    model = torch.nn.Linear(1, 1)
    outcomes = loop.run(RoundPlan(object(), ModelState(model, how="kept")), 2, SeedSchedule(1))

    assert calls == [
        ("before", 0, None, True, 1001, 1001, "ensemble for round 1"),
        ("labelled", (0, 1)),
        ("unlabelled",),
        ("score", "round-0", (2, 3, 4, 5, 6, 7), 1001),
        ("select", 1001),
        ("after", 0, "round-0", (2, 3)),
        ("annotate", (2, 3)),
        ("train config", 1001),
        ("before", 1, None, True, 1002, 1002, "ensemble for round 2"),
        ("labelled", (0, 1, 2, 3)),
        ("evaluate", 1),
        ("unlabelled",),
        ("score", "round-1", (4, 5, 6, 7), 1002),
        ("select", 1002),
        ("after", 1, "round-1", (4, 5)),
        ("annotate", (4, 5)),
        ("train config", 1002),
        ("before", 2, None, False, 1003, 1003, None),  # the last round: no scoring, no members
        ("labelled", (0, 1, 2, 3, 4, 5)),
        ("evaluate", 2),
        ("after", 2, "round-2", ()),
    ]
    assert [o.version for o in outcomes] == ["round-0", "round-1", "round-2"]
    assert all(o.trained.model is model for o in outcomes)  # each round starts from the previous round's model
    assert outcomes[1].evaluation.metrics == {"iou": 0.5} and outcomes[0].evaluation.metrics == {}


def test_the_loop_stops_when_a_round_picks_nothing_and_a_sink_can_replay_picks():
    calls: list = []

    class Replay(NextBatch):
        def put(self, version, scored, ranking) -> int:
            return len(self.picked)

    picks = {0: [5], 1: []}
    loop = ActiveLoop(_Oracle(calls), train=lambda seed: None, sink=lambda rnd: Replay(picks[rnd]))
    outcomes = loop.run(RoundPlan(None, ModelState(torch.nn.Linear(1, 1))), 5, SeedSchedule(0))
    assert len(outcomes) == 2  # round 1 picked nothing: the run ends there
    assert [c for c in calls if c[0] == "annotate"] == [("annotate", (5,))]
    assert ("unlabelled",) not in calls  # no scorer: nothing scored
