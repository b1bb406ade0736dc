"""The product's side of issue 11: the stack-aware queue (positions from task data, near-duplicate-free next batch,
audit places), the audit split, and the promotion gate with real training on a real registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.active_learning import LabelledSet, LabelledTile, QueueOrder, run_round
from ml_backend.active_learning.audit import AuditGate, audit_every, audit_task_ids, split_audit
from ml_backend.active_learning.plan import (
    FixedPool,
    StackAwareQueue,
    batch_config,
    interleave_audit,
    positions_of,
    product_selector,
    rank_scores,
    stack_aware_order,
    task_position,
)
from ml_backend.config import Settings
from ml_backend.data.synthetic import generate_em_like
from ml_backend.inference.scoring import PoolScores
from ml_backend.strategies import get_strategy
from ml_backend.strategies.batch import BatchConfig, LabelledTiles, Neighbourhood


def _task(tid: int, z: int, y: int, x: int, size: int = 64, source: str = "/data/stack.tif") -> dict:
    return {"id": tid, "data": {"image": f"/t/{tid}.png", "source": source, "slice": z, "tile_y": y, "tile_x": x,
                                "tile_width": size, "tile_height": size}}  # fmt: skip


def _near_duplicates(a: dict, b: dict, z_radius: int) -> bool:
    pa, pb = task_position(a), task_position(b)
    assert pa is not None and pb is not None
    overlap_y = min(pa[2] + pa[4], pb[2] + pb[4]) - max(pa[2], pb[2])
    overlap_x = min(pa[3] + pa[5], pb[3] + pb[5]) - max(pa[3], pb[3])
    return pa[0] == pb[0] and abs(pa[1] - pb[1]) <= z_radius and overlap_y > 0 and overlap_x > 0


def _groups_pool(n_groups: int = 6, depth: int = 8) -> dict[int, dict]:
    """``n_groups`` xy positions, each on ``depth`` consecutive slices: every group is a column of near-duplicates."""
    tasks, tid = {}, 1
    for g in range(n_groups):
        for z in range(depth):
            tasks[tid] = _task(tid, z, 0, 64 * g)
            tid += 1
    return tasks


def test_task_positions_come_from_the_importers_task_data():
    t = _task(7, 3, 128, 64, size=32)
    stack, z, y, x, h, w = task_position(t)
    assert (z, y, x, h, w) == (3, 128, 64, 32, 32)
    assert task_position(_task(8, 0, 0, 0, source="/data/other.tif"))[0] != stack
    assert task_position({"id": 9, "data": {"image": "x"}}) is None
    # A folder of slices: one source file per slice, one stack (the importer's ``stack`` key)
    a, b = _task(10, 0, 0, 0, source="/data/folder/z000.png"), _task(11, 1, 0, 0, source="/data/folder/z001.png")
    assert task_position(a)[0] != task_position(b)[0]  # an old import: every slice its own stack
    a["data"]["stack"] = b["data"]["stack"] = "/data/folder"
    assert task_position(a)[0] == task_position(b)[0]
    pos = positions_of([9, 7], {7: t, 9: {"id": 9, "data": {}}})
    assert pos.shape == (2, 6) and pos[0, 0] < 0 and pos[1, 0] == stack  # no position: its own stack


def test_next_batch_holds_at_most_one_tile_per_near_duplicate_column():
    tasks = _groups_pool(n_groups=6, depth=4)  # z in 0..3: the whole column is within z radius 3
    ids = sorted(tasks)
    rng = np.random.default_rng(0)
    base = np.linspace(0.0, 1.0, len(ids))  # the strategy alone would take group 0's four slices first
    emb = rng.normal(size=(len(ids), 8))
    for method in ("weighted_kmeans", "typiclust", "top"):
        cfg = BatchConfig(neighbourhood=Neighbourhood(z_radius=3), method=method)
        order = stack_aware_order(FixedPool(ids, base, emb, positions_of(ids, tasks)), k=6, config=cfg)
        assert sorted(order) == ids  # every task once
        first = order[:6]
        columns = [task_position(tasks[t])[3] for t in first]
        assert len(set(columns)) == 6, (method, first, columns)
    # without the rule (z radius -1, "top"): the base order, near-duplicates first
    off = BatchConfig(neighbourhood=Neighbourhood(z_radius=-1), method="top", feature_radius=0.0)
    order = stack_aware_order(FixedPool(ids, base, emb, positions_of(ids, tasks)), k=6, config=off)
    assert order == ids


def test_labelled_neighbours_and_audit_places_are_excluded_from_the_batch():
    tasks = _groups_pool(n_groups=10, depth=4)
    labelled = [1]  # group 0 (x = 0) holds a labelled tile
    ids = [t for t in sorted(tasks) if t not in labelled]
    base = np.linspace(0.0, 1.0, len(ids))
    audit = [ids[-1]]  # group 9's last slice is an audit task, served at place 3 (every 4)
    cfg = BatchConfig(neighbourhood=Neighbourhood(z_radius=3), method="top", feature_radius=0.0)
    pool = FixedPool(ids, base, None, positions_of(ids, tasks))
    order = stack_aware_order(pool, k=8, config=cfg, audit=audit, audit_every=4,
                              labelled=LabelledTiles(positions=positions_of(labelled, tasks)))  # fmt: skip
    assert order[3] == audit[0] and order.count(audit[0]) == 1
    first = [tasks[t] for t in order[:8]]
    for i, a in enumerate(first):
        assert not _near_duplicates(a, tasks[1], 3), "a neighbour of a labelled tile was queued"
        for b in first[i + 1 :]:
            assert not _near_duplicates(a, b, 3), (a["id"], b["id"])


def test_interleave_audit_places_one_audit_task_every_n_places():
    assert interleave_audit([1, 2, 3, 4, 5], [90, 91], 3) == [1, 2, 90, 3, 4, 91, 5]
    assert interleave_audit([1], [90, 91], 3) == [1, 90, 91]  # selection exhausted: the audit tasks follow
    assert interleave_audit([1, 2], [90], 0) == [1, 2, 90]
    assert list(rank_scores([5, 6, 7], [7, 5, 6])) == pytest.approx([1 / 3, 2 / 3, 0.0])


def test_audit_split_is_a_deterministic_stable_sample():
    ids = list(range(1, 2001))
    audit = audit_task_ids(ids, 0.1, seed=0)
    assert 150 < len(audit) < 250 and audit == audit_task_ids(ids, 0.1, seed=0)
    more = audit_task_ids(ids + list(range(2001, 2101)), 0.1, seed=0)
    assert set(audit) <= set(more)  # importing more tasks never changes which old tasks are audit tasks
    assert set(audit) != set(audit_task_ids(ids, 0.1, seed=1))
    assert audit_task_ids(ids, 0.0) == [] and audit_every(0.1) == 10 and audit_every(0.0) == 0
    tiles = [LabelledTile(t, None, np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int64)) for t in ids[:50]]
    train, held = split_audit(tiles, set(audit))
    assert {t.task_id for t in held} == set(audit) & set(ids[:50]) and len(train) + len(held) == 50


def test_product_selector_reorders_an_entropy_queue_without_near_duplicates():
    tasks = _groups_pool(n_groups=6, depth=4)  # z 0..3: each column is one near-duplicate group
    ids = sorted(tasks)
    settings = Settings.from_env(train_batch_size=5, audit_fraction=0.0, selection_random_share=0.0,
                                 uncertainty_from_labels=0)  # the strategy's picks only (no hedge)
    select = product_selector(settings, 2, tasks, [], [])
    assert isinstance(select, StackAwareQueue) and select.config == batch_config(settings)
    rng = np.random.default_rng(3)
    value = np.sort(rng.uniform(10, 100, len(ids)))[::-1].copy()  # entropy favours group 0 (lowest ids)
    summary = {"value": value, "embedding": rng.normal(size=(len(ids), 4)).astype(np.float32)}
    ranking = select(get_strategy("entropy"), ids, PoolScores(summary, np.full(len(ids), 64 * 64)),
                     labelled_embeddings=None, seed=0)  # fmt: skip
    first = ranking.picked[:5]
    assert len({task_position(tasks[t])[3] for t in first}) == 5
    assert sorted(ranking.scores) == pytest.approx([r / len(ids) for r in range(len(ids))])
    off = product_selector(settings.replace(batch_diversity=False), 2, tasks, [], [])
    plain = off(get_strategy("entropy"), ids, PoolScores(summary, np.full(len(ids), 64 * 64)),
                labelled_embeddings=None, seed=0)  # fmt: skip
    assert plain.picked[:5] == ids[:5]  # BATCH_DIVERSITY=false: the strategy's own order
    assert isinstance(off, QueueOrder)  # and its own (absolute) scores when there is no audit task either
    with_audit = product_selector(settings.replace(batch_diversity=False, audit_fraction=0.25), 2, tasks, [], [ids[-1]])
    order = with_audit(get_strategy("entropy"), ids, PoolScores(summary, np.full(len(ids), 64 * 64)),
                       labelled_embeddings=None, seed=0).picked  # fmt: skip
    assert order[:5] == [*ids[:3], ids[-1], ids[3]]  # the strategy's order, the audit task at place 4


# ------------------------------------------------------------------------------------------- the promotion gate


class _Publisher:
    def __init__(self, registry, config, settings):
        from ml_backend.active_learning.publisher import RegistryPublisher

        self.inner = RegistryPublisher(registry, config, settings)

    def publish(self, trained, labelled, evaluation):
        return self.inner.publish(trained, labelled, evaluation)


def _round(registry, settings, images, masks, audit_tiles, steps: int, seed: int):
    from ml_backend.active_learning.plan import product_plan
    from ml_backend.labelstudio.labelconfig import parse_label_config

    config = parse_label_config(
        '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
        '<Label value="Mitochondria"/></BrushLabels></View>'
    )
    plan = product_plan(registry, config, settings, None, train_overrides={"steps": steps, "seed": seed, "lr": 3e-3},
                        score=False)  # fmt: skip
    tiles = [LabelledTile(100 + i, None, im, m) for i, (im, m) in enumerate(zip(images, masks, strict=True))]

    class Source:
        def labelled(self):
            return LabelledSet(tiles)

        def unlabelled(self):
            return []

    def live():
        cur = registry.load_current()
        return None if cur is None else (cur[0], cur[1]["version"])

    gate = AuditGate(audit_tiles, live, settings, min_tiles=3, tolerance=0.02)
    publisher = _Publisher(registry, config, settings)
    outcome = run_round(plan, Source(), publisher=publisher, evaluate=gate)
    return outcome, publisher.inner.meta


def test_a_version_worse_on_the_audit_tiles_is_stored_but_not_promoted(tmp_path):
    from ml_backend.store.registry import ModelRegistry

    raw, gt = generate_em_like(14, size=48, seed=4)
    images = [r.astype(np.float32) / 255.0 for r in raw]
    masks = [m.astype(np.int64) for m in gt]
    audit = [LabelledTile(900 + i, None, images[i], masks[i]) for i in range(10, 14)]
    settings = Settings.from_env(model_dir=tmp_path, model_width=4, model_depth=2, train_crop=32, device="cpu",
                                 tile_size=64, tile_overlap=8, val_fraction=0.0, bn_calibration_tiles=0)  # fmt: skip
    registry = ModelRegistry(tmp_path, 5)
    first, meta1 = _round(registry, settings, images[:10], masks[:10], audit, steps=200, seed=0)
    assert first.evaluation.promote and registry.current_version() == first.version
    assert meta1["audit"]["tiles"] == 4 and meta1["promotion"]["promoted"]
    assert "first version" in meta1["promotion"]["reason"]
    # the second version learns deliberately wrong masks (foreground and background swapped)
    wrong = [1 - m for m in masks[:10]]
    second, meta2 = _round(registry, settings, images[:10], wrong, audit, steps=200, seed=1)
    assert second.version != first.version
    assert not second.evaluation.promote
    assert registry.current_version() == first.version  # the live version keeps serving
    assert second.version in [v["version"] for v in registry.versions()]  # trained and stored
    assert meta2["promotion"] == {"promoted": False, "reason": second.evaluation.reason}
    assert "not promoted" in meta2["promotion"]["reason"] and first.version in meta2["promotion"]["reason"]
    assert meta2["audit"]["iou"] < meta2["audit"]["live_iou"] - 0.02
    assert second.scored is None  # the round ended: the live version's queue stays


def test_too_few_audit_tiles_promote_and_say_so(tmp_path):
    from ml_backend.store.registry import ModelRegistry

    raw, gt = generate_em_like(4, size=48, seed=2)
    images = [r.astype(np.float32) / 255.0 for r in raw]
    masks = [m.astype(np.int64) for m in gt]
    settings = Settings.from_env(model_dir=tmp_path, model_width=4, model_depth=2, train_crop=32, device="cpu",
                                 tile_size=64, tile_overlap=8, val_fraction=0.0, bn_calibration_tiles=0)  # fmt: skip
    registry = ModelRegistry(tmp_path, 6)
    audit = [LabelledTile(900, None, images[3], masks[3])]
    out, meta = _round(registry, settings, images[:3], masks[:3], audit, steps=3, seed=0)
    assert out.evaluation.promote and registry.current_version() == out.version
    assert "not enough audit tiles" in meta["promotion"]["reason"] and meta["audit"]["tiles"] == 1


ISSUE11_SETTINGS = [
    "BATCH_DIVERSITY", "DIVERSITY_Z_RADIUS", "DIVERSITY_FEATURE_RADIUS", "DIVERSITY_METHOD", "AUDIT_FRACTION",
    "AUDIT_MIN_TILES", "PROMOTION_TOLERANCE", "PRETRAIN", "PRETRAIN_STEPS", "PRETRAIN_TIME_BUDGET_S", "PRETRAIN_TILES",
    "PRETRAIN_CROP",
]  # fmt: skip


def test_issue11_settings_are_documented_and_validated(monkeypatch):
    from pathlib import Path

    from ml_backend.config import ConfigError

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    defaults = dict(Settings.documented())
    for var in ISSUE11_SETTINGS:
        assert f"| `{var}` | `{defaults[var]}` |" in readme, var
    monkeypatch.setenv("DIVERSITY_METHOD", "kcenter")
    with pytest.raises(ConfigError, match="DIVERSITY_METHOD"):
        Settings.from_env()
    monkeypatch.setenv("DIVERSITY_METHOD", "typiclust")
    monkeypatch.setenv("AUDIT_FRACTION", "1.5")
    with pytest.raises(ConfigError, match="AUDIT_FRACTION"):
        Settings.from_env()


def test_every_strategy_summary_carries_the_embedding_the_stack_aware_queue_reads():
    from ml_backend.labelstudio.labelconfig import parse_label_config
    from ml_backend.labelstudio.loop import score_tiles
    from ml_backend.model import build_model

    config = parse_label_config(
        '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
        '<Label value="Mitochondria"/></BrushLabels></View>'
    )
    torch.manual_seed(0)
    model = build_model("unet", width=4, depth=2)
    raw, _ = generate_em_like(3, size=48, seed=1)
    images = [r.astype(np.float32) / 255.0 for r in raw]
    images[2] = np.tile(images[2], (2, 2))  # larger than one inference tile: scored as crops
    settings = Settings.from_env(tile_size=48, tile_overlap=8, device="cpu", inference_batch=2)
    summary, results, pixels = score_tiles(model, images, get_strategy("entropy"), config, settings)
    assert summary["embedding"].shape == (3, model.embed(torch.zeros(1, 1, 48, 48)).shape[1])
    assert np.isfinite(summary["embedding"]).all() and summary["value"].shape == (3,)
    assert list(pixels) == [48 * 48, 48 * 48, 96 * 96] and len(results) == 3
    off, _, _ = score_tiles(model, images, get_strategy("entropy"), config, settings.replace(batch_diversity=False))
    assert "embedding" not in off and "thumbnail" not in off
    np.testing.assert_allclose(off["value"][:2], summary["value"][:2], rtol=1e-5)  # same scores for small tiles
    # the thumbnails the "auto" z radius is measured on, one per tile whatever its size
    assert summary["thumbnail"].shape == (3, 64) and np.isfinite(summary["thumbnail"]).all()


def test_auto_z_radius_setting_measures_the_radius_on_the_pools_thumbnails(monkeypatch, caplog):
    """DIVERSITY_Z_RADIUS=auto: a stack whose columns repeat one image on 8 slices is measured at radius 7, so the
    next batch (drawn: DIVERSITY_METHOD=stochastic) takes one tile per column."""
    from ml_backend.strategies.batch import thumbnail

    monkeypatch.setenv("DIVERSITY_Z_RADIUS", "auto")
    monkeypatch.setenv("DIVERSITY_METHOD", "stochastic")
    settings = Settings.from_env(train_batch_size=6, audit_fraction=0.0, diversity_feature_radius=0.0)
    assert settings.diversity_z_radius == "auto" and settings.diversity_method == "stochastic"
    tasks = _groups_pool(n_groups=6, depth=8)
    ids = sorted(tasks)
    rng = np.random.default_rng(0)
    columns = [rng.random((64, 64)) for _ in range(6)]
    thumbs = np.stack([thumbnail(columns[task_position(tasks[t])[3] // 64] + 0.01 * rng.random((64, 64)))
                       for t in ids])  # fmt: skip
    values = rng.random(len(ids))
    summary = {"value": values, "embedding": rng.normal(size=(len(ids), 4)), "thumbnail": thumbs}
    select = product_selector(settings, 2, tasks, [], [])
    with caplog.at_level("INFO", logger="ml_backend.active_learning.selection"):
        ranking = select(get_strategy("entropy"), ids, PoolScores(summary, np.ones(len(ids))),
                         labelled_embeddings=None, seed=0)  # fmt: skip
    first = ranking.picked[:6]
    assert len({task_position(tasks[t])[3] for t in first}) == 6
    assert "z radius 7 (measured)" in caplog.text
    monkeypatch.setenv("DIVERSITY_Z_RADIUS", "-2")
    from ml_backend.config import ConfigError

    with pytest.raises(ConfigError, match="DIVERSITY_Z_RADIUS"):
        Settings.from_env()
