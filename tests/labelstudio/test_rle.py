"""Brush RLE: masks survive a round trip through label-studio-sdk's decoder; bad annotations raise AnnotationError."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.rle import IGNORE, AnnotationError, mask_to_results, results_to_mask

DENSE = parse_label_config(
    "<View><Image name='img' value='$image'/><BrushLabels name='brush' toName='img'>"
    "<Label value='Mitochondria'/></BrushLabels></View>"
)
SPARSE = parse_label_config(
    "<View><Image name='img' value='$image'/><BrushLabels name='brush' toName='img'>"
    "<Label value='Mitochondria'/><Label value='Background'/></BrushLabels></View>"
)
MULTI = parse_label_config(
    "<View><Image name='img' value='$image'/><BrushLabels name='brush' toName='img'>"
    "<Label value='Mito'/><Label value='ER'/></BrushLabels></View>"
)


def _region(mask: np.ndarray, label: str, *, from_name: str = "brush", w=None, h=None) -> dict:
    height, width = mask.shape
    return {
        "from_name": from_name,
        "to_name": "img",
        "type": "brushlabels",
        "original_width": width if w is None else w,
        "original_height": height if h is None else h,
        "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]},
    }


def test_results_decode_with_the_sdk_decoder_to_the_same_mask():
    rng = np.random.default_rng(0)
    classmap = (rng.random((37, 53)) > 0.7).astype(np.int64)  # non-square, odd sizes catch H/W swaps
    results = mask_to_results(classmap, DENSE, score=0.9)
    assert len(results) == 1
    r = results[0]
    assert (r["from_name"], r["to_name"], r["type"]) == ("brush", "img", "brushlabels")
    assert (r["original_width"], r["original_height"]) == (53, 37)
    assert r["value"]["brushlabels"] == ["Mitochondria"] and r["value"]["format"] == "rle"
    assert r["score"] == 0.9
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in r["value"]["rle"])
    alpha = decode_rle(r["value"]["rle"]).reshape(37, 53, 4)[:, :, 3]  # as the facts note documents
    np.testing.assert_array_equal(alpha > 0, classmap == 1)
    np.testing.assert_array_equal(results_to_mask(results, DENSE, 37, 53), classmap)


def test_empty_foreground_gives_no_result():
    assert mask_to_results(np.zeros((8, 8), dtype=np.int64), DENSE) == []


def test_one_result_per_class_with_label_names_from_the_config():
    classmap = np.zeros((16, 16), dtype=np.int64)
    classmap[:4] = 1
    classmap[8:] = 2
    results = mask_to_results(classmap, MULTI)
    assert [r["value"]["brushlabels"] for r in results] == [["Mito"], ["ER"]]
    np.testing.assert_array_equal(results_to_mask(results, MULTI, 16, 16), classmap)


def test_sparse_background_region_only_on_request():
    classmap = np.zeros((10, 10), dtype=np.int64)
    classmap[2:5, 2:5] = 1
    assert [r["value"]["brushlabels"] for r in mask_to_results(classmap, SPARSE)] == [["Mitochondria"]]
    both = mask_to_results(classmap, SPARSE, include_background=True)
    assert sorted(r["value"]["brushlabels"][0] for r in both) == ["Background", "Mitochondria"]
    np.testing.assert_array_equal(results_to_mask(both, SPARSE, 10, 10), classmap)


@settings(max_examples=25, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(1, 24), st.integers(1, 24)), elements=st.integers(0, 2)))
def test_round_trip_property(classmap):
    h, w = classmap.shape
    np.testing.assert_array_equal(results_to_mask(mask_to_results(classmap, MULTI), MULTI, h, w), classmap)


def test_dense_unpainted_is_background_sparse_unpainted_is_unknown():
    mito = np.zeros((12, 12), dtype=bool)
    mito[1:4, 1:4] = True
    bg = np.zeros((12, 12), dtype=bool)
    bg[8:, 8:] = True
    dense = results_to_mask([_region(mito, "Mitochondria")], DENSE, 12, 12)
    assert set(np.unique(dense)) == {0, 1} and dense[mito].all()
    sparse = results_to_mask([_region(mito, "Mitochondria"), _region(bg, "Background")], SPARSE, 12, 12)
    assert (sparse[mito] == 1).all() and (sparse[bg] == 0).all()
    assert (sparse[~(mito | bg)] == IGNORE).all()


def test_foreground_wins_over_background_whatever_the_order():
    mito = np.zeros((6, 6), dtype=bool)
    mito[2:4, 2:4] = True
    everything = np.ones((6, 6), dtype=bool)
    for order in ([_region(mito, "Mitochondria"), _region(everything, "Background")],
                  [_region(everything, "Background"), _region(mito, "Mitochondria")]):  # fmt: skip
        mask = results_to_mask(order, SPARSE, 6, 6)
        assert (mask[mito] == 1).all() and (mask[~mito] == 0).all()


def test_faint_alpha_is_not_painted():
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[0, 0] = 40  # an anti-aliased stroke edge
    mask[1, 1] = 255
    region = _region(mask.astype(bool), "Mitochondria")
    region["value"]["rle"] = mask2rle(mask)
    out = results_to_mask([region], DENSE, 4, 4)
    assert out[1, 1] == 1 and out[0, 0] == 0


def test_other_controls_and_empty_results_are_ignored():
    assert (results_to_mask([], DENSE, 5, 5) == 0).all()
    assert (results_to_mask(None, SPARSE, 5, 5) == IGNORE).all()  # type: ignore[arg-type]
    other = _region(np.ones((5, 5), bool), "Mitochondria", from_name="other_brush")
    choice = {"from_name": "quality", "to_name": "img", "type": "choices", "value": {"choices": ["good"]}}
    assert (results_to_mask([other, choice], DENSE, 5, 5) == 0).all()


def test_wrong_size_raises():
    region = _region(np.ones((8, 8), bool), "Mitochondria")
    with pytest.raises(AnnotationError, match="drawn on a 8x8 image but the task image is 10x8"):
        results_to_mask([region], DENSE, 8, 10)
    region = _region(np.ones((8, 8), bool), "Mitochondria", w=10)  # header lies: the RLE length catches it
    with pytest.raises(AnnotationError, match="holds 256 values, expected 320"):
        results_to_mask([region], DENSE, 8, 10)


def test_unknown_or_missing_label_raises():
    with pytest.raises(AnnotationError, match="'Nucleus' is not in"):
        results_to_mask([_region(np.ones((4, 4), bool), "Nucleus")], DENSE, 4, 4)
    region = _region(np.ones((4, 4), bool), "Mitochondria")
    region["value"]["brushlabels"] = []
    with pytest.raises(AnnotationError, match="without a label"):
        results_to_mask([region], DENSE, 4, 4)


@pytest.mark.parametrize("rle", [[], [1, 2, 3], [300, 2, 1], "abc", None, [0, 0, 1, 0, 57]])
def test_undecodable_rle_raises(rle):
    region = _region(np.ones((4, 4), bool), "Mitochondria")
    region["value"]["rle"] = rle
    with pytest.raises(AnnotationError):
        results_to_mask([region], DENSE, 4, 4)


def test_malformed_results_raise():
    with pytest.raises(AnnotationError, match="must be a list"):
        results_to_mask({"oops": 1}, DENSE, 4, 4)  # type: ignore[arg-type]
    with pytest.raises(AnnotationError, match="expected an object"):
        results_to_mask(["x"], DENSE, 4, 4)
    region = _region(np.ones((4, 4), bool), "Mitochondria")
    region["value"]["format"] = "png"
    with pytest.raises(AnnotationError, match="only 'rle'"):
        results_to_mask([region], DENSE, 4, 4)


def test_mask_to_results_rejects_non_2d():
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        mask_to_results(np.zeros((2, 2, 2), dtype=np.int64), DENSE)


def test_ignore_matches_training():
    from ml_backend.training import IGNORE as TRAINING_IGNORE

    assert IGNORE == TRAINING_IGNORE
