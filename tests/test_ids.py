"""The one id parser (``ml_backend.ids``): what every edge (HTTP bodies, /status/<id>, the CLI) accepts as a Label
Studio project or task id, with one bound, ``MAX_ID``."""

from __future__ import annotations

import argparse

import pytest

from ml_backend import ids
from ml_backend.ids import MAX_ID, BigIntLiteral, parse_id, parse_project_ref


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        (42, 42),
        (MAX_ID, MAX_ID),
        ("7", 7),
        (" 7 ", 7),
        (str(MAX_ID), MAX_ID),
        (7.0, 7),
    ],
)
def test_valid_ids(value, expected):
    assert parse_id(value, "id") == expected
    assert type(parse_id(value, "id")) is int


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param(-1, r"id -1 is out of range 1\.\.2147483647", id="negative"),
        pytest.param("-5", r"id -5 is out of range", id="negative-text"),
        pytest.param(0, r"id 0 is out of range", id="zero"),
        pytest.param(MAX_ID + 1, r"id 2147483648 is out of range", id="too-large"),
        pytest.param(str(MAX_ID + 1), r"id 2147483648 is out of range", id="too-large-text"),
        pytest.param("9" * 40, r"must be an integer in 1\.\.2147483647, got '9999", id="too-many-digits"),
        pytest.param(BigIntLiteral("9" * 50), r"out of range 1\.\.2147483647 \(an integer of 50 digits\)", id="bigint"),
        pytest.param(1e300, r"must be an integer .* got float", id="huge-float"),
        pytest.param(7.5, r"must be an integer .* got float", id="fraction"),
        pytest.param("abc", r"must be an integer in 1\.\.2147483647, got 'abc'", id="non-numeric"),
        pytest.param("7a", r"got '7a'", id="digits-then-text"),
        pytest.param("\u0661\u0662", r"must be an integer in 1\.\.2147483647", id="arabic-indic-digits"),
        pytest.param("", r"got ''", id="empty"),
        pytest.param(None, r"got null", id="none"),
        pytest.param(True, r"got boolean", id="bool-true"),
        pytest.param(False, r"got boolean", id="bool-false"),
        pytest.param([1], r"got array", id="list"),
        pytest.param({"id": 1}, r"got object", id="dict"),
    ],
)
def test_invalid_ids_are_value_errors_saying_why(value, reason):
    with pytest.raises(ValueError, match=reason):
        parse_id(value, "id")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3.1700000000", 3), ("3", 3), (3, 3), (f"{MAX_ID}.1712345678", MAX_ID)],
)
def test_project_references_carry_label_studios_timestamp(value, expected):
    assert parse_project_ref(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "missing 'project'"),
        ("", "missing 'project'"),
        ("x.1700000000", "does not start with a project id"),
        ("\u0661\u0662.1700000000", "does not start with a project id"),
        ("-3.1700000000", "out of range"),
        (f"{MAX_ID + 1}.1", "out of range"),
        ("3." + "1" * 80, "characters long"),
        (True, "must be a string like '3.1700000000', got boolean"),
        ([3], "got array"),
    ],
)
def test_bad_project_references(value, reason):
    with pytest.raises(ValueError, match=reason):
        parse_project_ref(value)


def test_one_max_id_and_one_parser_everywhere():
    """The HTTP edge, the /status route, the webhook, the queue and the CLIs use ml_backend.ids, not copies."""
    from ml_backend import queue
    from ml_backend.cli import build_parser, importing, project_arg
    from ml_backend.config import Settings
    from ml_backend.export.cli import build_parser as export_parser
    from ml_backend.labelstudio import prediction
    from ml_backend.queue import scheduling, triggering
    from ml_backend.server import predict, projects, schemas

    assert schemas.MAX_ID is ids.MAX_ID and prediction.MAX_ID is ids.MAX_ID and queue.MAX_ID is ids.MAX_ID
    assert scheduling.is_id is ids.is_id and triggering.parse_project_ref is parse_project_ref
    assert schemas.bounded_id is parse_id and predict.parse_id is parse_id and prediction.parse_id is parse_id
    assert schemas.project_id is parse_project_ref and projects.parse_project_ref is parse_project_ref
    assert project_arg("12") == "12"
    with pytest.raises(argparse.ArgumentTypeError, match="out of range"):
        project_arg("0")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["versions", "--project", "../x"])  # never a path outside MODEL_DIR/projects
    export = export_parser(Settings())
    assert export.parse_args(["--project", " 12 ", "-o", "out", "x.tif"]).project == 12
    for bad in (str(MAX_ID + 1), "0", "../x"):  # usage errors (exit 2) before any file, key or request
        with pytest.raises(SystemExit, match="2"):
            export.parse_args(["--project", bad, "-o", "out", "x.tif"])
        with pytest.raises(SystemExit, match="2"):
            importing.main(["--project", bad, "x.tif"])


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, True), (MAX_ID, True), (0, False), (MAX_ID + 1, False), (True, False), ("7", False), (7.0, False),
     (None, False)],
)
def test_is_id_converts_nothing(value, expected):
    assert ids.is_id(value) is expected


def test_project_arg_is_a_usage_error():
    assert ids.project_arg("7") == 7
    with pytest.raises(argparse.ArgumentTypeError, match="out of range"):
        ids.project_arg("0")
    with pytest.raises(argparse.ArgumentTypeError, match="must be an integer"):
        ids.project_arg("../x")
