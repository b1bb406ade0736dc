"""Label config parsing: names come from the config, dense/sparse semantics, clear errors for unusable configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_backend.labelstudio.labelconfig import BrushConfig, LabelConfigError, parse_label_config

REPO = Path(__file__).resolve().parents[2]

CUSTOM = """<View>
  <Text name="note" value="$note"/>
  <Choices name="quality" toName="em"><Choice value="good"/><Choice value="bad"/></Choices>
  <Image name="em" value="$tile_url"/>
  <BrushLabels name="seg" toName="em">
    <Label value="Mito"/><Label value="ER"/><Label value="background"/>
  </BrushLabels>
</View>"""


def test_dense_config_from_repo():
    cfg = parse_label_config((REPO / "label_config" / "dense.xml").read_text())
    assert cfg == BrushConfig("tag", "image", "image", ("Mitochondria",), None, "dense")
    assert cfg.num_classes == 2
    assert cfg.class_of("Mitochondria") == 1
    assert cfg.label_of(1) == "Mitochondria"
    with pytest.raises(ValueError, match="dense config"):
        cfg.label_of(0)


def test_sparse_config_from_repo():
    cfg = parse_label_config((REPO / "label_config" / "sparse.xml").read_text())
    assert cfg.mode == "sparse"
    assert cfg.background_label == "Background"
    assert cfg.labels == ("Mitochondria", "Background")
    assert cfg.num_classes == 2
    assert cfg.class_of("Background") == 0 and cfg.class_of("Mitochondria") == 1
    assert cfg.label_of(0) == "Background" and cfg.label_of(1) == "Mitochondria"


def test_names_and_labels_come_from_the_config():
    cfg = parse_label_config(CUSTOM)
    assert (cfg.from_name, cfg.to_name, cfg.image_key) == ("seg", "em", "tile_url")
    assert cfg.mode == "sparse" and cfg.background_label == "background"  # case-insensitive background name
    assert cfg.foreground_labels == ("Mito", "ER")
    assert cfg.num_classes == 3
    assert [cfg.class_of(x) for x in ("background", "Mito", "ER")] == [0, 1, 2]
    assert [cfg.label_of(i) for i in range(3)] == ["background", "Mito", "ER"]
    with pytest.raises(ValueError, match="not in the 'seg' BrushLabels"):
        cfg.class_of("Nucleus")
    with pytest.raises(ValueError, match="out of range"):
        cfg.label_of(3)


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("<View><Image name='i' value='$i'/>", "not valid Label Studio XML"),
        ("not xml at all", "not valid Label Studio XML"),
        (
            "<View><Image name='i' value='$i'/><RectangleLabels name='r' toName='i'><Label value='A'/>"
            "</RectangleLabels></View>",
            "no <BrushLabels> control",
        ),
        ("<View><Image name='i' value='$i'/></View>", "no <BrushLabels> control"),
        (
            "<View><Text name='t' value='$t'/><BrushLabels name='b' toName='t'><Label value='A'/></BrushLabels></View>",
            "does not point to an <Image>",
        ),
        (
            "<View><Image name='i' value='$i'/><BrushLabels name='b' toName='i'></BrushLabels></View>",
            "no <Label> children",
        ),
        (
            "<View><Image name='i' value='$i'/><BrushLabels name='b' toName='i'><Label value='Background'/>"
            "</BrushLabels></View>",
            "only the background label",
        ),
    ],
)
def test_unusable_configs_raise_a_clear_error(xml, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)


def test_non_string_config_is_rejected():
    with pytest.raises(LabelConfigError):
        parse_label_config(None)  # type: ignore[arg-type]
