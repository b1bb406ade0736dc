"""Training's real decoding path (annotations.decode_annotations, as the job calls it with the project's parsed
config) on annotations holding the uncertainty layer and the suggestion rectangle (issue 12, Bad input): they train
exactly as the mask alone; with the sparse config the submitted rectangle makes everything outside it unknown."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ml_backend.labelstudio.annotations import decode_annotations
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.overlays import PixelRect, parse_overlay_config, suggestion_results, uncertainty_results
from ml_backend.labelstudio.rle import mask_to_results
from ml_backend.training import IGNORE

CONFIGS = Path(__file__).resolve().parents[2] / "label_config"
H, W = 40, 56


def _decode(xml: str, result: list) -> np.ndarray:
    config = parse_label_config(xml)  # what jobs.project_label_config hands to decode_annotations
    tasks = {1: {"id": 1, "data": {"image": "x.png"}}}
    tiles, skipped = decode_annotations(
        tasks, {1: {"id": 10, "result": result}}, config, lambda t: np.zeros((H, W), np.float32)
    )
    assert skipped == [], skipped
    (tile,) = tiles
    return tile.mask


def _overlays(xml: str, box: PixelRect) -> list[dict]:
    cfg = parse_overlay_config(xml)
    u = np.zeros((H, W))
    u[5:30, 10:40] = 0.9
    return uncertainty_results(u, cfg) + suggestion_results(box, cfg, H, W)


def test_dense_annotation_with_overlays_trains_like_the_mask_alone():
    xml = (CONFIGS / "dense_uncertainty.xml").read_text()
    cm = np.zeros((H, W), np.int64)
    cm[8:20, 12:30] = 1
    labels = mask_to_results(cm, parse_label_config(xml))
    with_overlays = _decode(xml, labels + _overlays(xml, PixelRect(4, 4, 36, 28)))
    np.testing.assert_array_equal(with_overlays, _decode(xml, labels))
    np.testing.assert_array_equal(with_overlays, cm)  # the uncertainty layer never became foreground


def test_uncertainty_first_in_the_xml_is_still_not_the_mask():
    xml = (CONFIGS / "dense_uncertainty.xml").read_text()
    block = xml[xml.index("  <View style=") : xml.index("</View>\n  <Rectangle") + len("</View>\n")]
    reordered = xml.replace(block, "").replace("  <BrushLabels", block + "  <BrushLabels", 1)
    assert reordered.index('name="uncertainty"') < reordered.index('name="tag"')
    cm = np.zeros((H, W), np.int64)
    cm[2:10, 2:10] = 1
    labels = mask_to_results(cm, parse_label_config(reordered))
    np.testing.assert_array_equal(_decode(reordered, labels + _overlays(reordered, PixelRect(0, 0, 20, 20))), cm)


def test_sparse_rectangle_limits_the_labels_to_the_box():
    xml = (CONFIGS / "sparse_uncertainty.xml").read_text()
    config = parse_label_config(xml)
    cm = np.full((H, W), IGNORE, np.int64)
    cm[10:20, 10:20] = 1  # a mitochondrion inside the box
    cm[30:35, 45:50] = 1  # a stroke outside the box: ignored
    cm[0:3, 0:3] = 0  # painted background outside the box: ignored too
    painted = mask_to_results(np.where(cm == IGNORE, 0, cm), config)
    background = np.zeros((H, W), np.int64)
    background[0:3, 0:3] = 1
    bg_result = mask_to_results(background, config)
    bg_result[0]["value"]["brushlabels"] = ["Background"]
    box = PixelRect(5, 5, 30, 25)
    mask = _decode(xml, painted + bg_result + _overlays(xml, box))
    inside = np.zeros((H, W), bool)
    inside[box.slices] = True
    assert (mask[~inside] == IGNORE).all()  # outside the rectangle: unknown to the loss
    expected_inside = np.zeros((H, W), np.int64)
    expected_inside[10:20, 10:20] = 1
    np.testing.assert_array_equal(mask[inside], expected_inside[inside])  # unpainted inside = background
    # without the rectangle the same strokes are a plain sparse annotation: unpainted stays unknown
    plain = _decode(xml, painted + bg_result)
    assert plain[31, 46] == 1 and plain[1, 1] == 0 and plain[25, 5] == IGNORE
