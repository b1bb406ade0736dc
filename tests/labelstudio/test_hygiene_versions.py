"""Which versions keep their predictions (``labelstudio.hygiene.kept_versions``)."""

from __future__ import annotations

import pytest

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
