"""Display-only overlays (ml_backend.labelstudio.overlays): uncertainty layer, suggestion rectangle, validation, and
annotations with the overlays training exactly as without them."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from ml_backend.labelstudio.labelconfig import LabelConfigError, parse_label_config
from ml_backend.labelstudio.overlays import (
    OverlayError,
    PixelRect,
    annotation_training_mask,
    normalised_entropy,
    parse_overlay_config,
    strip_non_label_results,
    suggestion_rect_from_results,
    suggestion_results,
    uncertainty_results,
    validate_result,
    validate_results,
)
from ml_backend.labelstudio.rle import decode_region, mask_to_results, results_to_mask
from ml_backend.training import IGNORE

CONFIGS = Path(__file__).resolve().parents[2] / "label_config"
DENSE = (CONFIGS / "dense_uncertainty.xml").read_text()
SPARSE = (CONFIGS / "sparse_uncertainty.xml").read_text()
H, W = 48, 64

TWO_LEVELS = """<View>
  <Image name="img" value="$picture"/>
  <BrushLabels name="mask" toName="img"><Label value="Mitochondria"/></BrushLabels>
  <BrushLabels name="uncertainty" toName="img"><Label value="Uncertain"/><Label value="Very uncertain"/></BrushLabels>
</View>"""


def _classmap() -> np.ndarray:
    cm = np.zeros((H, W), np.int64)
    cm[5:20, 10:30] = 1
    return cm


def _uncertainty() -> np.ndarray:
    u = np.zeros((H, W))
    u[10:30, 20:40] = 0.6
    u[15:20, 25:30] = 0.9
    return u


@pytest.mark.parametrize(
    ("name", "labels", "mode"),
    [
        ("dense_uncertainty.xml", ("Mitochondria",), "dense"),
        ("sparse_uncertainty.xml", ("Mitochondria", "Background"), "sparse"),
        ("multiclass.xml", ("Mitochondria", "Nuclei"), "dense"),
        ("dense_25d.xml", ("Mitochondria",), "dense"),
    ],
)
def test_shipped_configs_train_on_the_mask_control_only(name, labels, mode):
    xml = (CONFIGS / name).read_text()
    brush = parse_label_config(xml)  # what training uses
    assert (brush.from_name, brush.to_name, brush.image_key, brush.labels, brush.mode) == (
        "tag",
        "image",
        "image",
        labels,
        mode,
    )
    cfg = parse_overlay_config(xml)
    assert cfg.display_only == {"uncertainty", "suggestion"}
    assert cfg.uncertainty.labels == ("Uncertain",) and cfg.suggestion.labels == ("Suggested region",)


def test_multiclass_label_order_matches_the_generated_volumes():
    brush = parse_label_config((CONFIGS / "multiclass.xml").read_text())
    assert brush.num_classes == 3 and brush.class_of("Mitochondria") == 1 and brush.class_of("Nuclei") == 2


def test_25d_config_has_the_neighbour_images_but_paints_the_centre():
    from label_studio_sdk.label_interface import LabelInterface

    xml = (CONFIGS / "dense_25d.xml").read_text()
    values = {str(o.name): str(o.value) for o in LabelInterface(xml).objects}
    assert values == {"image_prev": "$image_prev", "image": "$image", "image_next": "$image_next"}
    assert all(c.to_name == ["image"] for c in LabelInterface(xml).controls)


def test_uncertainty_control_before_the_mask_is_never_the_mask():
    """Issue 12 wiring (3): the order of the XML is irrelevant; the display-only layer is never the mask control."""
    first = """<View><Image name="image" value="$image"/>
      <BrushLabels name="uncertainty" toName="image"><Label value="Uncertain"/></BrushLabels>
      <BrushLabels name="tag" toName="image"><Label value="Mitochondria"/></BrushLabels></View>"""
    cfg = parse_overlay_config(first)
    assert cfg.mask.from_name == "tag" and cfg.mask.labels == ("Mitochondria",)
    assert cfg.uncertainty is not None and cfg.uncertainty.name == "uncertainty"
    only = """<View><Image name="image" value="$image"/>
      <BrushLabels name="uncertainty" toName="image"><Label value="Uncertain"/></BrushLabels></View>"""
    with pytest.raises(LabelConfigError, match="display-only"):
        parse_overlay_config(only)


def test_uncertainty_layer_is_the_thresholded_map():
    cfg = parse_overlay_config(DENSE)
    u = _uncertainty()
    (item,) = uncertainty_results(u, cfg, thresholds=(0.5,))
    assert (item["from_name"], item["to_name"], item["type"]) == ("uncertainty", "image", "brushlabels")
    assert item["value"]["brushlabels"] == ["Uncertain"] and item["readonly"] is True
    assert (decode_region(item["value"]["rle"], H, W) == (u >= 0.5)).all()
    assert uncertainty_results(u, cfg, thresholds=(0.95,)) == []  # nothing that uncertain
    assert uncertainty_results(u, cfg, thresholds=(0.5,), min_pixels=10_000) == []


def test_several_uncertainty_levels_are_disjoint_bands():
    u = _uncertainty()
    low, high = uncertainty_results(u, TWO_LEVELS, thresholds=(0.5, 0.8))
    assert low["value"]["brushlabels"] == ["Uncertain"] and high["value"]["brushlabels"] == ["Very uncertain"]
    assert (decode_region(low["value"]["rle"], H, W) == ((u >= 0.5) & (u < 0.8))).all()
    assert (decode_region(high["value"]["rle"], H, W) == (u >= 0.8)).all()
    assert low["to_name"] == "img"
    with pytest.raises(OverlayError, match="only 1 label"):
        uncertainty_results(u, DENSE, thresholds=(0.5, 0.8))


@pytest.mark.parametrize(
    ("u", "thresholds"),
    [
        (np.full((H, W), np.nan), (0.5,)),
        (np.zeros((2, H, W)), (0.5,)),
        (np.zeros((H, W)), ()),
        (np.zeros((H, W)), (0.0,)),
        (np.zeros((H, W)), (0.8, 0.5)),
        (np.zeros((H, W)), (1.5,)),
    ],
)
def test_bad_uncertainty_input_is_refused(u, thresholds):
    with pytest.raises(OverlayError):
        uncertainty_results(u, TWO_LEVELS, thresholds=thresholds)


def test_configs_without_overlay_controls_get_no_overlay():
    dense = (CONFIGS / "dense.xml").read_text()
    assert uncertainty_results(_uncertainty(), dense) == []
    assert suggestion_results(PixelRect(0, 0, 10, 10), dense, H, W) == []


def test_suggestion_rectangle_in_percent_and_back_to_the_same_pixels():
    cfg = parse_overlay_config(DENSE)
    rect = PixelRect(x0=7, y0=3, x1=41, y1=29)
    (item,) = suggestion_results(rect, cfg, H, W, score=0.25)
    v = item["value"]
    assert (item["from_name"], item["type"], v["rectanglelabels"]) == (
        "suggestion",
        "rectanglelabels",
        ["Suggested region"],
    )
    assert v["x"] == pytest.approx(100 * 7 / W) and v["width"] == pytest.approx(100 * 34 / W)
    assert v["y"] == pytest.approx(100 * 3 / H) and v["height"] == pytest.approx(100 * 26 / H)
    assert (item["original_width"], item["original_height"]) == (W, H)
    assert suggestion_rect_from_results([item], cfg, H, W) == rect
    full = suggestion_results(PixelRect(0, 0, W, H), cfg, H, W)
    assert suggestion_rect_from_results(full, cfg, H, W) == PixelRect(0, 0, W, H)
    for bad in (PixelRect(0, 0, W + 1, H), PixelRect(5, 5, 5, 9), PixelRect(-1, 0, 4, 4)):
        with pytest.raises(OverlayError):
            suggestion_results(bad, cfg, H, W)


def _valid_results() -> list[dict]:
    cfg = parse_overlay_config(DENSE)
    return (
        mask_to_results(_classmap(), cfg.mask, score=0.8)
        + uncertainty_results(_uncertainty(), cfg)
        + suggestion_results(PixelRect(5, 5, 40, 30), cfg, H, W)
    )


def _break(index: int, path: tuple, value) -> dict:
    item = copy.deepcopy(_valid_results()[index])
    target = item
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return item


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (_break(1, ("value", "brushlabels"), ["Nope"]), "labels"),
        (_break(1, ("from_name",), "nope"), "not a control"),
        (_break(1, ("to_name",), "other"), "to_name"),
        (_break(1, ("type",), "rectanglelabels"), "does not match"),
        (_break(1, ("value", "rle"), [1, 2, 3]), "RLE"),
        (
            _break(
                0,
                ("value", "rle"),
                mask_to_results(np.ones((H, W + 1), int), parse_label_config(DENSE))[0]["value"]["rle"],
            ),
            "W\\*H\\*4",
        ),  # fmt: skip
        (_break(1, ("value", "rle"), [300]), "byte"),
        (_break(1, ("value", "format"), "polygon"), "format"),
        (_break(1, ("original_width",), W + 1), "original size"),
        (_break(0, ("score",), float("nan")), "score"),
        (_break(2, ("value", "x"), 95.0), "inside the image"),
        (_break(2, ("value", "x"), -1.0), "inside the image"),
        (_break(2, ("value", "height"), 0.0), "inside the image"),
        (_break(2, ("value", "y"), float("inf")), "finite"),
        (_break(2, ("value", "y"), "10"), "finite"),
        (_break(2, ("value", "rotation"), 30), "rotated"),
        (_break(2, ("value", "rectanglelabels"), []), "labels"),
        ("not a dict", "object"),
    ],
)
def test_results_label_studio_would_reject_are_refused(item, reason):
    with pytest.raises(OverlayError, match=reason):
        validate_result(item, DENSE, H, W)
    with pytest.raises(OverlayError, match="result #1"):
        validate_results([_valid_results()[0], item], DENSE, H, W)


def test_valid_results_pass_our_and_the_sdk_validation():
    from label_studio_sdk.label_interface import LabelInterface

    results = _valid_results()
    assert validate_results(results, DENSE, H, W) == results
    assert LabelInterface(DENSE).validate_prediction({"result": results, "score": 0.5}, return_errors=True) == []


@pytest.mark.parametrize("xml", [DENSE, SPARSE])
def test_annotation_with_overlays_trains_exactly_as_without(xml):
    cfg = parse_overlay_config(xml)
    cm = _classmap()
    if cfg.mask.mode == "sparse":
        cm[30:40, 40:60] = 0  # some painted background
    labels = mask_to_results(cm, cfg.mask, include_background=True)
    overlays = uncertainty_results(_uncertainty(), cfg) + suggestion_results(PixelRect(5, 5, 40, 30), cfg, H, W)
    with_overlays = overlays[:1] + labels + overlays[1:]  # Label Studio keeps prediction regions on submit
    assert strip_non_label_results(with_overlays, cfg) == labels
    assert strip_non_label_results(with_overlays, xml) == labels
    assert strip_non_label_results(with_overlays, cfg.mask) == labels
    assert strip_non_label_results(None, cfg) == []
    plain = results_to_mask(labels, cfg.mask, H, W)
    np.testing.assert_array_equal(results_to_mask(with_overlays, cfg.mask, H, W), plain)
    np.testing.assert_array_equal(annotation_training_mask(labels, cfg, H, W), plain)
    if cfg.mask.mode == "dense":  # dense: the whole tile was labelled, the box changes nothing
        np.testing.assert_array_equal(annotation_training_mask(with_overlays, cfg, H, W), plain)


def test_sparse_annotation_inside_the_suggested_box():
    cfg = parse_overlay_config(SPARSE)
    cm = np.full((H, W), IGNORE, np.int64)
    cm[8:14, 10:20] = 1  # a mitochondrion traced inside the box, nothing else painted
    cm[40:44, 50:60] = 0  # background painted outside the box: ignored with the box
    labels = mask_to_results(cm, cfg.mask, include_background=True)
    box = suggestion_results(PixelRect(5, 5, 40, 30), cfg, H, W)
    out = annotation_training_mask(labels + box + uncertainty_results(_uncertainty(), cfg), cfg, H, W)
    inside = np.zeros((H, W), bool)
    inside[5:30, 5:40] = True
    assert (out[~inside] == IGNORE).all()
    assert (out[8:14, 10:20] == 1).all()
    assert (out[inside] == 0).sum() == inside.sum() - 60  # unpainted inside the box = background
    kept = annotation_training_mask(labels + box, cfg, H, W, unpainted_inside="keep")
    assert (kept[inside] == IGNORE).sum() == inside.sum() - 60
    # the annotator deleted the box: plain sparse semantics
    np.testing.assert_array_equal(annotation_training_mask(labels, cfg, H, W), results_to_mask(labels, cfg.mask, H, W))


def test_normalised_entropy_range():
    p1 = np.array([[0.5, 1.0], [0.0, 0.9]])
    e = normalised_entropy(np.stack([1 - p1, p1]))
    assert e[0, 0] == pytest.approx(1.0) and e[0, 1] == pytest.approx(0.0) and e[1, 0] == pytest.approx(0.0)
    assert 0 < e[1, 1] < 1
    three = normalised_entropy(np.full((3, 2, 2), 1 / 3))
    assert np.allclose(three, 1.0)
