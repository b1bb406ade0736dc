"""The promotion gate cannot be fooled by audit tiles without foreground (issue 16, item 3).

The finding: five audit tiles re-annotated as empty and a poisoned training set; the gate compared foreground IoU
0.000 with 0.000 and promoted a version that scored 0.062 on the true masks (the live one: 0.884). The gate now
scores both classes, pools only the tiles that tell the versions apart, and says "undecided" (held back) when none
does. The scenarios train real tiny U-Nets through ``run_round`` into a real registry; the metric itself is checked
with parametrised and hypothesis tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ml_backend.active_learning import LabelledSet, LabelledTile, run_round
from ml_backend.active_learning.audit import (
    AuditGate,
    Confusion,
    audit_metrics,
    class_measures,
    compare,
    pooled,
)
from ml_backend.config import Settings
from ml_backend.data.synthetic import generate_em_like
from ml_backend.training.metrics import IGNORE

XML = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    '<Label value="Mitochondria"/></BrushLabels></View>'
)
TOL = 0.02


# --------------------------------------------------------------------------------------------- the metric itself


def _maps(draw: Any, n: int, shape: tuple[int, int]) -> list[np.ndarray]:
    return [np.array(draw(st.lists(st.integers(0, 1), min_size=shape[0] * shape[1], max_size=shape[0] * shape[1])),
                     dtype=np.int64).reshape(shape) for _ in range(n)]  # fmt: skip


@st.composite
def audit_case(draw: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(annotated masks, one version's predictions) on 1-4 small tiles; some masks empty, some all foreground."""
    n = draw(st.integers(1, 4))
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    targets = _maps(draw, n, shape)
    for i in range(n):
        kind = draw(st.sampled_from(["drawn", "empty", "full"]))
        if kind != "drawn":
            targets[i] = np.full(shape, 0 if kind == "empty" else 1, dtype=np.int64)
    return targets, _maps(draw, n, shape)


@given(audit_case())
@settings(max_examples=150, deadline=None)
def test_measures_are_bounded_and_defined_exactly_when_the_class_is_annotated(case):
    targets, preds = case
    total = pooled(Confusion.of(p, t) for p, t in zip(preds, targets, strict=True))
    m = class_measures(total)
    assert total.pixels == sum(t.size for t in targets)
    assert (m["fg_iou"] is None) == (not any(t.any() for t in targets))
    assert (m["bg_iou"] is None) == all(t.all() for t in targets)
    for v in m.values():
        assert v is None or 0.0 <= v <= 1.0
    assert m["miou"] is not None and m["error"] is not None  # informative even on empty annotations


@given(audit_case())
@settings(max_examples=150, deadline=None)
def test_swapping_the_classes_swaps_the_class_ious_and_keeps_the_mean(case):
    targets, preds = case
    m = class_measures(pooled(Confusion.of(p, t) for p, t in zip(preds, targets, strict=True)))
    s = class_measures(pooled(Confusion.of(1 - p, 1 - t) for p, t in zip(preds, targets, strict=True)))
    assert s["fg_iou"] == m["bg_iou"] and s["bg_iou"] == m["fg_iou"]
    assert s["miou"] == pytest.approx(m["miou"]) and s["error"] == pytest.approx(m["error"])


@given(audit_case())
@settings(max_examples=100, deadline=None)
def test_identical_predictions_are_undecided_never_a_pass(case):
    targets, preds = case
    counts = [Confusion.of(p, t) for p, t in zip(preds, targets, strict=True)]
    verdict = compare(counts, list(counts), TOL)
    assert verdict.decision == "undecided" and verdict.informative == []


@given(audit_case(), st.integers(0, 2**32 - 1), st.floats(0.0, 1.0))
@settings(max_examples=150, deadline=None)
def test_a_version_that_only_fixes_errors_is_never_held_back_and_one_that_only_adds_errors_never_promoted(
    case, seed, share
):
    targets, live_preds = case
    rng = np.random.default_rng(seed)
    fixed = []
    for p, t in zip(live_preds, targets, strict=True):
        wrong = p != t
        pick = wrong & (rng.random(t.shape) < share)
        fixed.append(np.where(pick, t, p))
    live = [Confusion.of(p, t) for p, t in zip(live_preds, targets, strict=True)]
    better = [Confusion.of(p, t) for p, t in zip(fixed, targets, strict=True)]
    verdict = compare(better, live, TOL)
    assert verdict.decision != "hold"
    if any(b != a for a, b in zip(live, better, strict=True)):
        assert verdict.decision == "promote"
        assert compare(live, better, 0.0).decision == "hold"  # the reverse is worse on some measure, with no slack
    else:
        assert verdict.decision == "undecided"


@given(audit_case(), st.permutations(range(4)))
@settings(max_examples=60, deadline=None)
def test_the_verdict_does_not_depend_on_the_order_of_the_tiles(case, order):
    targets, preds = case
    other = [1 - p for p in preds]
    new = [Confusion.of(p, t) for p, t in zip(preds, targets, strict=True)]
    live = [Confusion.of(p, t) for p, t in zip(other, targets, strict=True)]
    idx = [i for i in order if i < len(new)]
    a, b = compare(new, live, TOL), compare([new[i] for i in idx], [live[i] for i in idx], TOL)
    assert (a.decision, a.new, a.live, a.worse_on) == (b.decision, b.new, b.live, b.worse_on)


def test_unknown_pixels_of_a_sparse_annotation_count_for_nothing():
    target = np.array([[1, 0, IGNORE], [IGNORE, IGNORE, 0]])
    c = Confusion.of(np.ones((2, 3), dtype=np.int64), target)
    assert (c.tp, c.fp, c.fn, c.tn, c.pixels) == (1, 2, 0, 0, 3)
    blank = Confusion.of(np.ones((2, 2), dtype=np.int64), np.full((2, 2), IGNORE))
    assert blank == Confusion() and compare([blank], [Confusion.of(np.zeros((2, 2)), np.full((2, 2), IGNORE))],
                                           TOL).decision == "undecided"  # fmt: skip


def _tile(fg_pred: float, fg_true: float = 0.0, side: int = 64) -> Confusion:
    """Counts of a side x side tile whose first ``fg_pred`` rows-share is predicted and ``fg_true`` annotated."""
    pred, target = np.zeros((side, side), np.int64), np.zeros((side, side), np.int64)
    pred[: int(round(fg_pred * side))] = 1
    target[: int(round(fg_true * side))] = 1
    return Confusion.of(pred, target)


@pytest.mark.parametrize(
    ("live_fg", "new_fg", "truth_fg", "decision", "worse_on"),
    [
        # the finding: five tiles re-annotated empty; live paints the true mitochondria (6%), the poisoned version
        # paints nearly everything: foreground IoU is 0 for both, the background tells them apart
        (0.06, 0.94, 0.0, "hold", ["bg_iou"]),
        (0.06, 0.0, 0.0, "promote", []),  # the annotation says empty and the new version agrees: it is better there
        (0.0, 0.0, 0.0, "undecided", []),  # empty annotations, both predict nothing: no evidence at all
        (0.5, 0.5, 0.5, "undecided", []),
        (0.25, 0.75, 0.25, "hold", ["fg_iou", "bg_iou"]),  # honest foreground: caught as before
        (0.75, 0.25, 0.25, "promote", []),
    ],
)
def test_gate_rule_on_known_counts(live_fg, new_fg, truth_fg, decision, worse_on):
    live = [_tile(live_fg, truth_fg) for _ in range(5)]
    new = [_tile(new_fg, truth_fg) for _ in range(5)]
    verdict = compare(new, live, TOL)
    assert verdict.decision == decision and verdict.worse_on == worse_on
    if truth_fg == 0.0 and decision != "undecided":
        assert verdict.new["fg_iou"] is None  # no annotated foreground: foreground IoU is not a measure here


def test_only_the_tiles_that_tell_the_versions_apart_are_pooled():
    """Twenty empty tiles both versions leave empty would dilute the background IoU of the one tile that differs
    (0.59 vs 0.97 over it; 0.981 vs 0.998 pooled over all 21) below the tolerance."""
    same = [_tile(0.0) for _ in range(20)]
    live, new = [*same, _tile(0.03)], [*same, _tile(0.4)]
    verdict = compare(new, live, TOL)
    assert verdict.informative == [20] and verdict.decision == "hold" and verdict.worse_on == ["bg_iou"]
    diluted = class_measures(pooled(live))["bg_iou"] - class_measures(pooled(new))["bg_iou"]
    assert diluted < TOL < verdict.live["bg_iou"] - verdict.new["bg_iou"]


# ------------------------------------------------------------------------------- real models, real registry


@pytest.fixture
def gate_env(tmp_path):
    """Settings for tiny fast models, a project registry, generated EM-like tiles: 10 to train on, 5 to audit."""
    from ml_backend.store.registry import ModelRegistry

    raw, gt = generate_em_like(15, size=48, seed=4)
    images = [r.astype(np.float32) / 255.0 for r in raw]
    masks = [m.astype(np.int64) for m in gt]
    cfg = Settings.from_env(model_dir=tmp_path, model_width=4, model_depth=2, train_crop=32, device="cpu",
                            tile_size=64, tile_overlap=8, val_fraction=0.0, bn_calibration_tiles=0)  # fmt: skip
    return cfg, ModelRegistry(tmp_path, 16), images, masks


def _round(registry, cfg, images, masks, audit_tiles, *, steps: int, seed: int):
    """One product round (``product_plan``: fine-tunes the live version) gated by ``AuditGate`` into the registry."""
    from ml_backend.active_learning.plan import product_plan
    from ml_backend.active_learning.publisher import RegistryPublisher
    from ml_backend.labelstudio.labelconfig import parse_label_config

    config = parse_label_config(XML)
    plan = product_plan(registry, config, cfg, None, train_overrides={"steps": steps, "seed": seed, "lr": 3e-3},
                        score=False)  # fmt: skip
    tiles = [LabelledTile(100 + i, None, im, m) for i, (im, m) in enumerate(zip(images, masks, strict=True))]

    class Source:
        def labelled(self) -> LabelledSet:
            return LabelledSet(tiles)

        def unlabelled(self) -> list[int]:
            return []

    def live():
        cur = registry.load_current()
        return None if cur is None else (cur[0], cur[1]["version"])

    publisher = RegistryPublisher(registry, config, cfg)
    gate = AuditGate(audit_tiles, live, cfg, min_tiles=4, tolerance=TOL)
    outcome = run_round(plan, Source(), publisher=publisher, evaluate=gate)
    return outcome, publisher.meta


def _audit(images, masks, idx) -> list[LabelledTile]:
    return [LabelledTile(900 + i, None, images[i], masks[i]) for i in idx]


AUDIT = range(10, 15)


def test_a_poisoned_version_is_held_back_when_the_audit_tiles_were_re_annotated_as_empty(gate_env):
    """(a) the finding: audit tiles re-annotated as empty and inverted training masks."""
    cfg, registry, images, masks = gate_env
    emptied = _audit(images, [np.zeros_like(m) for m in masks], AUDIT)
    first, _ = _round(registry, cfg, images[:10], masks[:10], emptied, steps=200, seed=0)
    assert registry.current_version() == first.version
    poisoned = [1 - m for m in masks[:10]]
    second, meta = _round(registry, cfg, images[:10], poisoned, emptied, steps=200, seed=1)
    truth = _audit(images, masks, AUDIT)
    live_true = audit_metrics(first.trained.model, truth, cfg)["iou"]
    new_true = audit_metrics(second.trained.model, truth, cfg)["iou"]
    assert new_true < live_true - 0.3, (new_true, live_true)  # the scenario: the candidate really is poisoned
    audit = meta["audit"]
    assert audit["iou"] == audit["live_iou"] == 0.0  # what the old gate compared (0.000 with 0.000)
    assert not second.evaluation.promote and registry.current_version() == first.version
    assert audit["decision"] == "hold" and audit["worse_on"] == ["bg_iou"] and audit["empty_tiles"] == 5
    assert audit["gate_measures"]["fg_iou"] == {"new": None, "live": None}
    reason = meta["promotion"]["reason"]
    assert reason.startswith("not promoted") and "background IoU" in reason and first.version in reason
    assert audit["bg_iou"] < audit["live_bg_iou"] - TOL and audit["miou"] < audit["live_miou"]


def test_inverted_masks_are_held_back_on_honest_audit_tiles(gate_env):
    """(b) inverted training masks, honest audit tiles: caught on foreground and background alike."""
    cfg, registry, images, masks = gate_env
    honest = _audit(images, masks, AUDIT)
    first, _ = _round(registry, cfg, images[:10], masks[:10], honest, steps=200, seed=0)
    second, meta = _round(registry, cfg, images[:10], [1 - m for m in masks[:10]], honest, steps=200, seed=1)
    assert not second.evaluation.promote and registry.current_version() == first.version
    audit = meta["audit"]
    assert audit["decision"] == "hold" and "fg_iou" in audit["worse_on"] and audit["informative_tiles"] == 5
    assert audit["iou"] < audit["live_iou"] - TOL and "foreground IoU" in meta["promotion"]["reason"]


def test_a_better_version_on_honest_audit_tiles_is_promoted(gate_env):
    """(c) an honest round that trains a weak live version further is promoted, and the evidence says why."""
    cfg, registry, images, masks = gate_env
    honest = _audit(images, masks, AUDIT)
    first, _ = _round(registry, cfg, images[:10], masks[:10], honest, steps=10, seed=0)
    second, meta = _round(registry, cfg, images[:10], masks[:10], honest, steps=250, seed=1)
    audit = meta["audit"]
    assert audit["iou"] > audit["live_iou"] + TOL, audit  # the scenario: the new version really is better
    assert second.evaluation.promote and registry.current_version() == second.version
    assert audit["decision"] == "promote" and audit["worse_on"] == [] and audit["informative_tiles"] == 5
    assert meta["promotion"]["reason"].startswith("promoted: on the 5 of 5 audit tiles")


def test_empty_audit_tiles_both_versions_leave_empty_are_undecided_and_held_back(gate_env):
    """(d) every audit tile annotated empty, and both versions (trained on empty masks) predict nothing there: no
    tile can tell them apart, which is no pass; the status page says "undecided"."""
    from ml_backend.server.status_page import collect_project_status, render_status_page

    cfg, registry, images, masks = gate_env
    blank = [np.zeros_like(m) for m in masks]
    emptied = _audit(images, blank, AUDIT)
    first, _ = _round(registry, cfg, images[:10], blank[:10], emptied, steps=60, seed=0)
    second, meta = _round(registry, cfg, images[:10], blank[:10], emptied, steps=60, seed=1)
    audit = meta["audit"]
    assert audit["error"] == audit["live_error"] == 0.0  # the scenario: neither predicts a foreground pixel
    assert audit["decision"] == "undecided" and audit["informative_tiles"] == 0
    assert not second.evaluation.promote and registry.current_version() == first.version
    reason = meta["promotion"]["reason"]
    assert reason.startswith("undecided, held back: none of the 5 audit tiles") and "5 annotated without" in reason
    project = collect_project_status(registry)
    assert project["promotion"]["decision"] == "undecided"
    page = render_status_page({"projects": [project]})
    assert "undecided" in page and second.version in page
