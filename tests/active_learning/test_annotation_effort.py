"""The annotation-effort measure (issue 17.6): how much an annotator changed the served pre-annotation, the record
kept per project, and which prediction Label Studio served (``labelstudio.effort``, on real brush RLE)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ml_backend.active_learning.effort import edit_effort, effort_by_version, label_boundary
from ml_backend.labelstudio.effort import measure_annotations, served_prediction
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.rle import IGNORE, mask_to_results
from ml_backend.store.effort import EFFORT_FILE, EffortLog
from ml_backend.training.metrics import boundary_length

REPO = Path(__file__).resolve().parents[2]
LABEL_MAPS = arrays(np.int64, st.tuples(st.integers(1, 24), st.integers(1, 24)), elements=st.integers(-1, 2))


def disc(size: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.int64)


# ------------------------------------------------------------------------------------------------ the measure
@pytest.mark.parametrize(
    "mask",
    [
        disc(32, 15.5, 12, 7),  # dense: one mitochondrion
        np.zeros((16, 16), np.int64),  # dense: an empty tile
        np.where(disc(32, 10, 10, 5) > 0, 1, np.where(disc(32, 20, 20, 6) > 0, 0, IGNORE)),  # sparse strokes
        np.add(disc(32, 8, 8, 5), 2 * disc(32, 22, 22, 6)),  # two classes
    ],
    ids=["dense", "empty", "sparse", "multiclass"],
)
def test_identical_masks_cost_nothing(mask):
    effort = edit_effort(mask, mask.copy())
    assert effort.changed_pixels == 0 and effort.changed_fraction == 0.0 and effort.boundary_edited == 0.0
    assert effort.boundary_scratch == label_boundary(mask)
    assert effort.effort_saved == (None if effort.boundary_scratch == 0 else 1.0)


@settings(max_examples=150, deadline=None)
@given(LABEL_MAPS)
def test_identical_maps_cost_nothing_and_the_scratch_outline_is_the_annotations(labels):
    effort = edit_effort(labels, labels.copy())
    assert (effort.changed_pixels, effort.boundary_edited) == (0, 0.0)
    assert effort.pixels == labels.size and effort.boundary_scratch == label_boundary(labels)


@settings(max_examples=150, deadline=None)
@given(LABEL_MAPS, st.sampled_from([0, IGNORE]))
def test_an_empty_pre_annotation_costs_exactly_painting_from_scratch(labels, unpainted):
    """Empty = every pixel at the config's unpainted value (dense: background 0; sparse: IGNORE)."""
    served = np.full_like(labels, unpainted)
    effort = edit_effort(served, labels)
    assert effort.changed_pixels == int(np.count_nonzero(labels != unpainted))
    assert effort.boundary_edited == effort.boundary_scratch == label_boundary(labels)
    assert effort.effort_saved in (None, 0.0)


@settings(max_examples=100, deadline=None)
@given(LABEL_MAPS, LABEL_MAPS)
def test_edited_outline_never_exceeds_both_outlines(a, b):
    """Every edited edge is an outline edge of the served map or of the annotation (so at most their sum)."""
    b = np.resize(b, a.shape)
    effort = edit_effort(a, b)
    assert 0 <= effort.boundary_edited <= label_boundary(a) + label_boundary(b)
    if effort.changed_pixels == 0:  # (a whole tile repainted has no outline: the frame is free)
        assert effort.boundary_edited == 0


@settings(max_examples=100, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(1, 20), st.integers(1, 20)), elements=st.integers(0, 1)))
def test_two_label_outline_is_the_benchmarks_boundary_length(mask):
    assert label_boundary(mask) == boundary_length(mask)


@settings(max_examples=60, deadline=None)
@given(r=st.integers(2, 9), d=st.integers(1, 24))
def test_a_shifted_disc_has_known_bounds(r, d):
    """The annotator moves a served disc of radius r by d pixels to the right (inside a 64 x 64 tile)."""
    size, cy, cx = 64, 31, 12
    served, annotated = disc(size, cy, cx, r), disc(size, cy, cx + d, r)
    widths = served.sum(axis=1)
    widths = widths[widths > 0]  # one run of pixels per row (a disc is row-convex)
    rows, scratch = len(widths), boundary_length(annotated)
    effort = edit_effort(served, annotated)
    # each row loses min(d, w) pixels on the left and gains as many on the right
    assert effort.changed_pixels == 2 * int(np.minimum(widths, d).sum())
    assert effort.changed_fraction == pytest.approx(effort.changed_pixels / size**2)
    assert 3 * rows <= effort.boundary_edited <= 2 * scratch  # >= 3 edges per row (two runs that may touch)
    if d > 2 * r + 1:  # apart, not touching: both outlines, every pixel of both discs
        assert effort.changed_pixels == 2 * int(served.sum()) and effort.boundary_edited == 2 * scratch
        assert effort.effort_saved == pytest.approx(-1.0)
    assert effort.effort_saved is not None and effort.effort_saved <= 1.0 - 3 * rows / scratch


def test_maps_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="one size"):
        edit_effort(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(ValueError, match="2-D"):
        label_boundary(np.zeros((2, 8, 8)))


def test_effort_by_version_means_counts_and_order():
    rec = lambda v, cf, be, bs, **kw: {"model_version": v, "changed_fraction": cf, "boundary_edited": be,  # noqa: E731
                                       "boundary_scratch": bs, **kw}  # fmt: skip
    records = [
        rec("v0002-b", 0.1, 10.0, 40.0, created_at="2025-01-02T00:00:00Z"),
        rec("v0002-b", 0.3, 30.0, 40.0, created_at="2025-01-02T00:00:01Z"),
        rec("v0001-a", 0.5, 60.0, 60.0, created_at="2025-01-03T00:00:00Z"),
        rec("v0001-a", 1.0, 99.0, 99.0, audit=True),  # served without a mask on purpose: not in the means
        {"model_version": "v0001-a", "skipped": "AnnotationError: wrong size"},
        {"model_version": None, "skipped": "no prediction served: the task holds no prediction"},
        "not a record",
    ]
    rows = effort_by_version(records, order=["v0001-a", "v0002-b"])
    assert [r["version"] for r in rows] == ["v0001-a", "v0002-b", "(none)"]
    first, second, none = rows
    assert (first["tiles"], first["audit_tiles"], first["skipped"]) == (1, 1, 1)
    assert first["effort_saved"] == pytest.approx(0.0) and first["boundary_edited_mean"] == 60.0
    assert second["tiles"] == 2 and second["changed_fraction_mean"] == pytest.approx(0.2)
    assert second["boundary_edited_mean"] == pytest.approx(20.0) and second["effort_saved"] == pytest.approx(0.5)
    assert none["tiles"] == 0 and none["skipped"] == 1 and none["effort_saved"] is None
    # without a registry order: the order in which versions first served
    assert [r["version"] for r in effort_by_version(records[:3])] == ["v0002-b", "v0001-a"]


# ------------------------------------------------------------------------------------------------ the record
def _record(aid: int, updated: str = "2025-01-01T00:00:00Z", **kw) -> dict:
    return {"annotation": aid, "updated_at": updated, "task": aid * 10, "model_version": "v1", "changed_fraction":
            0.1, "boundary_edited": 4.0, "boundary_scratch": 8.0, **kw}  # fmt: skip


def test_the_record_is_idempotent_per_annotation_and_update(tmp_path):
    log = EffortLog(tmp_path, 7)
    assert log.read() == ([], 0) and log.measured_keys() == set()
    assert log.append([_record(1), _record(2), _record(1)]) == 2  # a duplicate in one batch is written once
    assert log.append([_record(1), _record(2)]) == 0  # measured already: nothing written
    assert log.append([_record(2, "2025-01-02T00:00:00Z", boundary_edited=1.0)]) == 1  # edited later: a new line
    assert len(log.read()[0]) == 3
    latest = {r["annotation"]: r for r in log.latest()}
    assert set(latest) == {1, 2} and latest[2]["boundary_edited"] == 1.0
    day1, day2 = "2025-01-01T00:00:00Z", "2025-01-02T00:00:00Z"
    assert log.measured_keys() == {("1", day1), ("2", day1), ("2", day2)}
    assert log.path == tmp_path / "projects" / "7" / EFFORT_FILE


def test_the_record_survives_corrupt_and_torn_lines(tmp_path):
    log = EffortLog(tmp_path, 3)
    log.append([_record(1)])
    with open(log.path, "ab") as fh:  # garbage, a JSON non-object, undecodable bytes, then a torn last line
        fh.write(b"{not json\n[1, 2]\n\xff\xfe\n" + json.dumps(_record(2)).encode()[:25])
    records, bad = log.read()
    assert [r["annotation"] for r in records] == [1] and bad == 4
    assert ("2", "2025-01-01T00:00:00Z") not in log.measured_keys()  # the torn annotation is measured again ...
    assert log.append([_record(2), _record(3)]) == 2  # ... and written on a line of its own
    assert [r["annotation"] for r in log.latest()] == [1, 2, 3]
    assert log.read()[1] == 4  # the damaged lines stay skipped, nothing else was lost


def test_a_bad_project_id_is_refused(tmp_path):
    with pytest.raises(ValueError, match="invalid project id"):
        EffortLog(tmp_path, "../etc")


# ------------------------------------------------------------------------------------------------ what was served
def _pred(pid: int, version: str, created: str, result: list | None = None) -> dict:
    return {"id": pid, "model_version": version, "created_at": created, "result": result or []}


def test_the_parent_prediction_is_the_served_one():
    task = {"id": 1, "predictions": [_pred(5, "v1", "2025-01-01T10:00:00Z"), _pred(9, "v2", "2025-01-01T11:00:00Z")]}
    ann = {"id": 3, "created_at": "2025-01-01T12:00:00.123456Z", "parent_prediction": 5}
    pred, how = served_prediction(task, ann)
    assert (pred["id"], how) == (5, "parent_prediction")


def test_without_a_parent_the_newest_prediction_before_the_annotation():
    task = {"id": 1, "predictions": [_pred(5, "v1", "2025-01-01T10:00:00Z"), _pred(9, "v2", "2025-01-01T11:00:00Z"),
                                     _pred(12, "v3", "2025-01-01T13:00:00Z")]}  # fmt: skip
    pred, how = served_prediction(task, {"id": 3, "created_at": "2025-01-01T12:00:00+00:00"})
    assert (pred["model_version"], how) == ("v2", "newest_before")
    # a parent that is gone (Label Studio nulls the link on delete; a stale id is treated alike)
    pred, how = served_prediction(task, {"id": 3, "created_at": "2025-01-01T12:00:00Z", "parent_prediction": 77})
    assert pred["id"] == 9


@pytest.mark.parametrize(
    ("predictions", "ann", "reason"),
    [
        ([], {"created_at": "2025-01-01T12:00:00Z"}, "task holds no prediction"),
        ([_pred(5, "v1", "2025-01-02T00:00:00Z")], {"created_at": "2025-01-01T12:00:00Z"}, "created after"),
        ([_pred(5, "v1", "2025-01-02T00:00:00Z")], {"created_at": "2025-01-01T12:00:00Z", "parent_prediction": 4},
         "parent prediction 4 is no longer"),
        ([_pred(5, "v1", "2025-01-01T00:00:00Z")], {"created_at": None}, "no readable created_at"),
    ],
)  # fmt: skip
def test_no_served_prediction_says_why(predictions, ann, reason):
    pred, why = served_prediction({"id": 1, "predictions": predictions}, {"id": 2, **ann})
    assert pred is None and why.startswith("no prediction served") and reason in why


# ------------------------------------------------------------------------------------------------ on real RLE
def test_measure_annotations_on_brush_rle():
    """Real brush RLE (label-studio-sdk's codec) and the uncertainty/suggestion overlays a prediction carries."""
    from ml_backend.config import Settings
    from ml_backend.labelstudio.overlays import parse_overlay_config, prediction_results

    xml = (REPO / "label_config" / "dense_uncertainty.xml").read_text()
    config = parse_label_config(xml)
    overlay = parse_overlay_config(xml)
    served_mask = disc(32, 15, 12, 6)
    probs = np.stack([1.0 - served_mask * 0.9, served_mask * 0.9]).astype(np.float32)
    served_results = prediction_results(probs, overlay, Settings(suggest_min_tile=16, suggest_window=16))
    assert any(r["from_name"] != config.from_name for r in served_results)  # the overlay regions are there
    moved = disc(32, 15, 16, 6)
    t0, t1 = "2025-01-01T10:00:00Z", "2025-01-01T11:00:00Z"
    region = mask_to_results(moved, config)[0]
    nucleus = {**region, "value": {**region["value"], "brushlabels": ["Nucleus"]}}
    tasks = {tid: {"id": tid, "predictions": [_pred(100 + tid, "v0003-x", t0, served_results)]} for tid in range(1, 8)}
    annotations = {
        1: {"id": 11, "created_at": t1, "parent_prediction": 101, "result": served_results},  # accepted as served
        2: {"id": 12, "created_at": t1, "result": mask_to_results(moved, config)},  # moved 4 px, no parent link
        3: {"id": 13, "created_at": t1, "result": mask_to_results(disc(16, 8, 8, 4), config)},  # another size
        4: {"id": 14, "created_at": t1, "result": [nucleus]},  # a label the config lacks
        5: {"id": 15, "created_at": t1, "result": []},  # "no mitochondria here": erased the served one
        6: {"id": 16, "created_at": "2025-01-01T09:00:00Z", "result": []},  # before any prediction
        7: {"id": 17, "created_at": t1, "result": served_results},  # measured by an earlier job
    }
    records = measure_annotations(
        tasks, annotations, config, sizes={tid: (32, 32) for tid in range(1, 8)}, audit={5},
        measured={("17", t1)},
    )  # fmt: skip
    by = {r["annotation"]: r for r in records}
    assert sorted(by) == [11, 12, 13, 14, 15, 16]
    assert by[11]["served_by"] == "parent_prediction" and by[11]["prediction"] == 101
    assert (by[11]["changed_pixels"], by[11]["boundary_edited"], by[11]["effort_saved"]) == (0, 0.0, 1.0)
    expected = edit_effort(served_mask, moved)
    assert by[12]["served_by"] == "newest_before" and by[12]["model_version"] == "v0003-x"
    assert by[12]["changed_pixels"] == expected.changed_pixels > 0
    assert by[12]["boundary_edited"] == expected.boundary_edited and by[12]["pixels"] == 32 * 32
    assert by[13]["skipped"].startswith(
        "AnnotationError: annotation: result #0 was drawn on a 16x16 image but the task"
    )
    assert "annotation: " in by[14]["skipped"] and "Nucleus" in by[14]["skipped"]
    assert by[14]["model_version"] == "v0003-x"
    assert by[15]["audit"] is True and by[15]["changed_pixels"] == int(served_mask.sum())
    assert by[15]["boundary_scratch"] == 0.0 and by[15]["effort_saved"] is None
    assert by[16]["skipped"].startswith("no prediction served") and by[16]["model_version"] is None
    assert all(r["audit"] is False for r in records if r["annotation"] != 15)
    json.dumps(records, allow_nan=False)  # what the record stores


def test_without_the_image_size_the_regions_give_it():
    config = parse_label_config((REPO / "label_config" / "dense.xml").read_text())
    served = mask_to_results(disc(24, 10, 10, 4), config)
    task = {"id": 1, "predictions": [_pred(7, "v1", "2025-01-01T10:00:00Z", served)]}
    ann = {"id": 2, "created_at": "2025-01-01T11:00:00Z", "result": mask_to_results(disc(24, 10, 12, 4), config)}
    (rec,) = measure_annotations({1: task}, {1: ann}, config)
    assert rec["pixels"] == 24 * 24 and rec["changed_pixels"] > 0
    both_empty = {"id": 3, "created_at": "2025-01-01T11:00:00Z", "result": []}
    task_empty = {"id": 1, "predictions": [_pred(7, "v1", "2025-01-01T10:00:00Z", [])]}
    (rec,) = measure_annotations({1: task_empty}, {1: both_empty}, config)
    assert "image size is unknown" in rec["skipped"]


# ------------------------------------------------------------------------------------------------ the status page
def test_status_page_shows_effort_per_serving_version(tmp_path):
    from ml_backend.server.status_page import collect_project_status, render_status_page
    from ml_backend.store.registry import ModelRegistry

    EffortLog(tmp_path, 5).append(
        [
            _record(1, model_version="v0001-a", changed_fraction=0.2, boundary_edited=40.0, boundary_scratch=50.0),
            _record(2, model_version="v0002-<b>", changed_fraction=0.1, boundary_edited=10.0, boundary_scratch=40.0),
            _record(3, model_version="v0002-<b>", changed_fraction=0.3, boundary_edited=30.0, boundary_scratch=40.0),
            {"annotation": 4, "updated_at": "x", "model_version": None, "skipped": "no prediction served: none"},
        ]
    )
    with open(EffortLog(tmp_path, 5).path, "ab") as fh:
        fh.write(b"garbage\n")
    project = collect_project_status(ModelRegistry(tmp_path, 5))
    rows = {r["version"]: r for r in project["effort"]}
    assert rows["v0002-<b>"]["tiles"] == 2 and rows["v0002-<b>"]["effort_saved"] == pytest.approx(0.5)
    assert rows["v0001-a"]["changed_fraction_mean"] == pytest.approx(0.2) and rows["(none)"]["skipped"] == 1
    json.dumps(project["effort"], allow_nan=False)  # the JSON view
    page = render_status_page({"projects": [project]})
    assert '<svg xmlns="http://www.w3.org/2000/svg" class="effort-curve"' in page
    assert page.count('class="pt-changed"') == 2 and page.count('class="pt-edited"') == 2
    assert "v0002-&lt;b&gt;" in page and "v0002-<b>" not in page  # version ids are escaped
    assert "50%" in page and "Annotation effort" in page


def test_status_page_without_effort_says_so(tmp_path):
    from ml_backend.server.status_page import collect_project_status, effort_curve_svg, render_status_page
    from ml_backend.store.registry import ModelRegistry

    project = collect_project_status(ModelRegistry(tmp_path, 6))
    assert project["effort"] == [] and project["problems"] == []
    assert "No submitted annotation measured" in render_status_page({"projects": [project]})
    assert "no annotation measured" in effort_curve_svg([])


def test_without_the_image_size_regions_of_two_sizes_are_not_compared():
    config = parse_label_config((REPO / "label_config" / "dense.xml").read_text())
    task = {
        "id": 1,
        "predictions": [_pred(7, "v1", "2025-01-01T10:00:00Z", mask_to_results(disc(24, 9, 9, 4), config))],
    }
    ann = {"id": 2, "created_at": "2025-01-01T11:00:00Z", "result": mask_to_results(disc(16, 8, 8, 4), config)}
    (rec,) = measure_annotations({1: task}, {1: ann}, config)
    assert rec["skipped"] == (
        "ValueError: the annotation was drawn on a 16x16 image, the served prediction on 24x24: not comparable"
    )
    (rec,) = measure_annotations({1: task}, {1: ann}, config, sizes={1: (24, 24)})  # the image says who is wrong
    assert rec["skipped"].startswith("AnnotationError: annotation: result #0 was drawn on a 16x16 image")


# ------------------------------------------------------------------------------------------------ the benchmark
def test_the_benchmark_reports_the_same_effort_per_round(tmp_path):
    """A tiny real benchmark run: each round's record holds the oracle's masks of the tiles its model picked against
    that model's predictions (``run.served_effort``), and curves.csv / summary.md report them per round."""
    import csv

    import ml_backend.benchmarks as bench

    out = tmp_path / "bench"
    args = [
        "--quick", "--synthetic", "--synthetic-n", "3", "--synthetic-size", "128", "--downsample", "1", "--tile", "32",
        "--pool-size", "16", "--m", "4", "--k", "3", "--rounds", "2", "--width", "4", "--depth", "2",
        "--init-steps", "3", "--steps", "2", "--full-steps", "2", "--batch-size", "2", "--infer-tile", "64",
        "--infer-overlap", "8", "--test-every", "2", "--strategies", "random", "--seeds", "0", "--workers", "1",
        "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    assert bench.main(args) == 0
    run = json.loads((out / "runs" / "random__seed0.json").read_text())
    rounds = run["rounds"]
    for r in rounds[:-1]:  # every round but the last picked k tiles its model pre-annotates
        assert r["effort_tiles"] == 3 and 0.0 <= r["effort_changed_fraction"] <= 1.0
        assert r["effort_boundary_edited"] >= 0 and r["effort_boundary_scratch"] >= 0
        if r["effort_boundary_scratch"] > 0:
            assert r["effort_saved"] == pytest.approx(1 - r["effort_boundary_edited"] / r["effort_boundary_scratch"])
    assert "effort_tiles" not in rounds[-1]
    # the tiles of round r + 1 are the ones round r's model picked: their oracle outline is the scratch figure
    order = run["labelled_order"]
    assert rounds[0]["effort_boundary_scratch"] * 3 == pytest.approx(rounds[1]["boundary"] - rounds[0]["boundary"])
    assert len(order) == 4 + 3 * 2
    with open(out / "curves.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["strategy"] == "random"]
    assert [r["effort_tiles"] for r in rows] == ["3.0", "3.0", ""]
    assert float(rows[0]["effort_boundary_edited"]) == pytest.approx(rounds[0]["effort_boundary_edited"])
    assert "Pre-annotation effort per round" in (out / "summary.md").read_text()
