"""The bounded candidate sample of a round (issue 20.2): bounded, refreshed every round, deterministic per seed,
keeps the previous best, never holds a labelled tile, reaches every tile over rounds; ``run_round`` scores and
selects on it; the benchmark's ``candidate_pool`` option is honoured; the prediction-age summary."""

from __future__ import annotations

import json
import re
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ml_backend.active_learning import QueueOrder, RoundPlan, ScoredPool, TopK, run_round
from ml_backend.active_learning.candidates import (
    CandidateSampler,
    PredictionAgeLog,
    best_candidates,
    phase_candidate_pool,
    prediction_age,
    previous_best,
    round_key,
    sample_candidates,
)
from ml_backend.active_learning.loop import KeepInMemory, NextBatch
from ml_backend.active_learning.plan import product_selector
from ml_backend.benchmarks.run import LocalScorer, OracleLabels
from ml_backend.config import Settings
from ml_backend.inference.scoring import ScoringConfig
from ml_backend.model import build_model
from ml_backend.strategies import get_strategy
from ml_backend.training.recipe import ModelState


def _draw(pool, size, version, best=(), keep=0, seed=0):
    return sample_candidates(pool, size, seed=seed, round_key=round_key(version), previous_best=best, keep=keep)


def test_the_sample_is_bounded_and_the_whole_pool_when_it_fits():
    pool = list(range(10, 5010))
    sample = _draw(pool, 300, "v1")
    assert len(sample) == len(set(sample)) == 300 and set(sample) <= set(pool) and sample == sorted(sample)
    assert _draw(pool, 0, "v1") == pool  # CANDIDATE_POOL=0: the whole pool
    assert _draw(pool[:200], 300, "v1") == pool[:200]  # a pool smaller than the sample: all of it


def test_refreshed_every_round_and_deterministic_per_seed():
    pool = list(range(20_000))
    rounds = [_draw(pool, 500, f"v{r:04d}") for r in range(4)]
    assert all(len(set(a) & set(b)) < 100 for i, a in enumerate(rounds) for b in rounds[i + 1 :])  # ~12 expected
    assert rounds[0] == _draw(list(reversed(pool)), 500, "v0000")  # same seed and round: same sample, any order
    assert rounds[0] != _draw(pool, 500, "v0000", seed=1)  # another SEED: another draw
    assert _draw(pool, 500, "v0000", seed=1) == _draw(pool, 500, "v0000", seed=1)


def test_keeps_the_previous_best_still_unlabelled_and_never_a_labelled_tile():
    pool = list(range(1000, 3000))
    labelled = [7, 8, 9]  # picked last round: no longer in the pool
    best = labelled + [2999, 1500, 1500, 1001, 2500]
    sample = _draw(pool, 40, "v2", best=best, keep=4)
    assert {2999, 1500, 1001, 2500} <= set(sample) and not set(labelled) & set(sample)
    assert len(sample) == 40
    # at most half the sample is carried over: the other half is always a fresh draw
    many = list(range(1000, 1100))
    kept = set(_draw(pool, 40, "v2", best=many, keep=100)) & set(many)
    assert 20 <= len(kept) < 20 + 5  # 20 kept, plus the few the fresh draw happens to hit


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 30),
    size=st.integers(1, 12),
    keep=st.integers(0, 12),
    seed=st.integers(0, 2**31),
    best=st.lists(st.integers(0, 40), max_size=15),
)
def test_every_tile_is_reachable_over_rounds(n, size, keep, seed, best):
    """Even with the same tiles carried over every round (an adversarial 'previous best'), the fresh half of the
    sample reaches every tile: the miss probability over 1,000 rounds is at most (1 - 1/30) ** 1000 < 1e-14."""
    pool = list(range(n))
    seen: set[int] = set()
    for r in range(1000):
        sample = _draw(pool, size, f"v{r}", best=best, keep=keep, seed=seed)
        assert len(sample) == min(size, n) and set(sample) <= set(pool)
        seen |= set(sample)
        if len(seen) == n:
            break
    assert seen == set(pool)


def test_sampler_from_settings_and_seed_of_a_round():
    from ml_backend.config import Settings

    s = Settings.from_env(candidate_pool=5, candidate_keep=2, seed=3)
    sampler = CandidateSampler.from_settings(s, [40, 41])
    out = sampler(list(range(100)), "v0007-x")
    assert len(out) == 5 and {40, 41} <= set(out)
    assert out == sample_candidates(range(100), 5, seed=3, round_key=zlib.crc32(b"v0007-x"), previous_best=[40, 41],
                                    keep=2)  # fmt: skip
    assert Settings().candidate_pool == 2000 and Settings().candidate_keep == 200  # the documented defaults


@pytest.mark.parametrize(
    ("changes", "n_labelled", "expected"),
    [
        ({}, 0, 200),  # the random phase (fewer than UNCERTAINTY_FROM_LABELS = 60 labels): RANDOM_PHASE_CANDIDATES
        ({}, 59, 200),
        ({}, 60, 2000),  # uncertainty picks from here on: CANDIDATE_POOL
        ({}, 500, 2000),
        ({"random_phase_candidates": 0}, 20, 2000),  # 0: no bound of its own
        ({"candidate_pool": 0}, 20, 200),  # CANDIDATE_POOL 0 (the whole pool) is no bound either
        ({"candidate_pool": 0}, 80, 0),
        ({"candidate_pool": 150}, 20, 150),  # the smaller bound wins
        ({"uncertainty_from_labels": 0}, 0, 2000),  # no budget switch: no random phase
        ({"selection_random_share": 1.0, "uncertainty_from_labels": 0}, 500, 200),  # all-random batches throughout
        ({"batch_diversity": False, "audit_fraction": 0.0}, 20, 2000),  # plain queue order: the switch never applies
    ],
)
def test_a_round_whose_batch_is_a_random_draw_scores_a_smaller_sample(changes, n_labelled, expected):
    """Issue 18: while the product's selector draws the whole batch at random, scores pick nothing; the round
    scores RANDOM_PHASE_CANDIDATES tiles (pre-annotations and the next batches), so the first versions go live
    sooner. The decision reads the job's own selector (``product_selector``)."""
    settings = Settings(**{"candidate_pool": 2000, "random_phase_candidates": 200, **changes})
    select = product_selector(settings, 2, {}, [], [])
    assert phase_candidate_pool(settings, select, n_labelled) == expected


def test_previous_best_is_the_live_ranking_as_label_studio_holds_it():
    tasks = {
        1: {"predictions": [{"model_version": "v2", "score": 0.5}]},
        2: {"predictions": [{"model_version": "v2", "score": 0.1}, {"model_version": "v1", "score": 0.0}]},
        3: {"predictions": [{"model_version": "v1", "score": 0.0}]},  # not the live version's: not ranked by it
        4: {"predictions": [{"model_version": "v2", "score": 0.0}]},  # labelled
        5: {"predictions": [{"model_version": "v2", "score": 0.3}]},
        6: {},
    }
    assert previous_best(tasks, [4], "v2", 10) == [2, 5, 1]
    assert previous_best(tasks, [4], "v2", 2) == [2, 5]
    assert previous_best(tasks, [], None, 5) == []


def _tiny_pool(n: int = 40, size: int = 32):
    rng = np.random.default_rng(0)
    images = rng.random((n, size, size)).astype(np.float32)
    masks = (images > 0.5).astype(np.int64)
    return images, masks


class _Dataset:
    def __init__(self, images, masks):
        self.pool_images, self.pool_masks = images, masks


@pytest.mark.parametrize("select", [TopK(3), QueueOrder(2)])
def test_run_round_scores_and_selects_on_the_sample(select):
    images, masks = _tiny_pool()
    torch.manual_seed(0)
    model = build_model("unet", width=4, depth=2).eval()
    labelled = [0, 1, 2, 3]
    sampler = CandidateSampler(10, 4, seed=5, previous_best=(1, 2, 30, 31))  # 1, 2 are labelled by now

    class Scorer(LocalScorer):
        seen: list[int] = []

        def score(self, trained, version, strategy, ids, seed) -> ScoredPool:
            Scorer.seen = list(ids)
            return super().score(trained, version, strategy, ids, seed)

    plan = RoundPlan(get_strategy("entropy"), ModelState(model, how="kept"), candidates=sampler,
                     scoring=ScoringConfig(device="cpu", tile_size=32, tile_overlap=0))  # fmt: skip
    sink = NextBatch()
    out = run_round(plan, OracleLabels(_Dataset(images, masks), labelled), publisher=KeepInMemory("round-1"),
                    scorer=Scorer(images, plan.scoring), select=select, sink=sink)  # fmt: skip
    unlabelled = [i for i in range(len(images)) if i not in labelled]
    assert out.pool_size == len(unlabelled) == 36
    assert Scorer.seen == sampler(unlabelled, "round-1") and len(Scorer.seen) == 10
    assert {30, 31} <= set(Scorer.seen) and not set(Scorer.seen) & set(labelled)
    assert out.scored.ids == Scorer.seen and set(out.ranking.picked) <= set(Scorer.seen)
    best = best_candidates(out, plan.strategy, 6)
    assert len(best) == 6 and set(best) <= set(Scorer.seen)
    assert best[: len(sink.picked)] == sink.picked[:6]  # the round's picks first, then the next most informative
    if isinstance(select, TopK):  # beyond the picks: the strategy's order on the sample
        values = plan.strategy.select(out.scored.scores.summary, 10, labelled_embeddings=None, seed=0).values
        rank = {int(t): float(v) for t, v in zip(out.scored.ids, values, strict=True)}
        rest = best[len(sink.picked) :]
        assert [rank[t] for t in rest] == sorted((rank[t] for t in rest), reverse=True)


def test_prediction_age_counts_versions_back_cold_start_and_never(tmp_path):
    tasks = {
        1: {"predictions": [{"model_version": "v1"}]},
        2: {"predictions": [{"model_version": "v2"}, {"model_version": "v1"}]},
        3: {"predictions": [{"model_version": "cold-start"}]},
        4: {},
        5: {"predictions": [{"model_version": "v0-forgotten"}]},
        6: {"predictions": [{"model_version": "v1"}]},  # labelled
        7: {"predictions": [{"model_version": "v2"}]},  # delivered now
    }
    ages = prediction_age(tasks, [6], "v3", [7], ["v1", "v2", "v3"])
    assert ages == {"2": 1, "1": 1, "cold-start": 1, "never": 1, "older": 1, "0": 1}
    log = PredictionAgeLog(tmp_path, 4)
    assert log.read() == {}
    log.record(tasks, [6], "v2", [2, 7], pool=6, candidate_pool=2)
    rec = log.record(tasks, [6], "v3", [7], pool=6, candidate_pool=2)
    assert rec["history"] == ["v2", "v3"] and rec["ages"]["0"] == 1 and rec["ages"]["1"] == 1
    assert json.loads((tmp_path / "projects" / "4" / "prediction_age.json").read_text()) == rec == log.read()


def test_benchmark_protocol_option_is_honoured(tmp_path):
    """``candidate_pool``: every round of a (tiny, real) benchmark run scores that many pool tiles, not the pool."""
    from ml_backend.benchmarks.protocol import PRESETS, Protocol
    from ml_backend.benchmarks.run import initial_tag, run_strategy

    base = Protocol(**{**PRESETS["quick"], "data": "synthetic", "synthetic_n": 4, "synthetic_size": 96, "downsample": 1,
                       "tile": 32})  # fmt: skip
    p = Protocol(**{**base.__dict__, "pool_size": 40, "m": 4, "k": 3, "rounds": 2, "init_steps": 4, "steps": 2,
                    "full_seeds": [], "width": 4, "depth": 2, "candidate_pool": 12, "candidate_keep": 4})  # fmt: skip
    rec = run_strategy(tmp_path, p, "entropy", 0)
    scored = [(r.get("pool"), r.get("candidates")) for r in rec["rounds"][:-1]]
    assert len(scored) == 2 and all(c == 12 and pool > 12 for pool, c in scored), rec["rounds"]
    assert len(rec["labelled_order"]) == 4 + 2 * 3
    assert initial_tag(base, p) == initial_tag(base, Protocol(**{**p.__dict__, "candidate_pool": 0}))


def test_status_page_shows_how_old_each_tiles_prediction_is(tmp_path):
    from ml_backend.server.status_page import collect_project_status, render_status_page
    from ml_backend.store.registry import ModelRegistry

    tasks = {i: {"predictions": [{"model_version": "v1"}]} for i in range(10)}
    tasks.update({10 + i: {} for i in range(5)})
    log = PredictionAgeLog(tmp_path, 3)
    log.record(tasks, [], "v1", list(range(10)), pool=15, candidate_pool=10)
    hostile = 'v2<script>alert("x")</script>'
    log.record(tasks, [0], hostile, [1, 2, 3, 10], pool=14, candidate_pool=4)
    project = collect_project_status(ModelRegistry(tmp_path, 3))
    assert project["prediction_age"]["ages"] == {"0": 4, "1": 6, "never": 4} and not project["problems"]
    page = render_status_page({"projects": [project]})
    rows = re.findall(r'<tr class="age-([^"]+)"><th>([^<]+)</th><td class="num">(\d+)</td>', page)
    assert rows == [("0", "live version", "4"), ("1", "1 version back", "6"), ("never", "never predicted", "4")]
    assert "scored 4 of 14" in page and "<script>" not in page and "v2&lt;script&gt;" in page
    (tmp_path / "projects" / "3" / "prediction_age.json").write_text("{not json")  # damaged: no section, no failure
    page = render_status_page({"projects": [collect_project_status(ModelRegistry(tmp_path, 3))]})
    assert "No delivery recorded yet" in page
