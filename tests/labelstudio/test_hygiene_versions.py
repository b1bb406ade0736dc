"""Which versions keep their predictions (``labelstudio.hygiene.kept_versions``)."""

from __future__ import annotations

import pytest

from ml_backend.labelstudio import hygiene
from ml_backend.labelstudio.hygiene import kept_versions

LATEST_FIRST = ["v3", "v2", "v1"]


@pytest.mark.parametrize(
    ("live", "keep", "expected"),
    [
        ("v3", 1, ["v3"]),
        ("v3", 2, ["v3", "v2"]),
        ("v3", 0, ["v3", "v2", "v1"]),
        ("v2", 2, ["v2", "v3"]),  # a rollback: the live version first, then the most recent other one
        ("v4", 2, ["v4", "v3"]),  # the live version has no prediction listed yet
        ("v3", 10, ["v3", "v2", "v1"]),
    ],
)
def test_kept_versions(live: str, keep: int, expected: list[str]) -> None:
    assert kept_versions(live, LATEST_FIRST, keep) == expected


def _task(*preds: tuple[int | None, str], labelled: bool = False) -> dict:
    return {"predictions": [{"id": pid, "model_version": v} for pid, v in preds],
            "annotations": [{"id": 1, "was_cancelled": False}] if labelled else []}  # fmt: skip


def test_only_listed_old_predictions_on_tasks_holding_the_live_version_are_deletable() -> None:
    """By id, and only where the task already holds a newer (live) prediction: pushed this round (``covered``) or
    already listed on it."""
    tasks = {
        1: _task((11, "v1"), (12, "v2")),  # reached this round: both old ones go (v2 is not kept with keep=1)
        2: _task((21, "v1")),  # not reached, nothing newer: keeps its only prediction
        3: _task((31, "v1"), (32, "v3")),  # not reached this round, but already holds a live prediction
        4: _task((41, "v1"), labelled=True),  # labelled, nothing newer: keeps it
        5: _task((None, "v1")),  # no id: never deleted (never by version)
        6: _task((61, "v0")),  # a version that is not old (kept): stays
    }
    out = hygiene.deletable_predictions(tasks, "v3", ["v1", "v2"], covered=[1, 5])
    assert out == [(1, 11, "v1"), (1, 12, "v2"), (3, 31, "v1")]
    assert hygiene.deletable_predictions(tasks, "v3", ["v1"], covered=[]) == [(3, 31, "v1")]
    assert hygiene.deletable_predictions(tasks, "v3", [], covered=list(tasks)) == []
